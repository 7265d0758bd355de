"""Captioning a folder: which images, what to write, and never touching a caption file unless the mode says so.

Images are opened in worker threads while the captioner runs on the previous batch. Write modes:
  skip       (default) images that already have a caption file are left alone;
  overwrite  every caption file is written anew;
  append     new tags are added to the existing caption, without duplicates (for taggers; a sentence
             captioner's text is added as one more piece).
A file is only written when its content changes, and always atomically. Instead of caption files, the captions can
go into a fine-tune metadata JSON (engine.caption.metadata_out.MetadataStore): the runner writes through a store.
Every image Create project accepts is captioned (GIF, TIFF, ... too), so captions made before the import travel
with the pictures; the progress counts every image, skipped and failed ones included, so it ends at n/n.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image, ImageOps

from engine.caption.base import Captioner, CaptionOutput
from engine.config.choices import dotted_caption_extension
from engine.data.images import IMAGE_EXTENSIONS
from engine.data.project import CONVERTED_EXTENSIONS, register_optional_formats
from engine.events import Progress
from engine.files import atomic_write_text

WriteMode = Literal["skip", "overwrite", "append"]
# What Create project takes (and converts to PNG where training cannot read it): captions made on the original folder
# are copied along with the pictures.
CAPTIONED_EXTENSIONS: frozenset[str] = IMAGE_EXTENSIONS | CONVERTED_EXTENSIONS


@dataclass(frozen=True)
class FolderOptions:
    """How a folder is captioned, whatever the captioner."""

    caption_extension: str = ".txt"
    recursive: bool = False
    mode: WriteMode = "skip"
    prefix: str = ""  # e.g. the trigger word, put first
    suffix: str = ""
    separator: str = ", "  # joins prefix, caption and suffix, and splits tags when appending
    dry_run: bool = False
    batch_size: int = 1
    workers: int = 2

    def __post_init__(self) -> None:
        dotted_caption_extension(self.caption_extension)  # a ValueError before any model is loaded or file read


@dataclass
class CaptionSummary:
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)  # the new text equals the file's: nothing written
    skipped: list[Path] = field(default_factory=list)  # already captioned, mode "skip"
    failed: list[tuple[Path, str]] = field(default_factory=list)
    planned: dict[Path, str] = field(default_factory=dict)  # every caption decided, written or (dry run) not
    tag_counts: Counter = field(default_factory=Counter)

    def line(self, dry_run: bool = False) -> str:
        verb = "would write" if dry_run else "written"
        count = len(self.planned) - len(self.unchanged) if dry_run else len(self.written)
        return (f"{verb}: {count}, unchanged: {len(self.unchanged)}, skipped (already captioned): "
                f"{len(self.skipped)}, failed: {len(self.failed)}")


def find_images(folder: Path, recursive: bool) -> list[Path]:
    """The images of `folder` to caption: every format Create project accepts (CAPTIONED_EXTENSIONS), sorted."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in pattern if path.is_file() and path.suffix.lower() in CAPTIONED_EXTENSIONS
                  and not path.name.startswith("."))


def caption_path(image: Path, extension: str) -> Path:
    """The caption file of `image`: '<stem><extension>', the extension one of the text extensions allowed.

    Raises:
        ValueError: `extension` is not in engine.config.choices.CAPTION_EXTENSIONS (e.g. '.pt'), so captioning and
            editing can never write a file that another program would load as code or data.
    """
    return image.with_name(image.stem + dotted_caption_extension(extension))


def split_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.replace("\n", separator).split(separator.strip() or ",") if tag.strip()]


def compose(output: CaptionOutput, existing: str | None, options: FolderOptions) -> str:
    """The caption to write: prefix + new caption + suffix, merged into the existing one when appending."""
    pieces = [p for p in (options.prefix.strip(), output.text.strip(), options.suffix.strip()) if p]
    if options.mode != "append" or not existing or not existing.strip():
        return options.separator.join(pieces)
    merged = split_tags(existing, options.separator)
    seen = {tag.lower() for tag in merged}
    for tag in split_tags(options.separator.join(pieces), options.separator):
        if tag.lower() not in seen:
            merged.append(tag)
            seen.add(tag.lower())
    return options.separator.join(merged)


