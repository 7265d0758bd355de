"""What scanning produces: one record per image, and findings about what is wrong or worth knowing.

These plain dataclasses are the contract between scanning, the doctor, caching and the training dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
CaptionSource = Literal["file", "metadata", "class_tokens", "none"]


@dataclass(frozen=True)
class Finding:
    """One thing the doctor reports: how bad it is, which file or folder, what is wrong and what to do."""

    severity: Severity
    code: str  # stable identifier for the GUI and tests, e.g. "folder-name", "image-unreadable"
    where: str  # a file or folder path, or a config path such as "dataset.datasets[0].subsets[1]"
    message: str  # what is wrong, in plain words
    hint: str = ""  # what to do about it

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "where": self.where, "message": self.message,
                "hint": self.hint}


@dataclass(frozen=True)
class MaskSource:
    """Where an image's loss mask comes from (masked loss): the image's own alpha channel (`alpha_mask`), or the
    red channel of a mask image of the same size (a subset's `conditioning_data_dir`, as sd-scripts reads it)."""

    kind: Literal["alpha", "file"]
    path: Path  # the image itself for "alpha", the mask image for "file"


@dataclass
class ImageRecord:
    """One training or regularization image with everything decided at scan time."""

    path: Path
    size: tuple[int, int]  # (width, height) as displayed, i.e. after EXIF orientation
    caption: str  # the raw caption (first line, or every line with wildcards); processing happens per step
    caption_source: CaptionSource
    num_repeats: int
    is_reg: bool
    dataset_index: int
    subset_index: int
    loss_weight: float = 1.0  # prior_loss_weight for regularization images
    bucket: tuple[int, int] | None = None  # (width, height), set when buckets are assigned
    resized: tuple[int, int] | None = None  # size the image is resized to before cropping to the bucket
    mask: MaskSource | None = None  # its loss mask, when its subset gives one (engine.data.masks)


@dataclass
class SubsetPlan:
    """A subset after scanning: its effective settings, its images and what was found."""

    path: str  # config path, e.g. "dataset.datasets[0].subsets[1]" or the legacy folder
    params: dict[str, Any]
    records: list[ImageRecord] = field(default_factory=list)  # the images trained on
    # Images held out for the validation loss (engine.data.validation_split); never trained on, one repeat each.
    validation: list[ImageRecord] = field(default_factory=list)

    @property
    def is_reg(self) -> bool:
        return bool(self.params.get("is_reg"))

    @property
    def every_record(self) -> list[ImageRecord]:
        """The trained and the held-out images: what the caches hold."""
        return [*self.records, *self.validation]


@dataclass
class DatasetPlan:
    """A dataset (one resolution, one batch size) with its subsets."""

    path: str
    params: dict[str, Any]
    subsets: list[SubsetPlan] = field(default_factory=list)


@dataclass
class ScanResult:
    datasets: list[DatasetPlan] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def has_errors(self) -> bool:
        return any(finding.severity == "error" for finding in self.findings)
