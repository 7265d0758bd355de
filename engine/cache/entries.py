"""What every cache file shares: an .npz holding its arrays and a JSON `cache_key`, and one rule for reuse.

The latent cache and the text-encoder cache differ only in their key type and the arrays an entry must hold.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

Status = Literal["ok", "missing", "stale", "unreadable"]
Key = TypeVar("Key")

# What a damaged or foreign .npz raises while being opened or read.
READ_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError)


class NonFiniteEntry(ValueError):
    """A cache file whose arrays hold NaN or infinity: training on it would turn the loss and the weights NaN."""

    def __init__(self, path: Path, what: str, rebuild: str) -> None:
        super().__init__(f"{path}: the cached {what} hold NaN or infinite values, so this cache file is damaged; "
                         f"delete it, or {rebuild}")
        self.path = path


def all_finite(*arrays: np.ndarray | None) -> bool:
    """Whether every one of `arrays` (None skipped) holds only finite numbers."""
    return all(array is None or bool(np.isfinite(array).all()) for array in arrays)


def check_finite(path: Path, arrays: dict[str, np.ndarray | None], what: str, rebuild: str) -> None:
    """Raise NonFiniteEntry when any of `arrays` (None entries skipped) holds NaN or infinity."""
    if not all_finite(*arrays.values()):
        raise NonFiniteEntry(path, what, rebuild)


def read_key_and_members(path: Path, parse_key: Callable[[str], Key]) -> tuple[Key | None, list[str]]:
    """The stored key (None when the file has none) and the names of the arrays, decompressing only the key."""
    with np.load(path, allow_pickle=False) as npz:  # lazy: members are read on access only
        members = list(npz.files)
        return (parse_key(str(npz["cache_key"])) if "cache_key" in members else None), members


def entry_status(path: Path, key: Key, *, parse_key: Callable[[str], Key], mismatch: Callable[[Key, Key], str],
                 required: Sequence[str]) -> tuple[Status, str]:
    """Whether the file at `path` is valid for `key`: ("ok", ""), or a status and the reason for a user.

    A file whose settings differ is "stale" (mismatch says what changed); one with matching settings but
    missing arrays, or that cannot be read, is "unreadable"; no file is "missing".
    """
    if not path.is_file():
        return "missing", "not cached yet"
    try:
        stored, members = read_key_and_members(path, parse_key)
    except READ_ERRORS as error:
        return "unreadable", f"the cache file cannot be read ({error})"
    if stored is None:
        return "stale", "the file has no cache key (written by another tool or an older version)"
    reason = mismatch(stored, key)
    if reason:
        return "stale", reason
    lacking = [name for name in required if name not in members]
    return ("unreadable", f"the cache file lacks {', '.join(lacking)}") if lacking else ("ok", "")
