"""The cache key stored with every latent cache entry, and how two keys differ in words.

sd-scripts reuses a cached latent as long as the file name matches and the keys it needs are present (spec §3.4),
so a new VAE, a new resolution or bucket setting, a new resize filter or an edited image all silently train on
stale latents (kohya_ss#1629). Each entry here records everything its latents depend on; reuse requires the
stored key to match what the current settings would produce, and the reason for a mismatch is reported. That
includes the loss mask (masked loss): its source, and for a mask file the file's stamp, so an edited mask is
re-cached.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from engine.data.records import ImageRecord

__all__ = ["FORMAT_VERSION", "CacheOptions", "ImageStamp", "LatentKey", "MaskStamp", "expected_key", "key_mismatch",
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


_MASK_NAMES = {"none": "no mask", "alpha": "the alpha channel", "file": "a mask file"}


@dataclass(frozen=True)
class MaskStamp:
    """Which loss mask an entry stores (masked loss): none, the image's alpha channel (the image's own stamp covers
    it), or a mask file with the stamp of its content."""

    kind: str = "none"  # "none", "alpha" or "file"
    file: str | None = None
    stamp: ImageStamp | None = None

    @classmethod
    def of(cls, record: ImageRecord) -> MaskStamp:
        source = record.mask
        if source is None or source.kind == "alpha":
            return cls("none" if source is None else "alpha")
        stat = os.stat(source.path)
        return cls("file", str(source.path), ImageStamp(tuple(record.size), stat.st_size,  # type: ignore[arg-type]
                                                        stat.st_mtime_ns))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MaskStamp:
        """From a stored key; keys written before masks existed have none, and hold no mask."""
        if not data:
            return cls()
        stamp = data.get("stamp")
        return cls(data["kind"], data.get("file"), None if stamp is None else
                   ImageStamp(tuple(stamp["size"]), stamp["file_bytes"], stamp["mtime_ns"]))  # type: ignore[arg-type]


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
    mask: MaskStamp = MaskStamp()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LatentKey:
        data = json.loads(text)
        names = {field.name for field in fields(cls)} - {"mask"}
        if not isinstance(data, dict) or not names <= set(data):
            raise ValueError(f"the cache key lacks {sorted(names - set(data or {}))}")
        image = data["image"]
        return cls(**{
            **{name: data[name] for name in names},
            "mask": MaskStamp.from_dict(data.get("mask")),
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
                     options.random_crop, ImageStamp.of(record), MaskStamp.of(record))


def _size(value: tuple[int, ...] | None) -> str:
    return "x".join(str(v) for v in value) if value else "?"


def _dtype_ok(stored: str | None, wanted: str) -> bool:
    return stored == wanted or _PRECISION.get(stored or "", 0) > _PRECISION.get(wanted, 0)


def _flip_ok(stored: bool, wanted: bool) -> bool:
    return stored or not wanted  # extra flipped latents do no harm


def _same(stored: Any, wanted: Any) -> bool:
    return stored == wanted


def _mask_ok(stored: MaskStamp, wanted: MaskStamp) -> bool:
    return wanted.kind == "none" or stored == wanted  # a stored mask nobody asks for does no harm


def _mask_change(stored: MaskStamp, wanted: MaskStamp) -> str:
    if stored.kind == wanted.kind:
        return "the mask file changed since it was cached" if stored.file == wanted.file else \
            f"the mask file changed from {stored.file} to {wanted.file}"
    return f"the loss mask changed from {_MASK_NAMES[stored.kind]} to {_MASK_NAMES[wanted.kind]}"


# Field → (does the stored value satisfy the wanted one, the reason when it does not). Checked in this order, so
# the most fundamental change is reported first.
_CHECKS: dict[str, tuple[Callable[[Any, Any], bool], Callable[[Any, Any], str]]] = {
    "version": (_same, lambda s, w: f"the cache format changed (version {s} → {w})"),
    "image": (_same, lambda s, w: "the image file changed" + (
        f" (now {_size(w.size)}, was {_size(s.size)})" if s.size != w.size else " since it was cached")),
    "mask": (_mask_ok, _mask_change),
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
