"""Finding presets: the shipped ones in presets/, and the user's own in presets/user/."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.config.io import PRESET_FORMAT

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "presets"
USER_DIR = SHIPPED_DIR / "user"


@dataclass(frozen=True)
class PresetEntry:
    title: str
    path: Path
    description: str
    is_user: bool


def list_presets(shipped_dir: Path = SHIPPED_DIR, user_dir: Path = USER_DIR) -> list[PresetEntry]:
    entries = []
    for folder, is_user in ((shipped_dir, False), (user_dir, True)):
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue  # a broken file is reported when the user tries to load it, not while listing
            if isinstance(document, dict) and document.get("format") == PRESET_FORMAT:
                title = document.get("title") or path.stem
                entries.append(PresetEntry(("my: " if is_user else "") + title, path,
                                           document.get("description", ""), is_user))
    return entries


def preset_path(choice: str, user_dir: Path = USER_DIR, shipped_dir: Path = SHIPPED_DIR) -> Path:
    """The preset file a dropdown choice names, only when it is one of the listed presets: the page sends the
    choice, and an HTTP client could send any path instead.

    Raises:
        ValueError: the choice is not a listed preset.
    """
    for entry in list_presets(shipped_dir, user_dir):
        if str(entry.path) == choice:
            return entry.path
    raise ValueError(f"{choice} is not one of the presets; choose one from the list")


def preset_file_name(title: str) -> str:
    """A safe file name for a user preset title: 'My SDXL style!' -> 'my-sdxl-style.json'."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    if not slug:
        raise ValueError("give the preset a name with at least one letter or digit")
    return f"{slug}.json"
