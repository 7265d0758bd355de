"""Loss masks (masked loss): which file holds each image's mask, and what the scan finds wrong with them.

Two sources, as in sd-scripts:
* a subset with `alpha_mask = true` uses each image's own alpha channel (transparent = ignored by the loss);
* a subset with `conditioning_data_dir` (read as masks when `training.masked_loss` is on) uses the image of the same
  stem in that folder, whose red channel is the mask (black = ignored, white = trained).

A mask must have its image's size: it is resized, cropped and flipped together with the image
(engine.data.transforms). sd-scripts stretches a mask folder's image straight to the bucket instead, which shifts it
against the cropped image when the aspect ratios differ; that is not copied. Only headers are read here, so the
scan stays fast; the pixels are read when the image is prepared.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from engine.data.images import UnreadableImage, has_alpha_channel, is_image_file, read_image_size
from engine.data.records import ImageRecord, MaskSource, SubsetPlan

__all__ = ["attach_masks"]

# severity, code, where, message, hint: the scanner's `add`.
FindingSink = Callable[[str, str, str, str, str], None]
EXAMPLES = 3


def _examples(paths: list[Path]) -> str:
    names = ", ".join(path.name for path in paths[:EXAMPLES])
    return names + (", ..." if len(paths) > EXAMPLES else "")


def attach_masks(plan: SubsetPlan, mask_dir: Path | None, add: FindingSink) -> None:
    """Give every record of `plan` its mask source, when the subset has masks; report what is missing or wrong.

    Args:
        plan: a scanned subset; its params decide the source (`alpha_mask`, or `conditioning_data_dir`).
        mask_dir: `conditioning_data_dir` resolved against the config's folder, or None.
        add: where findings go.
    """
    if plan.params.get("alpha_mask"):
        _alpha_masks(plan, add)
    elif mask_dir is not None:
        _folder_masks(plan, mask_dir, add)


def _alpha_masks(plan: SubsetPlan, add: FindingSink) -> None:
    opaque: list[Path] = []
    for record in plan.records:
        try:
            has_alpha = has_alpha_channel(record.path)
        except UnreadableImage:
            continue  # the scan's own checks report unreadable images
        if has_alpha:
            record.mask = MaskSource("alpha", record.path)
        else:
            opaque.append(record.path)
    if opaque:
        add("error", "mask-no-alpha", str(opaque[0]),
            f"{len(opaque)} image(s) of {plan.path} have no alpha channel, so alpha_mask has no mask to use: "
            f"{_examples(opaque)}",
            "save them as PNG or WebP with transparency where the loss should be ignored, or move them to a subset "
            "without alpha_mask")


def _mask_files(folder: Path) -> dict[str, list[Path]]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file() and not entry.name.startswith(".") and is_image_file(entry.name):
                by_stem[Path(entry.name).stem].append(folder / entry.name)
    return by_stem


def _folder_masks(plan: SubsetPlan, folder: Path, add: FindingSink) -> None:
    if not folder.is_dir():
        add("error", "mask-folder-missing", str(folder), "the mask folder (conditioning_data_dir) does not exist",
            f"check conditioning_data_dir of {plan.path}")
        return
    by_stem = _mask_files(folder)
    missing: list[Path] = []
    for record in plan.records:
        candidates = sorted(by_stem.pop(record.path.stem, []))
        if not candidates:
            missing.append(record.path)
        elif len(candidates) > 1:
            add("error", "mask-ambiguous", str(candidates[0]),
                f"{len(candidates)} mask files have the stem of {record.path.name}: {_examples(candidates)}",
                "keep one mask per image in the mask folder")
        elif _mask_fits(record, candidates[0], add):
            record.mask = MaskSource("file", candidates[0])
    if missing:
        add("error", "mask-missing", str(missing[0]),
            f"{len(missing)} image(s) of {plan.path} have no mask of the same name in {folder}: {_examples(missing)}",
            "add a mask image with the same name (any image extension; white = trained, black = ignored) for each")
    unmatched = sorted(path for paths in by_stem.values() for path in paths)
    if unmatched:
        add("warning", "mask-unmatched", str(folder),
            f"{len(unmatched)} mask file(s) have no training image of the same name: {_examples(unmatched)}",
            "remove them or add their images; they are not used")


def _mask_fits(record: ImageRecord, mask: Path, add: FindingSink) -> bool:
    try:
        size = read_image_size(mask)
    except UnreadableImage as error:
        add("error", "mask-unreadable", str(mask), str(error), "re-save the mask image")
        return False
    if size != tuple(record.size):
        add("error", "mask-size", str(mask),
            f"the mask is {size[0]}x{size[1]} but its image {record.path.name} is {record.size[0]}x{record.size[1]}",
            "save the mask at its image's size (it is resized and cropped together with the image)")
        return False
    return True
