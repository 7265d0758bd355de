"""What the Captioning tab computes, apart from Gradio: captioner option widgets from the options dataclasses, the
`python -m engine caption` command line, the run summary, the caption editor's files and the tag frequency table.

Captioning itself (which loads a model) runs as an engine subprocess; everything here is torch-free and runs in the
GUI process. Batch edits are engine.caption.edit, called in-process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import typing
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from PIL import Image, ImageOps

from engine.caption.edit import EditOptions, EditSummary
from engine.caption.registry import CAPTIONER_LOADERS, captioner_entry
from engine.caption.runner import caption_path, find_images, split_tags
from engine.cli.options import CliOption, option_tokens
from engine.config.choices import dotted_caption_extension
from engine.files import atomic_write_text
from gui.browse import PathNotAllowed

if TYPE_CHECKING:  # gui.file_browser imports gradio; this module stays free of it
    from gui.file_browser import FileRoots
    from gui.jobs import JobUpdate

CAPTIONER_NAMES: tuple[str, ...] = tuple(CAPTIONER_LOADERS)
_WHAT_IT_WRITES = {"blip": "a sentence", "git": "a sentence", "wd14": "booru tags"}
WRITE_MODES = ("skip", "overwrite", "append")
TAG_COLUMNS = ["tag", "count"]
THUMBNAIL_SIZE = 256
PREVIEW_SIZE = 1024
THUMBNAIL_DIR = Path(tempfile.gettempdir()) / "atelier-thumbnails"  # served by Gradio (inside the temp folder)
TAG_SEPARATOR = ", "


class CaptionViewError(ValueError):
    """Something the user entered cannot be used; the message names it and says what to do."""


# --- captioner options --------------------------------------------------------------------------------------------
def _kind(annotation: Any) -> str:
    """The widget kind of an options field: bool, int, float, str, list (tags) or pairs (source,target)."""
    if typing.get_origin(annotation) is tuple:
        return "pairs" if typing.get_origin(typing.get_args(annotation)[0]) is tuple else "list"
    return annotation.__name__


# How a field's value is shown in its widget, and typed back as a command-line value, per kind.
_TO_WIDGET: dict[str, Callable[[Any], Any]] = {
    "list": lambda value: ", ".join(value),
    "pairs": lambda value: "; ".join(f"{source},{target}" for source, target in value),
}
_INFO = {"list": "comma-separated", "pairs": "source,target pairs separated by ';' (empty target drops the tag)"}


@dataclass(frozen=True)
class OptionSpec:
    """One field of a captioner's options dataclass, as the page shows it."""

    name: str
    kind: str
    default: Any

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").capitalize()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def info(self) -> str | None:
        return _INFO.get(self.kind)

    @property
    def widget_default(self) -> Any:
        return _TO_WIDGET.get(self.kind, lambda value: value)(self.default)


def option_specs(captioner: str) -> list[OptionSpec]:
    """The options of `captioner`, read from its options dataclass (the same one the engine builds it with)."""
    options_type = captioner_entry(captioner).options_type
    hints = typing.get_type_hints(options_type)
    return [OptionSpec(field.name, _kind(hints[field.name]), field.default)
            for field in dataclasses.fields(options_type)]


def captioner_choices() -> list[tuple[str, str]]:
    """(label, name) for a radio: 'BLIP (writes a sentence)'."""
    return [(f"{name.upper()} (writes {_WHAT_IT_WRITES[name]})" if name in _WHAT_IT_WRITES else name.upper(), name)
            for name in CAPTIONER_NAMES]


def model_choices(captioner: str) -> list[str]:
    """Known model ids for `captioner`, its default first."""
    entry = captioner_entry(captioner)
    return list(dict.fromkeys([entry.default_model, *entry.known_models]))


def _number_text(spec: OptionSpec, value: Any) -> str:
    if value is None or value == "":
        raise CaptionViewError(f"{spec.label}: enter a number (default {spec.default})")
    if spec.kind == "int":
        if float(value) != int(float(value)):
            raise CaptionViewError(f"{spec.label}: enter a whole number, not {value}")
        return str(int(float(value)))
    return repr(float(value))


def _flag_args(spec: OptionSpec, value: Any) -> list[str]:
    """The option's words, written by the engine's one writer of command lines (engine.cli.options); the engine's
    caption command declares a bool as --flag/--no-flag and reads every other option as text."""
    option = CliOption(spec.name, (spec.flag,), bool if spec.kind == "bool" else str, spec.default, negatable=True)
    if spec.kind == "bool":
        text: Any = bool(value)
    elif spec.kind in ("int", "float"):
        text = _number_text(spec, value)
    else:
        text = value or ""
    return option_tokens(option, text, joined=True)  # '=' keeps a value starting with '-' from reading as a flag


