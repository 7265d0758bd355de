"""Writing sd-scripts' fine-tuning metadata JSON (spec §1.9, §3.5): caption and tag files merged into it, and a clean
pass over it. Our equivalents of finetune/merge_captions_to_metadata.py, merge_dd_tags_to_metadata.py and
clean_captions_and_tags.py; engine.data.metadata reads what this writes (`dataset.in_json` / `metadata_file`).

The file is `{image_key: {"caption": str, "tags": str, ...}}`, the key an image's stem (sd-scripts' default) or its
absolute path (`full_path`). Where we part from sd-scripts, on purpose:
  - the output is always a new file: an existing one (the input included) is refused, never overwritten, and the
    file appears whole or not at all;
  - `recursive` without `full_path` writes keys relative to the folder (`sub/a.png`) instead of refusing, since stems
    from subfolders could collide;
  - an image without a text file, or with one that is not UTF-8, is reported by name and left as it was instead of
    ending the script with a traceback; two images that would share a key are reported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.choices import dotted_caption_extension
from engine.files import write_new_file

CAPTION, TAGS = "caption", "tags"
# The text files each field is read from by default, as sd-scripts' two merge scripts.
DEFAULT_EXTENSIONS: dict[str, str] = {CAPTION: ".caption", TAGS: ".txt"}
EXAMPLES = 5  # names listed in a report line before "and N more"


class MetadataWriteError(ValueError):
    """Metadata that cannot be read or written as asked; the message names the file and says what to do."""


@dataclass
class MergeReport:
    """What one merge did: `merged` keys got the field; the other lists say which images were left as they were."""

    field: str
    extension: str
    images: int = 0
    merged: list[str] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # no text file with the extension
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    shared_keys: dict[str, list[Path]] = field(default_factory=dict)  # key -> the images that map to it

    def lines(self) -> list[str]:
        out = [f"{self.field}: merged {len(self.merged)} of {self.images} image(s) from their {self.extension} files"]
        if self.missing:
            out.append(f"{self.field}: {len(self.missing)} image(s) have no {self.extension} file and were left as "
                       f"they were: {_names(path.name for path in self.missing)}")
        out += [f"{self.field}: {path}: {reason}" for path, reason in self.unreadable]
        out += [f"key {key!r} is shared by {', '.join(path.name for path in paths)}: only one of them trains; "
                "use full paths (--full-path) or rename one" for key, paths in self.shared_keys.items()]
        return out


@dataclass
class CleanReport:
    """What a clean pass changed, and the entries that had no tags or no caption to clean."""

    entries: int = 0
    tags_changed: list[str] = field(default_factory=list)
    captions_changed: list[str] = field(default_factory=list)
    without_tags: list[str] = field(default_factory=list)
    without_caption: list[str] = field(default_factory=list)
    multiple_ratings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"clean: {len(self.tags_changed)} tag list(s) and {len(self.captions_changed)} caption(s) changed "
               f"in {self.entries} entries"]
        if self.without_tags:
            out.append(f"clean: no tags in {len(self.without_tags)} entries: {_names(self.without_tags)}")
        if self.without_caption:
            out.append(f"clean: no caption in {len(self.without_caption)} entries: {_names(self.without_caption)}")
        if self.multiple_ratings:
            out.append(f"clean: more than one rating in {_names(self.multiple_ratings)} (kept the text before the "
                       "first)")
        return out


def _names(names: Iterable[str]) -> str:
    items = list(names)
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f" and {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else "")


# --- images and keys ----------------------------------------------------------------------------------------------
def metadata_images(folder: Path, recursive: bool) -> list[Path]:
    """The training images of `folder` (subfolders too when `recursive`), sorted, hidden files left out."""
    from engine.data.images import is_image_file  # numpy behind it: not loaded for `python -m engine --help`

    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in found if path.is_file() and is_image_file(path)
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def image_key(image: Path, folder: Path, *, full_path: bool, recursive: bool) -> str:
    """The metadata key of `image`: its absolute path, its path relative to `folder` (recursive), or its stem."""
    if full_path:
        return str(image.absolute())
    if recursive:
        return image.relative_to(folder).as_posix()
    return image.stem


def text_file(image: Path, extension: str) -> Path:
    """`<stem><extension>` beside the image (sd-scripts' with_suffix)."""
    return image.with_name(image.stem + dotted_caption_extension(extension))


def read_text_file(path: Path) -> str:
    """The whole file stripped, as sd-scripts' merge scripts read it (a BOM dropped, line ends made "\\n").

    Raises:
        MetadataWriteError: the file cannot be read or is not UTF-8.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MetadataWriteError(f"not UTF-8 text (invalid byte at offset {error.start}); re-save it as UTF-8") \
            from None
    except OSError as error:
        raise MetadataWriteError(f"cannot be read ({error.strerror or error})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


# --- reading and writing the JSON ---------------------------------------------------------------------------------
def load_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """An existing metadata JSON ({key: {...}}) to merge into or clean.

    Raises:
        MetadataWriteError: missing, not JSON, or not an object of objects; the message names the file.
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        raise MetadataWriteError(f"{path}: a .jsonl file cannot be merged into; give a .json metadata file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise MetadataWriteError(f"{path}: no such metadata file; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MetadataWriteError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise MetadataWriteError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict) or not all(isinstance(value, dict) for value in data.values()):
        raise MetadataWriteError(f"{path}: expected an object mapping image keys to {{caption, tags, ...}} objects")
    return data


def check_new_output(path: Path) -> Path:
    """`path` if a metadata file may be written there: a .json name that does not exist yet, in an existing folder.

    Raises:
        MetadataWriteError: the file exists (we never overwrite one, the input included), the folder is missing, or
            the name ends in .jsonl (sd-scripts would read it as JSON lines).
    """
    path = Path(path)
    if path.exists():
        raise MetadataWriteError(f"{path} exists already and is never overwritten: choose a new file name for the "
                                 "output (to build on that file, give it as the input to merge into)")
    if path.suffix.lower() == ".jsonl":
        raise MetadataWriteError(f"{path}: metadata is written as JSON; give the output a .json name")
    if not path.parent.is_dir():
        raise MetadataWriteError(f"{path}: the folder {path.parent} does not exist; create it or choose another")
    return path


def write_new_metadata(path: Path, metadata: dict[str, dict[str, Any]]) -> Path:
    """Write `metadata` to the new file `path` (indent 2, as sd-scripts), whole or not at all, never over a file.

    Raises:
        MetadataWriteError: see check_new_output; also when a file appears at `path` while writing.
    """
    path = check_new_output(path)
    data = (json.dumps(metadata, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        write_new_file(path, data)
    except FileExistsError:
        raise MetadataWriteError(f"{path} appeared while writing and was left alone: choose a new file name") \
            from None
    return path


# --- merging ------------------------------------------------------------------------------------------------------
def merge_text_files(metadata: dict[str, dict[str, Any]], folder: Path, field_name: str, extension: str | None = None,
                     *, full_path: bool = False, recursive: bool = False) -> MergeReport:
    """Put each image's `<stem><extension>` text into `metadata[key][field_name]` (in place), as the merge scripts.

    Raises:
        MetadataWriteError: `folder` is not a folder or holds no images; `extension` is not a caption extension.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MetadataWriteError(f"{folder}: no such folder; give the folder of the training images")
    try:
        extension = dotted_caption_extension(extension or DEFAULT_EXTENSIONS[field_name])
    except ValueError as error:
        raise MetadataWriteError(f"{field_name} extension: {error}") from None
    images = metadata_images(folder, recursive)
    if not images:
        where = "it or its subfolders" if recursive else "it (subfolders are searched with recursive)"
        raise MetadataWriteError(f"{folder}: no images in {where}")
    report = MergeReport(field_name, extension, images=len(images))
    owners: dict[str, list[Path]] = {}
    for image in images:
        key = image_key(image, folder, full_path=full_path, recursive=recursive)
        owners.setdefault(key, []).append(image)
        source = text_file(image, extension)
        if not source.is_file():
            report.missing.append(image)
            continue
        try:
            text = read_text_file(source)
        except MetadataWriteError as error:
            report.unreadable.append((source, str(error)))
            continue
        metadata.setdefault(key, {})[field_name] = text
        report.merged.append(key)
    report.shared_keys = {key: paths for key, paths in owners.items() if len(paths) > 1}
    return report


# --- cleaning (clean_captions_and_tags.py) ------------------------------------------------------------------------
_HAIR_LENGTH = re.compile(r", (long|short|medium) hair, ")
_HAIR_CUT = re.compile(r", (bob|hime) cut, ")
_HAIR = re.compile(r", ([\w\-]+) hair, ")
_WORD = re.compile(r", ([\w\-]+|hair ornament), ")
# With several people in the picture, per-person features that occur more than once are dropped (they would be
# attributed to the wrong person).
_REMOVED_WITH_SEVERAL_PEOPLE = (
    _HAIR_LENGTH,
    _HAIR_CUT,
    re.compile(r", [\w\-]+ eyes, "),
    re.compile(r", ([\w\-]+ sleeves|sleeveless), "),
    re.compile(r", (ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up|two tails|"
               r"[\w\-]+ braid|sidelocks), "),
)
_HAIR_LENGTH_PLACEHOLDER = ", @@@, "
_EMOTICON, _EMOTICON_PLACEHOLDER = "^_^", "^@@@^"

# Applied in order, each until it no longer changes the caption (BLIP's habits turned into the tags' words).
CAPTION_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("anime anime", "anime"), ("young ", ""), ("anime girl", "girl"), ("cartoon female", "girl"),
    ("cartoon lady", "girl"), ("cartoon character", "girl"), ("cartoon woman", "girl"), ("cartoon women", "girls"),
    ("cartoon girl", "girl"), ("anime female", "girl"), ("anime lady", "girl"), ("anime character", "girl"),
    ("anime woman", "girl"), ("anime women", "girls"), ("lady", "girl"), ("female", "girl"), ("woman", "girl"),
    ("women", "girls"), ("people", "girls"), ("person", "girl"), ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"), ("a cartoon picture", "a picture"), ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"), ("a cartoon drawing", "a drawing"), ("girl girl", "girl"),
)


def clean_tags(tags: str) -> tuple[str, bool]:
    """sd-scripts' clean_tags: underscores to spaces (`^_^` kept), a DeepDanbooru rating tail cut, per-person
    features dropped when there are several people, and `shirt` dropped when `white shirt` is there.

    Returns the cleaned tags and whether there was more than one rating.
    """
    tags = tags.replace(_EMOTICON, _EMOTICON_PLACEHOLDER).replace("_", " ").replace(_EMOTICON_PLACEHOLDER, _EMOTICON)
    pieces = tags.split(", rating")
    several_ratings = len(pieces) > 2
    tags = pieces[0]
    # Every tag framed by ", " on both sides, each separator doubled so that neighbouring tags both match.
    tags = ", " + tags.replace(", ", ", , ") + ", "
    if "girls" in tags or "boys" in tags:
        tags = _drop_features_of_several_people(tags)
    for word in _WORD.findall(tags):
        if re.search(rf", ((\w+) )+{re.escape(word)}, ", tags):
            tags = tags.replace(f", {word}, ", "")
    tags = tags.replace(", , ", ", ")
    return tags[2:-2], several_ratings


def _drop_features_of_several_people(tags: str) -> str:
    for pattern in _REMOVED_WITH_SEVERAL_PEOPLE:
        if len(pattern.findall(tags)) > 1:
            tags = pattern.sub("", tags)
    # One hair length for everyone is kept aside while hair colours are judged, then put back.
    length = _HAIR_LENGTH.search(tags)
    if length:
        tags = _HAIR_LENGTH.sub(_HAIR_LENGTH_PLACEHOLDER, tags)
    if len(_HAIR.findall(tags)) > 1:
        tags = _HAIR.sub("", tags)
    if length:
        tags = tags.replace(_HAIR_LENGTH_PLACEHOLDER, length.group())
    return tags


def clean_caption(caption: str) -> str:
    """sd-scripts' clean_caption: CAPTION_REPLACEMENTS in order, each repeated until nothing changes."""
    for old, new in CAPTION_REPLACEMENTS:
        while old in caption:
            replaced = caption.replace(old, new)
            if replaced == caption:
                break
            caption = replaced
    return caption


def clean_metadata(metadata: dict[str, dict[str, Any]]) -> CleanReport:
    """Clean every entry's tags and caption in place; entries without one are reported, not touched."""
    report = CleanReport(entries=len(metadata))
    for key, entry in metadata.items():
        tags = entry.get(TAGS)
        if tags is None:
            report.without_tags.append(key)
        else:
            cleaned, several_ratings = clean_tags(str(tags))
            if several_ratings:
                report.multiple_ratings.append(key)
            if cleaned != tags:
                entry[TAGS] = cleaned
                report.tags_changed.append(key)
        caption = entry.get(CAPTION)
        if caption is None:
            report.without_caption.append(key)
        else:
            cleaned = clean_caption(str(caption))
            if cleaned != caption:
                entry[CAPTION] = cleaned
                report.captions_changed.append(key)
    return report


# --- the whole preparation, as the Dataset tab runs it --------------------------------------------------------------
@dataclass(frozen=True)
class PrepareRequest:
    """Merge captions and/or tags of `folder` (None: that step is not run), optionally clean, into a new file."""

    folder: Path
    output: Path
    in_json: Path | None = None
    caption_extension: str | None = DEFAULT_EXTENSIONS[CAPTION]
    tags_extension: str | None = DEFAULT_EXTENSIONS[TAGS]
    clean: bool = False
    full_path: bool = False
    recursive: bool = False


@dataclass
class PrepareReport:
    output: Path
    entries: int
    merges: list[MergeReport]
    clean: CleanReport | None

    def lines(self) -> list[str]:
        out = [line for merge in self.merges for line in merge.lines()]
        out += self.clean.lines() if self.clean is not None else []
        return [*out, f"wrote {self.entries} entries to {self.output}"]


def prepare_metadata(request: PrepareRequest) -> PrepareReport:
    """Run the steps `request` asks for and write the result to its new output file.

    Raises:
        MetadataWriteError: nothing to do, an input that cannot be used, an output that exists, or no image of the
            folder had any of the text files asked for (so the file would say nothing).
    """
    if request.caption_extension is None and request.tags_extension is None:
        raise MetadataWriteError("choose what to merge: captions, tags, or both")
    check_new_output(request.output)
    metadata = load_metadata(request.in_json) if request.in_json else {}
    merges = [merge_text_files(metadata, request.folder, name, extension, full_path=request.full_path,
                               recursive=request.recursive)
              for name, extension in ((CAPTION, request.caption_extension), (TAGS, request.tags_extension))
              if extension is not None]
    if not any(merge.merged for merge in merges):
        wanted = " or ".join(merge.extension for merge in merges)
        raise MetadataWriteError(f"{request.folder}: none of its {merges[0].images} image(s) has a {wanted} file "
                                 "beside it; check the extension, or caption the folder first")
    cleaned = clean_metadata(metadata) if request.clean else None
    write_new_metadata(request.output, metadata)
    return PrepareReport(request.output, len(metadata), merges, cleaned)
