"""The keys of sd-scripts' dataset config (spec §1.3), grouped by the levels where they may appear.

Each group is declared once, with the value that applies when no level sets it (the equivalent of sd-scripts'
argparse defaults, following the kohya_ss GUI where the two differ). `inheriting()` derives the variants used at
the `[[datasets]]` and `[[datasets.subsets]]` levels, where every key is optional and None means "inherit".
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, Field, create_model

from engine.config.base import StrictModel, setting
from engine.config.choices import CAPTION_EXTENSIONS, ResizeInterpolation, dotted_caption_extension


def _as_width_height(value: int | list[int]) -> list[int]:
    """sd-scripts accepts `resolution = 512` or `resolution = [768, 512]`; we keep one form, [width, height]."""
    size = [value, value] if isinstance(value, int) else list(value)
    if len(size) != 2:
        raise ValueError("give one number (square) or two numbers [width, height]")
    if any(side < 64 or side > 8192 for side in size):
        raise ValueError("each side must be between 64 and 8192 pixels")
    return size


def _caption_extension(value: str) -> str:
    dotted_caption_extension(value)  # refuses anything but a text extension of the fixed list
    return value  # kept as written: sd-scripts' 'txt' stays 'txt' in a saved config


Resolution = Annotated[int | list[int], AfterValidator(_as_width_height)]
CaptionExtension = Annotated[str, AfterValidator(_caption_extension)]
FloatPair = Annotated[list[float], Field(min_length=2, max_length=2)]


class DatasetLevelKeys(StrictModel):
    """Keys allowed in [general] and [[datasets]], not in subsets."""

    batch_size: int = setting(1, "Images per training step on each GPU.", ge=1, le=256)
    resolution: Resolution = setting(
        512, "Training resolution: one number for a square, or [width, height]; sets the pixel area of buckets.",
        unit="px",
    )
    enable_bucket: bool = setting(True, "Sort images into aspect-ratio buckets instead of cropping them all square.")
    min_bucket_reso: int = setting(256, "Smallest bucket side.", ge=64, le=8192, advanced=True, unit="px")
    max_bucket_reso: int = setting(2048, "Largest bucket side.", ge=64, le=8192, advanced=True, unit="px")
    bucket_reso_steps: int = setting(
        64, "Bucket sides are multiples of this; SD1/SD2 need 64, SDXL accepts 32.", ge=8, le=256, advanced=True,
    )
    bucket_no_upscale: bool = setting(
        True, "Never enlarge images smaller than the resolution; give them their own smaller bucket instead.",
        advanced=True,
    )
    network_multiplier: float = setting(
        1.0, "Strength of the trained network on this dataset's images (0 = the base model alone).", advanced=True,
    )
    validation_seed: int | None = setting(
        None, "Seed of the shuffle that picks each subset's validation images (unset = training.seed).",
        advanced=True, ge=0,
    )
    validation_split: float = setting(
        0.0, "Fraction of each training subset's images held out of training for the validation loss (0 = none); "
        "sd-scripts' split.", ge=0.0, lt=1.0, advanced=True,
    )


class SubsetLevelKeys(StrictModel):
    """Keys allowed at every level: [general], [[datasets]] and [[datasets.subsets]]."""

    num_repeats: int = setting(1, "How many times each image is seen per epoch.", ge=1, le=10000)
    shuffle_caption: bool = setting(False, "Shuffle the comma-separated tags of each caption every step.")
    caption_separator: str = setting(",", "Separator between tags in captions.", advanced=True, min_length=1)
    keep_tokens: int = setting(
        0, "Number of leading tags kept in place when shuffling (e.g. the trigger word).", ge=0, le=225,
    )
    keep_tokens_separator: str = setting(
        "", "Marker separating fixed leading tags from shuffled ones, e.g. '|||' (empty = use keep_tokens).",
        advanced=True,
    )
    secondary_separator: str | None = setting(
        None, "A separator that groups tags so they shuffle together; replaced by caption_separator.", advanced=True,
    )
    enable_wildcard: bool = setting(
        False, "Read every caption line and expand {a|b} wildcards, picking one at random each step.", advanced=True,
    )
    color_aug: bool = setting(False, "Randomly shift hue as augmentation (not with cached latents).", advanced=True)
    flip_aug: bool = setting(False, "Randomly mirror images horizontally; avoid for asymmetric subjects.")
    face_crop_aug_range: FloatPair | None = setting(
        None, "Face-crop augmentation range [min, max] as multiples of the face size.", advanced=True,
    )
    random_crop: bool = setting(
        False, "Crop at a random position instead of the centre (not with cached latents).", advanced=True,
    )
    caption_prefix: str | None = setting(None, "Text put before every caption, e.g. a trigger word.")
    caption_suffix: str | None = setting(None, "Text put after every caption.", advanced=True)
    token_warmup_min: int = setting(1, "Tags shown at the start of token warm-up.", ge=1, advanced=True)
    token_warmup_step: int | float = setting(
        0, "Steps (or a fraction of the run, below 1) over which captions grow to full length (0 = off).",
        ge=0, advanced=True,
    )
    custom_attributes: dict[str, Any] | None = setting(
        None, "Extra per-subset attributes read by specific training options.", advanced=True,
    )
    resize_interpolation: ResizeInterpolation | None = setting(
        None, "Resampling filter for resizing images (empty = area for shrinking, lanczos for enlarging).",
        advanced=True,
    )


class CaptionDropoutKeys(StrictModel):
    """Caption-dropout keys; sd-scripts rejects them for Textual Inversion."""

    caption_dropout_rate: float = setting(
        0.0, "Chance of training a step with an empty caption.", ge=0.0, le=1.0, advanced=True, group="captions",
    )
    caption_dropout_every_n_epochs: int = setting(
        0, "Drop all captions every N-th epoch (0 = never).", ge=0, advanced=True, group="captions",
    )
    caption_tag_dropout_rate: float = setting(
        0.0, "Chance of dropping each tag (except kept ones).", ge=0.0, le=1.0, advanced=True, group="captions",
    )


class DreamBoothKeys(StrictModel):
    """DreamBooth-style keys that may also be written at the dataset and general levels."""

    caption_extension: CaptionExtension = setting(
        ".txt", f"File extension of caption files next to the images: {', '.join(CAPTION_EXTENSIONS)}.",
    )
    class_tokens: str | None = setting(
        None, "Caption for images without a caption file, e.g. 'sks dog'.", advanced=True,
    )
    cache_info: bool = setting(
        False, "Remember image sizes in <image_dir>/metadata_cache.json for faster start-up (captions too, for "
        "sd-scripts); a changed image is measured again.", advanced=True,
    )


def inheriting(name: str, *groups: type[StrictModel]) -> type[StrictModel]:
    """A model with the keys of `groups`, each optional with default None ("inherit from the level above").

    Bounds, validators and UI hints are kept; only the default changes.
    """
    fields: dict[str, Any] = {}
    for group in groups:
        for key, info in group.model_fields.items():
            # Optional[X] keys become X first, so the result is Annotated[X, ...] | None, not Optional twice over
            # (which describe() would not see through: the GUI showed validation_seed as a text box).
            inner: Any = info.annotation
            if typing.get_origin(inner) in (typing.Union, types.UnionType) and type(None) in typing.get_args(inner):
                inner = functools.reduce(operator.or_, [arg for arg in typing.get_args(inner) if arg is not type(None)])
            annotation = Annotated[(inner, *info.metadata)] if info.metadata else inner
            fields[key] = (annotation | None, Field(None, description=info.description,
                                                     json_schema_extra=info.json_schema_extra))
    return create_model(name, __base__=StrictModel, **fields)


SUBSET_INHERITABLE_GROUPS = (SubsetLevelKeys, CaptionDropoutKeys, DreamBoothKeys)
DATASET_INHERITABLE_GROUPS = (DatasetLevelKeys, *SUBSET_INHERITABLE_GROUPS)


def keys_of(*groups: type[StrictModel]) -> tuple[str, ...]:
    return tuple(key for group in groups for key in group.model_fields)


SUBSET_INHERITABLE_KEYS = keys_of(*SUBSET_INHERITABLE_GROUPS)
DATASET_LEVEL_KEYS = keys_of(DatasetLevelKeys)
CAPTION_DROPOUT_KEYS = keys_of(CaptionDropoutKeys)