def _same(spec: OptionSpec, value: Any) -> bool:
    if spec.kind in ("int", "float"):
        return value is not None and value != "" and float(value) == float(spec.default)
    if spec.kind == "bool":
        return bool(value) == spec.default
    return (value or "") == spec.widget_default


def option_flags(captioner: str, values: Mapping[str, Any]) -> list[str]:
    """Command-line flags for the options whose widget `values` (field name -> value) differ from the defaults.

    Raises:
        CaptionViewError: a number field is empty or not a whole number where one is needed.
    """
    args: list[str] = []
    for spec in option_specs(captioner):
        value = values.get(spec.name, spec.widget_default)
        if not _same(spec, value):
            args += _flag_args(spec, value)
    return args


@dataclass(frozen=True)
class CaptionRequest:
    """Everything the Caption button sends to `python -m engine caption`."""

    folder: Path
    captioner: str
    model: str = ""
    mode: str = "skip"
    prefix: str = ""
    suffix: str = ""
    extension: str = ".txt"
    recursive: bool = False
    workers: int = 2
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # field name -> widget value
    metadata: Path | None = None  # write into this new fine-tune metadata file instead of caption files
    in_json: Path | None = None  # ... merged with this existing one
    full_path: bool = False  # ... keyed by absolute image paths

    def args(self) -> list[str]:
        """The engine arguments (without --events, which EngineJob adds)."""
        if self.captioner not in CAPTIONER_NAMES:
            raise CaptionViewError(f"Captioner: choose one of {', '.join(CAPTIONER_NAMES)}")
        if self.mode not in WRITE_MODES:
            raise CaptionViewError(f"Images that already have a caption: choose one of {', '.join(WRITE_MODES)}")
        args = ["caption", str(self.folder), "--captioner", self.captioner, "--mode", self.mode,
                f"--caption-extension={caption_extension(self.extension)}", f"--workers={max(1, int(self.workers))}"]
        args += [f"--model={self.model.strip()}"] if self.model and self.model.strip() else []
        args += [f"--prefix={self.prefix}"] if self.prefix.strip() else []
        args += [f"--suffix={self.suffix}"] if self.suffix.strip() else []
        args += ["--recursive"] if self.recursive else []
        if self.metadata is not None:
            args += [f"--metadata={self.metadata}"] + ([f"--in-json={self.in_json}"] if self.in_json else []) + \
                (["--full-path"] if self.full_path else [])
        return args + option_flags(self.captioner, self.options)


def caption_extension(text: str | None) -> str:
    """'.txt', 'caption' -> '.caption'; empty means .txt. Only the text extensions of CAPTION_EXTENSIONS: the
    editor must never write e.g. a `.pt` file that training would later load."""
    text = (text or "").strip() or ".txt"
    try:
        return dotted_caption_extension(text)
    except ValueError as error:
        raise CaptionViewError(f"Caption extension: {error}.") from None


def resolve_folder(text: str | None, roots: FileRoots) -> Path:
    """The image folder the user typed, checked: it exists and lies inside the folders this app may use.

    Raises:
        CaptionViewError: saying what is wrong with the folder and what to do.
    """
    if not text or not text.strip():
        raise CaptionViewError("Folder: choose the folder of images to caption first.")
    try:  # before looking at the folder: whether a folder outside the roots exists is not the page's to tell
        folder = roots.check(text.strip(), "Folder")
    except PathNotAllowed as error:  # the message every path field gives
        raise CaptionViewError(str(error)) from None
    if not folder.is_dir():
        raise CaptionViewError(f"Folder: `{folder}` is not a folder; check the path.")
    return folder.resolve()


def metadata_paths(output: str | None, merge_into: str | None, roots: FileRoots) -> tuple[Path, Path | None]:
    """The metadata file to write and the optional one to merge into, checked like every path field; the output
    must be a new file (the engine checks again before loading the model).

    Raises:
        CaptionViewError: an empty or existing output, or a path the app may not use.
    """
    if not (output or "").strip():
        raise CaptionViewError("Metadata file: give a name for the new metadata file (e.g. meta_cap.json).")
    try:
        target = roots.check(output.strip(), "Metadata file")
        source = roots.check(merge_into.strip(), "Merge into") if (merge_into or "").strip() else None
    except PathNotAllowed as error:
        raise CaptionViewError(str(error)) from None
    if target.exists():
        raise CaptionViewError(f"Metadata file: `{target}` exists already and is never overwritten; choose a new "
                               "name (to build on it, give it under Merge into).")
    return target, source