def _open(path: Path) -> Image.Image:
    """The image as displayed (EXIF orientation applied), in its own mode: taggers need the alpha channel. An animated
    GIF gives its first frame, as Create project's conversion does."""
    register_optional_formats()
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def _loader(captioner: Captioner) -> Callable[[Path], Any]:
    """Open an image, and preprocess it too when the captioner can do that apart from inference."""
    preprocess = getattr(captioner, "preprocess", None)
    if preprocess is None or not hasattr(captioner, "caption_preprocessed"):
        return _open
    return lambda path: preprocess(_open(path))


def _batches(paths: Sequence[Path], load: Callable[[Path], Any], options: FolderOptions, pool: ThreadPoolExecutor,
             summary: CaptionSummary) -> Iterator[list[tuple[Path, Any]]]:
    """Batches of loaded images; loading runs ahead in the pool while the caller captions."""
    futures: list[tuple[Path, Future]] = [(path, pool.submit(load, path)) for path in paths]
    batch: list[tuple[Path, Any]] = []
    for path, future in futures:
        try:
            batch.append((path, future.result()))
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported by name and skipped
            summary.failed.append((path, f"cannot be opened as an image ({type(error).__name__}: {error})"))
            continue
        if len(batch) == options.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_existing(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except UnicodeDecodeError:
        return None


class CaptionStore(Protocol):
    """Where captions go: caption files beside the images, or one metadata file (engine.caption.metadata_out)."""

    def has(self, image: Path) -> bool:
        """Whether the image is captioned already (mode "skip" leaves it alone)."""
        ...

    def existing(self, image: Path) -> str | None:
        """The image's current caption (to append to, or to tell that nothing changes), None when there is none."""
        ...

    def write(self, image: Path, text: str) -> None: ...


@dataclass(frozen=True)
class CaptionFiles:
    """The default store: `<stem><extension>` beside each image, written atomically."""

    extension: str

    def has(self, image: Path) -> bool:
        return caption_path(image, self.extension).exists()

    def existing(self, image: Path) -> str | None:
        return _read_existing(caption_path(image, self.extension))

    def write(self, image: Path, text: str) -> None:
        atomic_write_text(caption_path(image, self.extension), text + "\n")


def run_captioning(folder: str | Path, captioner: Captioner, options: FolderOptions,
                   progress: Progress | None = None, store: CaptionStore | None = None) -> CaptionSummary:
    """Caption every image of `folder` with `captioner` as `options` say, into `store` (default: caption files);
    see the module docstring. `progress` counts every image found, so it ends at its total."""
    store = store or CaptionFiles(options.caption_extension)
    summary = CaptionSummary()
    todo = []
    for image in find_images(Path(folder), options.recursive):
        if options.mode == "skip" and store.has(image):
            summary.skipped.append(image)
        else:
            todo.append(image)
    counted = _count(progress, summary, 0)
    load = _loader(captioner)
    infer = captioner.caption_preprocessed if load is not _open else captioner.caption  # type: ignore[attr-defined]
    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
        for batch in _batches(todo, load, options, pool, summary):
            outputs = infer([item for _, item in batch])
            for (path, _), output in zip(batch, outputs, strict=True):
                _record(path, output, options, summary, store)
            counted = _count(progress, summary, counted)
    _count(progress, summary, counted)  # images that failed after the last batch
    return summary


def _count(progress: Progress | None, summary: CaptionSummary, counted: int) -> int:
    """Advance `progress` to every image decided so far (skipped, failed or captioned); returns that number."""
    decided = len(summary.skipped) + len(summary.failed) + len(summary.planned)
    if progress is not None and decided > counted:
        progress.update(decided - counted)
    return decided


def _record(image: Path, output: CaptionOutput, options: FolderOptions, summary: CaptionSummary,
            store: CaptionStore) -> None:
    existing = store.existing(image)
    text = compose(output, existing, options)
    summary.planned[image] = text
    summary.tag_counts.update(output.tags)
    if existing is not None and existing.rstrip("\n") == text:
        summary.unchanged.append(image)
    elif not options.dry_run:
        store.write(image, text)
        summary.written.append(image)
