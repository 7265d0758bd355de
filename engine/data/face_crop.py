"""Face-crop augmentation (`face_crop_aug_range`, sd-scripts' `crop_target`, spec §1.7 / §2).

An image whose file name ends in `_<cx>_<cy>_<w>_<h>` (the face's centre and size in pixels, as sd-scripts' face
detection script names its crops) is scaled so that the face is between `range[0]` and `range[1]` times smaller
than the training resolution's short side, at a random scale within that range each step, then cut to the
resolution around the face. Only with buckets off (the config rules refuse it with buckets on, and with cached
latents, which would freeze one crop). Images without a face box in their name are prepared as usual.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.records import DatasetPlan
from engine.data.resize import PreparedImage, resize_image

FaceBox = tuple[int, int, int, int]  # centre x, centre y, width, height, in the image's pixels

__all__ = ["FaceBox", "face_box", "face_crop", "face_crop_range_used"]


def face_box(path: str | PathLike[str]) -> FaceBox | None:
    """The face box a file name carries (`name_cx_cy_w_h.png`), or None (fewer than 5 `_` tokens, not numbers,
    or a centre x of 0, which sd-scripts treats as "no face"; also a box of no width or height, on which sd-scripts
    divides by zero: `photo_2023_01_0_0.png` is a date, not a face)."""
    tokens = Path(path).stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, width, height = (int(token) for token in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, width, height) if cx > 0 and width > 0 and height > 0 else None


def face_crop(image: Image.Image, box: FaceBox, target: tuple[int, int], crop_range: Sequence[float], *,
              random_crop: bool, rng: random.Random, interpolation: str | None = None,
              mask: Image.Image | None = None) -> PreparedImage:
    """`image` scaled and cut to `target` (width, height) around the face, drawing from `rng` as sd-scripts draws.
    A loss `mask` ("L", the image's size) is scaled and cut with it.

    One deliberate difference: sd-scripts stops with an assertion when the image is smaller than the target
    (it never enlarges here); this enlarges it just enough to cover the target instead.
    """
    target_w, target_h = target
    width, height = image.size
    if (width, height) == (target_w, target_h):
        return _prepared(np.array(image.convert("RGB"), dtype=np.uint8), target,
                         None if mask is None else np.array(mask, dtype=np.uint8))
    cx, cy, face_w, face_h = box
    face_size = max(face_w, face_h)
    short_side = min(target_w, target_h)
    cover = max(target_h / height, target_w / width)  # the scale at which the image just covers the target
    min_scale = min(1.0, max(cover, short_side / (face_size * crop_range[1])))
    max_scale = min(1.0, max(min_scale, short_side / (face_size * crop_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    scale = max(scale, cover)  # see the docstring: never smaller than the target
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    resized = resize_image(image.convert("RGB"), (new_w, new_h), interpolation)
    face_x, face_y = int(cx * scale + 0.5), int(cy * scale + 0.5)
    top = _start(target_h, new_h, face_y, face_size, short_side, crop_range, random_crop, rng)
    left = _start(target_w, new_w, face_x, face_size, short_side, crop_range, random_crop, rng)
    cut = (left, top, left + target_w, top + target_h)
    pixels = np.array(resized.crop(cut), dtype=np.uint8)
    cut_mask = None if mask is None else np.array(resize_image(mask, (new_w, new_h), interpolation).crop(cut),
                                                  dtype=np.uint8)
    return _prepared(pixels, target, cut_mask)


def _start(size: int, length: int, face: int, face_size: int, short_side: int, crop_range: Sequence[float],
           random_crop: bool, rng: random.Random) -> int:
    """Where the cut starts on one axis: centred on the face, moved at random as sd-scripts does, kept inside."""
    start = face - size // 2
    if random_crop:
        # Anywhere from -reach to +reach, most often near the face (sum of two uniform draws), to include background.
        reach = max(length - face, face)
        start += rng.randint(0, reach) + rng.randint(0, reach) - reach
    elif crop_range[0] != crop_range[1] and face_size > short_side // 10 and face_size >= 40:
        start += rng.randint(-face_size // 20, face_size // 20)
    return max(0, min(start, length - size))


def _prepared(pixels: np.ndarray, target: tuple[int, int], mask: np.ndarray | None) -> PreparedImage:
    # As sd-scripts without buckets: the "original size" is the cut itself and the crop starts at (0, 0).
    width, height = target
    return PreparedImage(pixels=pixels, original_size=(width, height), crop_ltrb=(0, 0, width, height),
                         bucket=(width, height), flipped=False, resized=(width, height), mask=mask)


def face_crop_range_used(datasets: Sequence[DatasetPlan]) -> tuple[float, float] | None:
    """The face-crop range that training applied (for the metadata), or None when it cropped no image: a subset
    sets it, its dataset has buckets off, and one of its images has a face box in its name."""
    for dataset in datasets:
        if dataset.params.get("enable_bucket"):
            continue
        for subset in dataset.subsets:
            crop_range = subset.params.get("face_crop_aug_range")
            if crop_range is not None and any(face_box(record.path) for record in subset.records):
                return float(crop_range[0]), float(crop_range[1])
    return None
