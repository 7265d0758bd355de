"""Batch edits of existing caption files: add or remove tags, find and replace, prefix and suffix, de-duplicate.

Each edit is a small function from a list of tags (or the raw text) to a new one; `EDITS` applies them in a fixed
order. Only files whose text actually changes are written, atomically; everything else is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.caption.runner import caption_path, find_images, split_tags
from engine.config.choices import dotted_caption_extension
from engine.files import atomic_write_text


@dataclass(frozen=True)
class EditOptions:
    add_tags: tuple[str, ...] = ()  # appended when missing
    remove_tags: tuple[str, ...] = ()  # matched case-insensitively
    replace: tuple[tuple[str, str], ...] = ()  # plain text find -> replace, on the whole caption
    prefix: str = ""  # put first when missing (e.g. a trigger word)
    suffix: str = ""  # put last when missing
    dedupe: bool = False  # drop repeated tags, keeping the first
    separator: str = ", "


@dataclass
class EditSummary:
    changed: dict[Path, tuple[str, str]] = field(default_factory=dict)  # caption file -> (before, after)
    unchanged: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def _replace(text: str, options: EditOptions) -> str:
    for old, new in options.replace:
        text = text.replace(old, new)
    return text


def _remove(tags: list[str], options: EditOptions) -> list[str]:
    unwanted = {tag.strip().lower() for tag in options.remove_tags}
    return [tag for tag in tags if tag.lower() not in unwanted]


def _dedupe(tags: list[str], options: EditOptions) -> list[str]:
    if not options.dedupe:
        return tags
    seen: set[str] = set()
    kept = []
    for tag in tags:
        if tag.lower() not in seen:
            seen.add(tag.lower())
            kept.append(tag)
    return kept


def _add(tags: list[str], options: EditOptions) -> list[str]:
    present = {tag.lower() for tag in tags}
    return tags + [tag.strip() for tag in options.add_tags if tag.strip() and tag.strip().lower() not in present]


def _affixes(tags: list[str], options: EditOptions) -> list[str]:
    prefix, suffix = options.prefix.strip(), options.suffix.strip()
    if prefix and (not tags or tags[0].lower() != prefix.lower()):
        tags = [prefix, *[tag for tag in tags if tag.lower() != prefix.lower()]]
    if suffix and (not tags or tags[-1].lower() != suffix.lower()):
        tags = [*[tag for tag in tags if tag.lower() != suffix.lower()], suffix]
    return tags


# Tag-level edits, in the order they apply (after text replacement).
EDITS: tuple[Callable[[list[str], EditOptions], list[str]], ...] = (_remove, _dedupe, _add, _affixes)


def edit_caption(text: str, options: EditOptions) -> str:
    """The caption after every edit; a caption whose tags are untouched keeps its exact text."""
    replaced = _replace(text.rstrip("\n"), options)
    tags = split_tags(replaced, options.separator)
    edited = tags
    for edit in EDITS:
        edited = edit(edited, options)
    return replaced if edited == tags else options.separator.join(edited)


def edit_folder(folder: str | Path, options: EditOptions, *, caption_extension: str = ".txt",
                recursive: bool = False, dry_run: bool = False) -> EditSummary:
    """Apply `options` to the caption file of every image in `folder`; images without one are ignored.

    Raises:
        ValueError: `caption_extension` is not one of engine.config.choices.CAPTION_EXTENSIONS.
    """
    dotted_caption_extension(caption_extension)  # refused even when the folder has no images
    summary = EditSummary()
    for image in find_images(Path(folder), recursive):
        path = caption_path(image, caption_extension)
        if not path.is_file():
            continue
        try:
            before = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            summary.failed.append((path, "not UTF-8 text; re-save it as UTF-8"))
            continue
        after = edit_caption(before, options)
        if after == before.rstrip("\n"):
            summary.unchanged.append(path)
            continue
        summary.changed[path] = (before.rstrip("\n"), after)
        if not dry_run:
            atomic_write_text(path, after + "\n")
    return summary
