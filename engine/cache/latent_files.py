"""Latent cache files: where they live, what they hold, and whether one can be reused.

One ``.npz`` per image and bucket, ``<image stem>_<bucket w>x<bucket h>_<sd|sdxl>.npz``, beside the image or under
a cache folder. The arrays are sd-scripts' (``latents`` unscaled, ``latents_flipped``, ``original_size``,
``crop_ltrb``, and ``alpha_mask`` with masked loss: float32 [bucket h, bucket w] in 0..1; spec §3.3) plus
``cache_key``, a JSON string (see ``latent_key``). sd-scripts can read our files; files without a ``cache_key``
(sd-scripts', or anything else) are never trusted.

The bucket is part of the name so that one image can be cached for two datasets of different resolutions. A file
of the same image for a bucket no current dataset uses is *superseded*: it is reported as stale ("the bucket
changed from ... to ...") and removed once the new entry is written.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.cache.entries import READ_ERRORS, Status, check_finite, read_key_and_members
from engine.cache.entries import entry_status as shared_entry_status
from engine.cache.latent_key import LatentKey, key_mismatch
from engine.data.records import Finding
from engine.files import atomic_write_bytes
from engine.models.families import FAMILY_INFO

__all__ = ["CachedLatents", "EntryState", "cache_path", "entry_status", "inspect_entry", "load_entry",
           "read_key", "write_entry"]

# One AE, one cache: families sharing an AE share the files.
FAMILY_SUFFIX = {name: info.latent_cache_suffix for name, info in FAMILY_INFO.items()}
STALE_HINT = "it will be rebuilt; run cache-latents to rebuild it now"
REBUILD = "rebuild the cache with `python -m engine cache-latents CONFIG --force` (it re-encodes every entry)"


@dataclass
class CachedLatents:
    """One cache entry as arrays: float32 latents (C, H/8, W/8), unscaled."""

    latents: np.ndarray
    latents_flipped: np.ndarray | None
    original_size: tuple[int, int]  # (w, h)
    crop_ltrb: tuple[int, int, int, int]  # in resized-image pixels
    key: LatentKey | None = None
    # The loss mask, float32 (bucket_h, bucket_w) in 0..1 as sd-scripts stores it (1 = trained); None without one.
    # Unflipped: a flipped step mirrors it, as sd-scripts does.
    alpha_mask: np.ndarray | None = None


@dataclass(frozen=True)
class EntryState:
    """Where an entry goes and whether the file there (or a superseded one) can be reused."""

    path: Path
    status: Status
    reason: str
    superseded: tuple[Path, ...] = ()  # our files of the same image for buckets no longer used


def cache_path(image: Path, bucket: tuple[int, int], family: str, cache_dir: Path | None = None) -> Path:
    """The cache file of ``image`` in ``bucket``: beside the image, or in ``cache_dir``.

    In a cache folder, images from different folders may share a name, so each image folder gets its own
    sub-folder named after it plus a short hash of its absolute path.
    """
    return cache_folder(image, cache_dir) / f"{image.stem}_{bucket[0]}x{bucket[1]}_{FAMILY_SUFFIX[family]}.npz"


def cache_folder(image: Path, cache_dir: Path | None = None) -> Path:
    """Where cache files of ``image`` live: its own folder, or a sub-folder of ``cache_dir`` per image folder.

    Shared by every cache (latents, text-encoder outputs) so one image's files always sit together.
    """
    if cache_dir is None:
        return image.parent
    folder = image.resolve().parent
    tag = hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:10]
    return Path(cache_dir) / f"{folder.name}-{tag}"


def write_entry(path: Path, entry: CachedLatents, key: LatentKey) -> None:
    """Write an entry atomically: a reader never sees a half-written file."""
    arrays = {
        "latents": np.ascontiguousarray(entry.latents, dtype=np.float32),
        "original_size": np.asarray(entry.original_size, dtype=np.int64),
        "crop_ltrb": np.asarray(entry.crop_ltrb, dtype=np.int64),
        "cache_key": np.asarray(key.to_json()),
    }
    if entry.latents_flipped is not None:
        arrays["latents_flipped"] = np.ascontiguousarray(entry.latents_flipped, dtype=np.float32)
    if entry.alpha_mask is not None:
        arrays["alpha_mask"] = np.ascontiguousarray(entry.alpha_mask, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def read_key(path: Path) -> LatentKey | None:
    """The stored key, or None for a file without one (another tool's)."""
    return read_key_and_members(path, LatentKey.from_json)[0]


def load_entry(path: Path) -> CachedLatents:
    """Read a cache entry.

    Raises:
        OSError, ValueError: the file is missing, damaged or lacks the latents; NonFiniteEntry (a ValueError
            naming the file) when the latents hold NaN or infinity.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            key = LatentKey.from_json(str(npz["cache_key"])) if "cache_key" in files else None
            flipped = npz["latents_flipped"] if "latents_flipped" in files else None
            mask = npz["alpha_mask"] if "alpha_mask" in files else None
            entry = CachedLatents(npz["latents"], flipped, tuple(int(v) for v in npz["original_size"]),
                                  tuple(int(v) for v in npz["crop_ltrb"]), key, mask)  # type: ignore[arg-type]
    except (KeyError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path}: not a complete latent cache file ({error})") from error
    check_finite(path, {"latents": entry.latents, "latents_flipped": entry.latents_flipped}, "latents", REBUILD)
    return entry


def entry_status(path: Path, key: LatentKey) -> tuple[Status, str]:
    """Whether the file at ``path`` holds latents valid for ``key``.

    Returns:
        ("ok", ""), ("missing", why), ("stale", what changed) or ("unreadable", what is wrong).
    """
    required = ["latents", "latents_flipped"] if key.flip else ["latents"]
    if key.mask.kind != "none":
        required.append("alpha_mask")
    return shared_entry_status(path, key, parse_key=LatentKey.from_json, mismatch=key_mismatch, required=required)


def _siblings(path: Path) -> list[Path]:
    """Our-style names for the same image and family with another bucket (sd-scripts pads sizes with zeros)."""
    match = re.fullmatch(r"(.+)_\d+x\d+_(sd|sdxl)\.npz", path.name)
    if match is None or not path.parent.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(match[1])}_[1-9]\d*x[1-9]\d*_{match[2]}\.npz")
    return sorted(p for p in path.parent.iterdir() if p != path and pattern.fullmatch(p.name))


def _superseded(path: Path, in_use: Collection[Path]) -> list[tuple[Path, LatentKey]]:
    found = []
    for sibling in _siblings(path):
        if sibling in in_use:
            continue  # another dataset caches this image in that bucket
        try:
            key = read_key(sibling)
        except READ_ERRORS:
            continue
        if key is not None:  # only files we wrote; anything else is left alone
            found.append((sibling, key))
    return found


def inspect_entry(path: Path, key: LatentKey, in_use: Collection[Path] = ()) -> EntryState:
    """:func:`entry_status`, plus superseded files of the same image for a bucket that ``in_use`` lacks.

    A missing entry with a superseded sibling is "stale": its settings changed (typically the bucket).
    """
    status, reason = entry_status(path, key)
    superseded = _superseded(path, in_use) if status != "ok" else []
    if status == "missing" and superseded:
        status, reason = "stale", key_mismatch(superseded[0][1], key) or "the cache settings changed"
    return EntryState(path, status, reason, tuple(sibling for sibling, _ in superseded))


def remove_superseded(state: EntryState) -> None:
    for sibling in state.superseded:
        sibling.unlink(missing_ok=True)


def stale_findings(states: Iterable[EntryState]) -> list[Finding]:
    """One warning per cache file that does not match the current settings."""
    findings = []
    for state in states:
        if state.status not in ("stale", "unreadable"):
            continue
        where = state.superseded[0] if state.superseded and not state.path.exists() else state.path
        findings.append(Finding("warning", "cache-stale", str(where), state.reason, STALE_HINT))
    return findings
