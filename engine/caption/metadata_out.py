"""Captions into a fine-tune metadata JSON instead of caption files (`caption --metadata`, the Captioning tab).

A sentence captioner fills each entry's "caption", a tagger its "tags" (CaptionerEntry.metadata_field), keyed as the
metadata tools key them (engine.data.finetune_metadata.image_key), merged into an optional input file. The output is
a new file, checked before any model is loaded and written once at the end; an existing file is never overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.finetune_metadata import check_new_output, image_key, load_metadata, write_new_metadata


@dataclass
class MetadataStore:
    """A CaptionStore (engine.caption.runner) that collects captions into one metadata dict."""

    folder: Path
    output: Path
    field_name: str
    in_json: Path | None = None
    full_path: bool = False
    recursive: bool = False
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Raises MetadataWriteError for an output that exists or an input that cannot be read, before any work."""
        check_new_output(self.output)
        self.metadata = load_metadata(self.in_json) if self.in_json else {}

    def key(self, image: Path) -> str:
        return image_key(image, self.folder, full_path=self.full_path, recursive=self.recursive)

    def has(self, image: Path) -> bool:
        return bool(str(self.metadata.get(self.key(image), {}).get(self.field_name) or "").strip())

    def existing(self, image: Path) -> str | None:
        value = self.metadata.get(self.key(image), {}).get(self.field_name)
        return None if value is None else str(value)

    def write(self, image: Path, text: str) -> None:
        self.metadata.setdefault(self.key(image), {})[self.field_name] = text

    def save(self) -> Path:
        """Write the metadata to the new output file (raises MetadataWriteError if one appeared meanwhile)."""
        return write_new_metadata(self.output, self.metadata)
