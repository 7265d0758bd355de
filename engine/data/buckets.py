"""Aspect-ratio bucketing, exactly as sd-scripts does it (spec §2.1, §2.2), so datasets bucket identically.

A bucket is a (width, height) that every image of a batch is resized and cropped to. With upscaling allowed the
buckets are a fixed list whose area is at most the training resolution's; with `bucket_no_upscale` each image
gets its own bucket, at most that area and never larger than the image.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Size]:
    """The predefined buckets of sd-scripts' `make_bucket_resolutions` (spec §2.1): sorted, no duplicates."""
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) // divisible) * divisible
    resolutions = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: its bucket, the size it is resized to before cropping, and the aspect-ratio error.

    `ar_error` is bucket_ar − image_ar, signed, as sd-scripts returns it (its logs average the absolute value).
    """

    bucket: Size
    resized: Size
    ar_error: float


class BucketManager:
    """Assigns images to buckets like sd-scripts' BucketManager.select_bucket, in both modes.

    min_size and max_size are rounded to multiples of `steps` (min down, max up) as sd-scripts' dataset does;
    the rounded values are kept in `min_size` / `max_size` and described in `notes` for a warning.
    """

    def __init__(self, resolution: Size, min_size: int = 256, max_size: int = 1024, steps: int = 64,
                 no_upscale: bool = False) -> None:
        width, height = resolution
        if width <= 0 or height <= 0:
            raise ValueError(f"resolution must be positive, got {width}x{height}")
        if steps <= 0:
            raise ValueError(f"bucket_reso_steps must be positive, got {steps}")
        self.notes: list[str] = []
        self.resolution: Size = (width, height)
        self.steps = steps
        self.no_upscale = no_upscale
        self.min_size = self._rounded("min_bucket_reso", min_size, min_size - min_size % steps)
        self.max_size = self._rounded("max_bucket_reso", max_size, -(-max_size // steps) * steps)
        self._validate()
        self.max_area = width * height
        # sd-scripts ignores min/max (with a warning) in no-upscale mode: buckets are made per image.
        self._use_buckets([] if no_upscale else make_bucket_resolutions(
            self.resolution, self.min_size, self.max_size, steps))

    @classmethod
    def fixed(cls, resolution: Size) -> BucketManager:
        """The single-bucket manager for bucketing disabled; the same as `fixed_bucket(resolution)`."""
        return fixed_bucket(resolution)

    def _use_buckets(self, buckets: list[Size]) -> None:
        self.buckets: list[Size] = list(buckets)
        self._bucket_set = frozenset(self.buckets)
        self._bucket_ratios = [w / h for w, h in self.buckets]

    def _rounded(self, name: str, value: int, rounded: int) -> int:
        if rounded != value:
            self.notes.append(f"{name} {value} is not a multiple of bucket_reso_steps {self.steps}; using {rounded}")
        return rounded

    def _validate(self) -> None:
        # sd-scripts asserts these in BucketManager.__init__ and in the dataset constructor.
        width, height = self.resolution
        if self.min_size <= 0:
            raise ValueError(f"min_bucket_reso must be at least bucket_reso_steps ({self.steps}), got {self.min_size}")
        if self.max_size < self.min_size:
            raise ValueError(f"max_bucket_reso ({self.max_size}) must not be smaller than min_bucket_reso "
                             f"({self.min_size})")
        if self.max_size < max(width, height):
            raise ValueError(f"max_bucket_reso ({self.max_size}) must be at least the resolution's long side "
                             f"({max(width, height)})")
        if self.min_size > min(width, height):
            raise ValueError(f"min_bucket_reso ({self.min_size}) must not exceed the resolution's short side "
                             f"({min(width, height)})")

    def assign(self, size: Size) -> BucketAssignment:
        """The bucket, resize target and aspect-ratio error for an image of (width, height) as displayed."""
        width, height = size
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.no_upscale:
            return self._assign_no_upscale(width, height)
        return self._assign_predefined(width, height)

    def _assign_predefined(self, width: int, height: int) -> BucketAssignment:
        ratio = width / height
        if (width, height) in self._bucket_set:
            bucket = (width, height)
        else:
            # min() keeps the first of equal errors, like numpy's argmin over the sorted list in sd-scripts.
            index = min(range(len(self.buckets)), key=lambda i: abs(self._bucket_ratios[i] - ratio))
            bucket = self.buckets[index]
        bucket_ratio = bucket[0] / bucket[1]
        # Cover the bucket: match the side that leaves the other one at least as long as the bucket's.
        scale = bucket[1] / height if ratio > bucket_ratio else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return BucketAssignment(bucket, resized, bucket_ratio - ratio)

    def _assign_no_upscale(self, width: int, height: int) -> BucketAssignment:
        ratio = width / height
        if min(width, height) < self.steps:
            raise ValueError(f"an image of {width}x{height} has a side shorter than bucket_reso_steps ({self.steps}), "
                             "so no bucket can hold it without upscaling")
        resized = self._shrunk_to_area(width, height, ratio) if width * height > self.max_area else (width, height)
        if min(resized) < self.steps:
            # Extreme ratios for the area (from about 65:1 at 512 px, 2:1 at 64 px) round a side to 0 and make
            # sd-scripts divide by zero. Shrink no further than one step on the short side instead.
            scale = self.steps / min(width, height)
            resized = (max(self.steps, int(width * scale + 0.5)), max(self.steps, int(height * scale + 0.5)))
        # Floor to steps: the remainder is cropped, never padded.
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return BucketAssignment(bucket, resized, bucket[0] / bucket[1] - ratio)

    def _shrunk_to_area(self, width: int, height: int, ratio: float) -> Size:
        """Shrink to the resolution's area keeping the aspect ratio; one side lands on a multiple of steps."""
        area_width = math.sqrt(self.max_area * ratio)
        area_height = self.max_area / area_width
        # Two candidates, rounding the width or the height to steps; keep the one whose ratio is closer.
        by_width = self._round_to_steps(area_width)
        by_width_height = self._round_to_steps(by_width / ratio)
        by_height = self._round_to_steps(area_height)
        by_height_width = self._round_to_steps(by_height * ratio)
        error_w = abs(by_width / by_width_height - ratio) if by_width_height else math.inf
        error_h = abs(by_height_width / by_height - ratio) if by_height else math.inf
        if error_w < error_h:  # strict, as in sd-scripts: a tie goes to the height candidate
            return by_width, int(by_width / ratio + 0.5)
        return int(by_height * ratio + 0.5), by_height

    def _round_to_steps(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.steps


def fixed_bucket(resolution: Size) -> BucketManager:
    """The manager used when bucketing is disabled: one bucket, the resolution itself; images cover and crop.

    This is sd-scripts' behaviour when latents are cached. (Without caching it skips the resize and asserts
    the image already fits, a difference we do not replicate: one path for both.)
    """
    width, height = resolution
    # min = max = the resolution's sides passes validation; steps 1 is irrelevant with upscaling allowed.
    manager = BucketManager((width, height), min(width, height), max(width, height), steps=1, no_upscale=False)
    manager._use_buckets([(width, height)])  # sd-scripts' set_predefined_resos([(W, H)])
    return manager


def bucket_histogram(assignments: Iterable[BucketAssignment]) -> dict[Size, int]:
    """Images per bucket, in bucket order (the per-bucket counts sd-scripts logs and stores in ss_bucket_info)."""
    counts = Counter(assignment.bucket for assignment in assignments)
    return dict(sorted(counts.items()))
