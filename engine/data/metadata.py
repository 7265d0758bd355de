"""Fine-tuning metadata (.json / .jsonl, spec §1.9): captions, tags and sizes keyed by image.

Keys may be full paths, paths relative to image_dir, or bare stems (what merge_captions_to_metadata.py writes
without --full_path); all three resolve here, which sd-scripts lost at one point (its PR #2327).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data.images import IMAGE_EXTENSIONS


class MetadataError(Exception):
    """A metadata file that cannot be read, with the file (and line) named."""


@dataclass(frozen=True)
class MetadataEntry:
    key: str
    caption: str
    tags: str
    image_size: tuple[int, int] | None


def _entry(key: str, value: dict[str, Any]) -> MetadataEntry:
    size = value.get("image_size")
    image_size = (int(size[0]), int(size[1])) if isinstance(size, list | tuple) and len(size) == 2 else None
    return MetadataEntry(key, str(value.get("caption") or ""), str(value.get("tags") or ""), image_size)


def read_metadata(path: Path) -> list[MetadataEntry]:
    """Entries of a .json ({key: {caption, tags, image_size}}) or .jsonl ({image_path, caption, ...} per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MetadataError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    if path.suffix.lower() == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise MetadataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(value, dict) or "image_path" not in value:
                raise MetadataError(f"{path}, line {number}: each line needs an object with \"image_path\"")
            entries.append(_entry(str(value["image_path"]), value))
        return entries
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MetadataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        raise MetadataError(f"{path}: expected an object mapping image keys to {{caption, tags, image_size}}")
    return [_entry(str(key), value if isinstance(value, dict) else {}) for key, value in data.items()]


def resolve_image(key: str, image_dir: Path | None) -> Path | None:
    """The image a metadata key names: a full path, a path relative to image_dir, or a stem in image_dir."""
    candidate = Path(key).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    if image_dir is None:
        return None
    relative = image_dir / candidate
    if relative.is_file():
        return relative
    for extension in IMAGE_EXTENSIONS:
        for spelled in (extension, extension.upper()):
            stem_match = image_dir / f"{key}{spelled}"
            if stem_match.is_file():
                return stem_match
    return None


def metadata_caption(entry: MetadataEntry, separator: str, *, enable_wildcard: bool) -> str:
    """caption + separator + tags (spec §1.9); with wildcards the tags are appended to every caption line."""
    tags = entry.tags.strip()
    if not tags:
        return entry.caption
    if not entry.caption:
        return tags
    if enable_wildcard:
        flat_tags = tags.replace("\n", separator)
        return "\n".join(f"{line}{separator}{flat_tags}" for line in entry.caption.splitlines())
    return f"{entry.caption}{separator}{tags}"
