"""Which images are held out of training for the validation loss: sd-scripts' per-subset split, made disjoint.

sd-scripts (spec §1.7, ``split_train_val``) shuffles each training subset's image list with ``validation_seed``
and takes the last ``round(n·split)`` images for validation; regularization subsets are never split, and
validation images count once (one repeat). The shuffle here is the same (Python's ``random.Random(seed).shuffle``
of the list in the subset's order: sorted file names, or the metadata file's order), so the same images are held
out. Two differences, on purpose:

* Training keeps the other ``n − round(n·split)`` images. sd-scripts keeps the first ``ceil(n·(1 − split))``,
  which is one more whenever ``round`` rounds up (n = 3, split = 0.5: two train, two validate, one image in both),
  so a held-out image would train.
* Without ``validation_seed`` the shuffle uses ``training.seed``. sd-scripts then shuffles with its global random
  state, separately for its training and its validation dataset, so the two may not even be complementary.

Subsets marked ``validation_only`` (an Atelier key) give all their images to validation.
"""

from __future__ import annotations

import random

from engine.data.records import DatasetPlan, Finding, ImageRecord, SubsetPlan


def held_out_count(count: int, split: float) -> int:
    """How many of a subset's `count` images validation takes: round(count·split), Python's (sd-scripts') round."""
    return round(count * split)


def split_order(count: int, split: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (into the subset's image list) that train and that validate, disjoint and together all of them.

    The order is sd-scripts' shuffle: ``random.Random(seed).shuffle`` of the list (a shuffle depends only on the
    list's length and the seed, so shuffling indices permutes like shuffling the images).
    """
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = held_out_count(count, split)
    return order[: count - held], order[count - held:]


def split_subset(subset: SubsetPlan, split: float, seed: int) -> None:
    """Move this subset's held-out images from `records` to `validation` (each with one repeat)."""
    if subset.is_reg:
        return
    if subset.params.get("validation_only"):
        held, subset.records = subset.records, []
    else:
        if split <= 0 or not subset.records:
            return
        train, validate = split_order(len(subset.records), split, seed)
        held = [subset.records[index] for index in validate]
        subset.records = [subset.records[index] for index in sorted(train)]
    for record in held:
        record.num_repeats = 1
    subset.validation = held


def split_dataset(dataset: DatasetPlan, default_seed: int) -> list[Finding]:
    """Split every subset of one dataset by its validation_split / validation_seed; the findings name a subset the
    split leaves without a training image (an error: raise the split or add images)."""
    split = float(dataset.params.get("validation_split") or 0.0)
    seed = dataset.params.get("validation_seed")
    seed = default_seed if seed is None else int(seed)
    findings = []
    for subset in dataset.subsets:
        had_images = bool(subset.records)
        split_subset(subset, split, seed)
        if had_images and not subset.records and not subset.is_reg and not subset.params.get("validation_only"):
            findings.append(Finding(
                "error", "validation-split-empty", subset.path,
                f"validation_split = {split} holds out all {len(subset.validation)} image(s) of this subset, so "
                "none is left to train on", "lower dataset validation_split or add images to this subset"))
    return findings


def validation_records(datasets: list[DatasetPlan]) -> list[ImageRecord]:
    """Every held-out image, in dataset and subset order."""
    return [record for dataset in datasets for subset in dataset.subsets for record in subset.validation]
