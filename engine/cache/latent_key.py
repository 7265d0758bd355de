"""The cache key stored with every latent cache entry, and how two keys differ in words.

sd-scripts reuses a cached latent as long as the file name matches and the keys it needs are present (spec §3.4),
so a new VAE, a new resolution or bucket setting, a new resize filter or an edited image all silently train on
stale latents (kohya_ss#1629). Each entry here records everything its latents depend on; reuse requires the
stored key to match what the current settings would produce, and the reason for a mismatch is reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from engine.data.records import ImageRecord

__all__ = ["FORMAT_VERSION", "CacheOptions", "ImageStamp", "LatentKey", "expected_key", "key_mismatch",
           "options_from_params"]

FORMAT_VERSION = 1

# Precision order: a cache encoded at least as precisely as requested is good enough (float32 satisfies all).
_PRECISION = {"float32": 2, "bfloat16": 1, "float16": 1}


@dataclass(frozen=True)
class CacheOptions:
    """The settings of one subset/dataset that shape its latents."""

    flip_aug: bool = False
    bucket_no_upscale: bool = False
    resize_interpolation: str | None = None
    random_crop: bool = False

    def __post_init__(self) -> None:
        if self.random_crop:
            # A random crop differs every step, so no single latent can stand for it (sd-scripts refuses too).
            raise ValueError("random_crop cannot be used with cached latents; turn off random_crop or "
                             "training.cache_latents")


def options_from_params(dataset_params: Mapping[str, Any], subset_params: Mapping[str, Any]) -> CacheOptions:
    """Cache options from a scanned dataset's and subset's effective parameters (see ``engine.data.scan``)."""
    return CacheOptions(
        flip_aug=bool(subset_params.get("flip_aug", False)),
        # With buckets off every image goes to the resolution itself; bucket_no_upscale has no effect then.
        bucket_no_upscale=bool(dataset_params.get("bucket_no_upscale", False))
        and bool(dataset_params.get("enable_bucket", True)),
        resize_interpolation=subset_params.get("resize_interpolation"),
        random_crop=bool(subset_params.get("random_crop", False)),
    )


@dataclass(frozen=True)
class ImageStamp:
    """What identifies an image file's content without reading it: pixel size, byte size, modification time."""

    size: tuple[int, int]
    file_bytes: int
    mtime_ns: int

    @classmethod
    def of(cls, record: ImageRecord) -> ImageStamp:
        stat = os.stat(record.path)
        return cls(tuple(record.size), stat.st_size, stat.st_mtime_ns)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LatentKey:
    """Everything a cached latent depends on. ``None`` in an *expected* key means "not checked"."""

    version: int
    vae: str | None  # VAE identity (weights hash); None when the VAE is not loaded (the doctor)
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_ltrb: tuple[int, int, int, int] | None  # known only once the image is prepared
    flip: bool
    dtype: str | None
    bucket_no_upscale: bool
    resize_interpolation: str | None
    random_crop: bool
    image: ImageStamp

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LatentKey:
        data = json.loads(text)
        names = {field.name for field in fields(cls)}
        if not isinstance(data, dict) or not names <= set(data):
            raise ValueError(f"the cache key lacks {sorted(names - set(data or {}))}")
        image = data["image"]
        return cls(**{
            **{name: data[name] for name in names},
            "bucket": tuple(data["bucket"]), "resized": tuple(data["resized"]),
            "crop_ltrb": None if data["crop_ltrb"] is None else tuple(data["crop_ltrb"]),
            "image": ImageStamp(tuple(image["size"]), image["file_bytes"], image["mtime_ns"]),
        })


def expected_key(record: ImageRecord, options: CacheOptions, *, vae_identity: str | None, dtype: str | None,
                 crop_ltrb: tuple[int, int, int, int] | None = None) -> LatentKey:
    """The key an entry for ``record`` must carry under the current settings.

    Args:
        record: a scanned image with ``bucket`` and ``resized`` set.
        options: its subset's cache options.
        vae_identity: ``LoadedVae.identity``, or None to leave the VAE unchecked.
        dtype: the encoding dtype name ("float32", ...), or None to leave it unchecked.
        crop_ltrb: the crop actually applied, once known (it follows from bucket and resized, so None is safe).

    Raises:
        OSError: the image file cannot be stat'ed.
    """
    if record.bucket is None or record.resized is None:
        raise ValueError(f"{record.path}: no bucket assigned; scan the dataset first")
    return LatentKey(FORMAT_VERSION, vae_identity, tuple(record.bucket), tuple(record.resized),  # type: ignore[arg-type]
                     crop_ltrb, options.flip_aug, dtype, options.bucket_no_upscale, options.resize_interpolation,
                     options.random_crop, ImageStamp.of(record))


def _size(value: tuple[int, ...] | None) -> str:
    return "x".join(str(v) for v in value) if value else "?"


def _dtype_ok(stored: str | None, wanted: str) -> bool:
    return stored == wanted or _PRECISION.get(stored or "", 0) > _PRECISION.get(wanted, 0)


def _flip_ok(stored: bool, wanted: bool) -> bool:
    return stored or not wanted  # extra flipped latents do no harm


def _same(stored: Any, wanted: Any) -> bool:
    return stored == wanted


# Field → (does the stored value satisfy the wanted one, the reason when it does not). Checked in this order, so
# the most fundamental change is reported first.
_CHECKS: dict[str, tuple[Callable[[Any, Any], bool], Callable[[Any, Any], str]]] = {
    "version": (_same, lambda s, w: f"the cache format changed (version {s} → {w})"),
    "image": (_same, lambda s, w: "the image file changed" + (
        f" (now {_size(w.size)}, was {_size(s.size)})" if s.size != w.size else " since it was cached")),
    "vae": (_same, lambda s, w: "the VAE changed"),
    "bucket": (_same, lambda s, w: f"the bucket changed from {_size(s)} to {_size(w)}"),
    "resized": (_same, lambda s, w: f"the resize target changed from {_size(s)} to {_size(w)}"),
    "crop_ltrb": (_same, lambda s, w: f"the crop changed from {s} to {w}"),
    "bucket_no_upscale": (_same, lambda s, w: f"bucket_no_upscale changed from {str(s).lower()} to {str(w).lower()}"),
    "resize_interpolation": (_same, lambda s, w: f"resize_interpolation changed from {s or 'default'} to "
                                                 f"{w or 'default'}"),
    "random_crop": (_same, lambda s, w: "random_crop changed"),
    "flip": (_flip_ok, lambda s, w: "flip_aug was turned on and no flipped latents are stored"),
    "dtype": (_dtype_ok, lambda s, w: f"the encoding precision changed from {s} to {w}"),
}


def key_mismatch(stored: LatentKey, expected: LatentKey) -> str:
    """Why ``stored`` cannot stand in for ``expected``, or "" when it can. Expected ``None`` values are skipped."""
    for name, (satisfied, reason) in _CHECKS.items():
        wanted = getattr(expected, name)
        if wanted is None:
            continue
        have = getattr(stored, name)
        if not satisfied(have, wanted):
            return reason(have, wanted)
    return ""