def model_location(text: str | None, roots: FileRoots) -> str:
    """The captioning model typed or chosen: a hub id (owner/name) as it is, a local model folder only where the app
    may use it (the rule of every path field). '' means the captioner's default.

    Raises:
        CaptionViewError: a local folder the app may not use, with the flag that allows it.
    """
    text = (text or "").strip()
    try:
        return roots.check_location(text, "Model") if text else ""
    except PathNotAllowed as error:
        raise CaptionViewError(str(error)) from None


# --- the run's progress and summary -------------------------------------------------------------------------------
def summary_markdown(update: JobUpdate, folder: Path, metadata: Path | None = None) -> str:
    """The result of a finished captioning job as the page shows it; '' while it runs. With `metadata`, the
    captions went into that file rather than into caption files."""
    if not update.finished:
        return ""
    done = update.last("done")
    if done is None:
        if update.returncode is not None and update.returncode < 0:
            if metadata is not None:  # the metadata file is written once, at the end
                return f"**Stopped.** Nothing was written to `{metadata}`; caption again to make it."
            return f"**Stopped.** Caption files written so far in `{folder}` are kept."
        return f"**Captioning failed:** {update.error_text()}"
    written = f"{done['written']} caption(s) written into `{metadata}`" if metadata is not None else \
        f"{done['written']} caption file(s) written"
    lines = [f"**Captioned `{folder}`:** {written}, {done['skipped']} skipped (already captioned), "
             f"{done['failed']} failed."]
    lines += [f"- could not read `{event.get('where')}`: {event.get('message')}"
              for event in update.events if event.get("type") == "warning"]
    if done.get("top_tags"):
        lines.append("\nMost frequent new tags: " + ", ".join(f"{code(tag)} ({count})"
                                                             for tag, count in done["top_tags"]))
    return "\n".join(lines)


def code(text: str) -> str:
    """`text` as inline code, so tags like ^_^ or *_* are not read as Markdown emphasis."""
    return "`" + " ".join(str(text).replace("`", "'").split()) + "`"


# --- caption files: the editor and the tag table -------------------------------------------------------------------
def read_caption(image: Path, extension: str) -> str:
    """The caption of `image` without its final newline; '' when it has no caption file yet."""
    path = caption_path(image, caption_extension(extension))
    try:
        return path.read_text(encoding="utf-8").rstrip("\n") if path.is_file() else ""
    except UnicodeDecodeError as error:
        raise CaptionViewError(f"`{path}` is not UTF-8 text; re-save it as UTF-8 to edit it here.") from error


def save_caption(image: Path, extension: str, text: str) -> Path:
    """Write the caption of `image` atomically (a crash never leaves half a file); returns the caption file.

    Raises:
        CaptionViewError: `extension` is not a caption text extension (checked again here, right before writing).
    """
    path = caption_path(image, caption_extension(extension))
    atomic_write_text(path, text.strip() + "\n")
    return path


def tag_frame(folder: Path, extension: str, recursive: bool = False) -> pd.DataFrame:
    """How many caption files carry each tag (comma-separated pieces), most frequent first."""
    counts: Counter = Counter()
    for image in find_images(folder, recursive):
        try:
            counts.update(dict.fromkeys(split_tags(read_caption(image, extension), TAG_SEPARATOR), 1))
        except CaptionViewError:
            continue  # not text: the editor says so when the image is opened
    rows = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return pd.DataFrame(rows, columns=TAG_COLUMNS)


def thumbnail(image: Path, size: int = THUMBNAIL_SIZE, cache_dir: Path = THUMBNAIL_DIR) -> Path | None:
    """A small PNG of `image` for the gallery, cached by path and modification time; None when unreadable.
    Thumbnails keep big photos out of the page and live in the temp folder, which Gradio may serve."""
    try:
        stat = image.stat()
        key = hashlib.sha1(f"{image.resolve()}|{stat.st_mtime_ns}|{size}".encode()).hexdigest()
        target = cache_dir / f"{key}.png"
        if not target.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            small = preview_image(image, size)
            with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".png", delete=False) as handle:
                small.save(handle, format="PNG")
            Path(handle.name).replace(target)
        return target
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def preview_image(image: Path, size: int = PREVIEW_SIZE) -> Image.Image:
    """The image as displayed (EXIF orientation applied), at most `size` pixels on its longer side."""
    with Image.open(image) as opened:
        opened.draft("RGB", (size, size))  # JPEGs decode at a reduced scale: fast on big photos
        shown = ImageOps.exif_transpose(opened)
        shown = shown.convert("RGBA" if "A" in shown.getbands() else "RGB")
    shown.thumbnail((size, size))
    return shown


