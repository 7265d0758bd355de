"""Where a model named in a config lives: a local file or folder, or a Hugging Face hub id.

The rule is the loaders' (an existing file or folder first, then ``owner/name`` as a hub id), written once here so
that the training run, the cache command, the config checks and the GUI read a location alike. No torch: the GUI
imports this module.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.files import resolve_path
from engine.models.single_file import SINGLE_FILE_SUFFIXES

__all__ = ["looks_like_hub_id", "model_location"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(location: str) -> bool:
    """``owner/name`` with no model-file extension: what a hub id looks like (it may still be a missing folder)."""
    return bool(_HUB_ID.match(location)) and Path(location).suffix.lower() not in SINGLE_FILE_SUFFIXES


def model_location(value: str, base_dir: str | Path) -> str:
    """A config path made absolute, except a hub id (``owner/name``) that is not a local path."""
    if not value:
        return ""
    resolved = resolve_path(value, base_dir)
    return value if not resolved.exists() and looks_like_hub_id(value) else str(resolved)
