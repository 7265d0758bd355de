"""From a decoded image to training pixels: resize to the bucket's cover size, crop, flip, colour-augment, tensor.

Follows sd-scripts' `trim_and_resize_if_required` (spec §2.3) with one deliberate fix: `crop_ltrb` records the
crop actually applied, in resized-image pixels, instead of the fit-inside geometry sd-scripts reports
(issue #1443). SDXL's crop_coords_top_left conditioning should receive (top, left) of this box.

A loss mask (masked loss) is resized with the image's filter, cut with the image's box and flipped with it, so
each mask pixel stays on its image pixel; sd-scripts instead stretches a mask folder's image to the bucket.
"""

from __future__ import annotations

import random
from dataclasses import replace
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from engine.data.buckets import BucketAssignment
from engine.data.face_crop import face_box, face_crop
from engine.data.images import UnreadableImage, load_mask, load_rgb_and_alpha, load_rgb_image
from engine.data.records import MaskSource
from engine.data.resize import PreparedImage, resize_image

if TYPE_CHECKING:
    import torch

_HUE_SHIFT_LIMIT = 8 * 256 / 180  # sd-scripts shifts ±8 on OpenCV's 0..180 hue scale; PIL's HSV hue is 0..255
_GAMMA_RANGE = (0.95, 1.05)
_COLOR_AUG_PROBABILITY = 0.33


def resize_and_crop(image: Image.Image, assignment: BucketAssignment, *, random_crop: bool = False,
                    rng: random.Random | None = None, interpolation: str | None = None,
                    mask: Image.Image | None = None) -> PreparedImage:
    """Resize to `assignment.resized`, then crop the over-long axis to the bucket: centred, or at random.

    A loss `mask` ("L", the image's size) is resized with the same filter and cut with the same box.
    """
    bucket_w, bucket_h = assignment.bucket
    resized_w, resized_h = assignment.resized
    if resized_w < bucket_w or resized_h < bucket_h:
        raise ValueError(f"resized size {resized_w}x{resized_h} is smaller than the bucket {bucket_w}x{bucket_h}")
    resized = resize_image(image, assignment.resized, interpolation)
    if random_crop and rng is None:
        rng = random.Random()
    # x before y, as sd-scripts draws them, so a seeded rng gives the same offsets in both.
    left = _offset(resized_w - bucket_w, random_crop, rng)
    top = _offset(resized_h - bucket_h, random_crop, rng)
    box = (left, top, left + bucket_w, top + bucket_h)
    pixels = _cut(resized, box)
    cut_mask = None if mask is None else _cut(resize_image(mask, assignment.resized, interpolation), box)
    return PreparedImage(pixels=pixels, original_size=image.size, crop_ltrb=box, bucket=(bucket_w, bucket_h),
                         flipped=False, resized=(resized_w, resized_h), mask=cut_mask)


def _cut(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    # np.array, not asarray: arrays that wrap PIL's bytes are read-only, and callers may edit pixels in place.
    return np.array(image.crop(box) if box != (0, 0, *image.size) else image, dtype=np.uint8)


def _offset(excess: int, random_crop: bool, rng: random.Random | None) -> int:
    if excess <= 0:
        return 0
    return rng.randint(0, excess) if random_crop and rng is not None else excess // 2


def flip_horizontal(prepared: PreparedImage) -> PreparedImage:
    """Mirror the pixels and the crop box (left' = resized_w − right), as SDXL's crop conditioning expects."""
    left, top, right, bottom = prepared.crop_ltrb
    resized_w = prepared.resized[0]
    mask = None if prepared.mask is None else np.ascontiguousarray(prepared.mask[:, ::-1])
    return replace(prepared, pixels=np.ascontiguousarray(prepared.pixels[:, ::-1]), mask=mask,
                   crop_ltrb=(resized_w - right, top, resized_w - left, bottom), flipped=not prepared.flipped)


def color_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' colour augmentation: with probability 0.33, a hue shift of ±8 (OpenCV units) or a gamma.

    The gamma is applied to normalised values, 255·(x/255)^γ. sd-scripts raises raw 0..255 values to γ, which
    turns white into 194 at γ = 0.95 and clips most of the range at γ = 1.05; that reads as a defect.
    """
    if rng.random() > _COLOR_AUG_PROBABILITY:
        return image
    rgb = image.convert("RGB")
    if rng.random() > 0.5:
        return _shift_hue(rgb, rng.uniform(-_HUE_SHIFT_LIMIT, _HUE_SHIFT_LIMIT))
    gamma = rng.uniform(*_GAMMA_RANGE)
    table = [min(255, int(255.0 * (value / 255.0) ** gamma + 0.5)) for value in range(256)]
    return rgb.point(table * 3)


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    hsv = np.array(image.convert("HSV"), dtype=np.int16)
    hsv[..., 0] = (hsv[..., 0] + round(shift)) % 256  # hue wraps around the colour circle
    return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")


def to_model_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW in [-1, 1] (0 -> -1, 255 -> 1), the VAE's input range."""
    import torch  # here, not at the top: scanning and the doctor import this module without torch

    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).to(torch.float32)
    return (tensor / 127.5 - 1.0).contiguous()


def to_mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """uint8 HxW loss mask -> float32 HxW in [0, 1] (255 -> 1: trained, 0 -> 0: ignored)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32) / 255.0


def load_mask_for(image: Image.Image, source: MaskSource) -> Image.Image:
    """The loss mask of `image`, read from `source` (its own alpha channel, or a mask file).

    Raises:
        UnreadableImage: the mask cannot be read, or its size differs from the image's.
    """
    mask = load_mask(source.path, alpha=source.kind == "alpha")
    if mask.size != image.size:
        raise UnreadableImage(source.path, f"the mask is {mask.width}x{mask.height} but its image is "
                                           f"{image.width}x{image.height}; masks must have their image's size")
    return mask


def _load(path: str | PathLike[str], mask: MaskSource | None) -> tuple[Image.Image, Image.Image | None]:
    """The image and its loss mask; an alpha mask comes from the same decode as the pixels."""
    if mask is not None and mask.kind == "alpha" and Path(mask.path) == Path(path):
        return load_rgb_and_alpha(path)
    image = load_rgb_image(path)
    return image, None if mask is None else load_mask_for(image, mask)


def prepare(path: str | PathLike[str], assignment: BucketAssignment, *, flip: bool = False,
            random_crop: bool = False, rng: random.Random | None = None, interpolation: str | None = None,
            color_aug: bool = False, face_crop_range: tuple[float, float] | None = None,
            mask: MaskSource | None = None) -> PreparedImage:
    """Load an image and run the steps in sd-scripts' order: resize and crop, colour augmentation, flip.

    With `face_crop_range` (buckets off), an image whose file name carries a face box is cut around the face
    instead (engine.data.face_crop). With `mask`, its loss mask goes through the same resize, crop and flip.
    """
    rng = rng if rng is not None else random.Random()
    image, mask_image = _load(path, mask)
    box = face_box(path) if face_crop_range is not None else None
    if box is not None:
        prepared = face_crop(image, box, assignment.bucket, face_crop_range, random_crop=random_crop, rng=rng,
                             interpolation=interpolation, mask=mask_image)
    else:
        prepared = resize_and_crop(image, assignment, random_crop=random_crop, rng=rng, interpolation=interpolation,
                                   mask=mask_image)
    if color_aug:
        augmented = color_augment(Image.fromarray(prepared.pixels), rng)
        prepared = replace(prepared, pixels=np.array(augmented, dtype=np.uint8))
    return flip_horizontal(prepared) if flip else prepared