@dataclass
class EditorState:
    """The editor's folder, its images, which one is shown, and its caption as last read or saved (to tell
    unsaved edits from saved ones)."""

    folder: str = ""
    extension: str = ".txt"
    recursive: bool = False
    images: list[str] = dataclasses.field(default_factory=list)
    index: int = 0
    saved_text: str = ""

    @property
    def current(self) -> Path | None:
        return Path(self.images[self.index]) if self.images else None

    def unsaved_warning(self, text: str | None) -> str:
        """'' when the caption box holds what is on disk; else a message saying what to do."""
        current = self.current
        if current is None or (text or "").strip() == self.saved_text.strip():
            return ""
        name = caption_path(current, self.extension).name
        return f"**{name} has unsaved changes.** Press Save to keep them or Revert to drop them, then go on."

    def moved(self, index: int) -> EditorState:
        """This state on image `index` (wrapping around at either end), its caption read from disk."""
        index = index % len(self.images) if self.images else 0
        state = dataclasses.replace(self, index=index, saved_text="")
        current = state.current
        state.saved_text = read_caption(current, self.extension) if current is not None else ""
        return state

    def position_markdown(self) -> str:
        current = self.current
        if current is None:
            return "No images in this folder." if self.folder else "Open a folder to edit its captions."
        caption = caption_path(current, self.extension)
        note = "" if caption.is_file() else " (no caption file yet: Save creates it)"
        return f"**{self.index + 1} / {len(self.images)}** · `{current.name}` · `{caption.name}`{note}"


@dataclass
class EditorListing:
    """A folder's images for the editor: gallery items (thumbnail, caption) and the images that cannot be read."""

    state: EditorState
    items: list[tuple[str, str]]
    unreadable: list[str]


def gallery_label(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return (text[: limit - 1] + "…" if len(text) > limit else text) or "(no caption)"


def list_editor(folder: Path, extension: str, recursive: bool = False, keep: Path | None = None) -> EditorListing:
    """The images of `folder` that can be shown, with their captions, and the editor state on `keep` when it is
    still there (else on the first image), its caption read from disk."""
    images, items, unreadable = [], [], []
    for image in find_images(folder, recursive):
        small = thumbnail(image)
        if small is None:
            unreadable.append(image.name)
            continue
        try:
            label = gallery_label(read_caption(image, extension))
        except CaptionViewError:
            unreadable.append(caption_path(image, extension).name + " (not UTF-8 text)")
            continue
        images.append(str(image))
        items.append((str(small), label))
    state = EditorState(folder=str(folder), extension=extension, recursive=recursive, images=images)
    index = images.index(str(keep)) if keep is not None and str(keep) in images else 0
    return EditorListing(state.moved(index), items, unreadable)


def listing_markdown(listing: EditorListing) -> str:
    count = len(listing.state.images)
    text = f"{count} image(s) in `{listing.state.folder}`."
    if listing.unreadable:
        text += f" Not shown (cannot be opened): {', '.join(listing.unreadable)}."
    return text


# --- batch edits ----------------------------------------------------------------------------------------------------
def parse_tags(text: str | None) -> tuple[str, ...]:
    """'a, b,,c ' -> ('a', 'b', 'c')."""
    return tuple(tag for tag in split_tags(text or "", TAG_SEPARATOR))


def edit_options(*, add: str = "", remove: str = "", find: str = "", replace: str = "", prefix: str = "",
                 suffix: str = "", dedupe: bool = False) -> EditOptions:
    """The batch edit the form describes (empty fields do nothing)."""
    return EditOptions(add_tags=parse_tags(add), remove_tags=parse_tags(remove),
                       replace=((find, replace or ""),) if find else (), prefix=prefix or "", suffix=suffix or "",
                       dedupe=bool(dedupe))


def is_empty_edit(options: EditOptions) -> bool:
    return options == EditOptions(separator=options.separator)


def edit_markdown(summary: EditSummary, *, dry_run: bool, examples: int = 5) -> str:
    """How many caption files the edit changes (or would), with a few before -> after examples."""
    total = len(summary.changed) + len(summary.unchanged)
    verb = "Would change" if dry_run else "Changed"
    lines = [f"**{verb} {len(summary.changed)} of {total} caption file(s).**"]
    if dry_run and summary.changed:
        lines[0] += " Press Apply to write them."
    lines += [f"- {code(path.name)}: {code(before)} → {code(after)}" for path, (before, after) in
              list(summary.changed.items())[:examples]]
    if len(summary.changed) > examples:
        lines.append(f"- … and {len(summary.changed) - examples} more")
    lines += [f"- could not edit `{path.name}`: {message}" for path, message in summary.failed]
    return "\n".join(lines)
