"""`cache_info`: image sizes (and captions) remembered in `<image_dir>/metadata_cache.json` (spec §1.7).

The file has sd-scripts' layout, `{image path: {"caption": str, "resolution": [w, h]}}`, so sd-scripts reads ours.
sd-scripts trusts its file for good once written; ours also records each image's byte size and modification time
and uses an entry only while both match, so an image that was replaced is read again, and the file is rewritten
whenever an image was added, changed or removed. Captions are always read from their files (a caption edit does not
touch the image), and written into the file for sd-scripts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CACHE_NAME = "metadata_cache.json"

__all__ = ["CACHE_NAME", "InfoCache"]


class InfoCache:
    """The cache file of one image folder: read once, looked up per image, written back if anything changed."""

    def __init__(self, folder: Path):
        self.path = folder / CACHE_NAME
        self.entries = _read(self.path)
        self.current: dict[str, dict[str, Any]] = {}
        self.reused = 0

    def size(self, image: Path) -> tuple[int, int] | None:
        """The remembered (width, height) of `image`, if the file is still the one measured."""
        entry = self.entries.get(str(image))
        if not isinstance(entry, dict) or entry.get("file_size") is None:
            return None  # not ours (sd-scripts writes no file signature): measured again
        stat = image.stat()
        resolution = entry.get("resolution")
        if (entry.get("file_size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns) or \
                not (isinstance(resolution, list) and len(resolution) == 2):
            return None
        self.reused += 1
        return int(resolution[0]), int(resolution[1])

    def remember(self, image: Path, size: tuple[int, int], caption: str) -> None:
        stat = image.stat()
        self.current[str(image)] = {"caption": caption, "resolution": list(size), "file_size": stat.st_size,
                                    "mtime_ns": stat.st_mtime_ns}

    def save(self) -> None:
        """Write the folder's entries (images gone since are dropped) when they differ from the file's."""
        if self.current == self.entries:
            return
        temporary = self.path.with_name(f".{CACHE_NAME}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(self.current, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError:
            temporary.unlink(missing_ok=True)  # a read-only folder: training goes on, measuring each time


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # none yet, or damaged: every image is measured and the file written anew
    return data if isinstance(data, dict) else {}
