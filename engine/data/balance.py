"""Regularization balancing (sd-scripts' rule, spec §1.8) and the per-epoch arithmetic the doctor shows."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.data.records import ImageRecord


def balance_regularization(train: Sequence[ImageRecord], reg: Sequence[ImageRecord]) -> int:
    """Give regularization images repeats so that reg samples per epoch ≈ training samples per epoch.

    sd-scripts' loop, exactly: walk the reg images in order; on the first pass each one is used with its own
    repeats; on later passes each gets one more repeat; stop as soon as the count reaches the training count.
    Reg images not reached on the first pass are not used at all (their num_repeats becomes 0).

    Returns:
        How many regularization images end up unused.
    """
    target = sum(record.num_repeats for record in train)
    counts = [0] * len(reg)
    total, first_pass = 0, True
    while reg and total < target:
        for index, record in enumerate(reg):
            step = record.num_repeats if first_pass else 1
            counts[index] += step
            total += step
            if total >= target:
                break
        first_pass = False
    for record, count in zip(reg, counts, strict=True):
        record.num_repeats = count
    return sum(1 for count in counts if count == 0)


def samples_per_epoch(records: Iterable[ImageRecord]) -> int:
    return sum(record.num_repeats for record in records)


def batches_per_epoch(records: Iterable[ImageRecord], batch_size: int) -> int:
    """Batches never mix buckets, so each bucket is cut into batches on its own (a partial batch counts)."""
    per_bucket = Counter()
    for record in records:
        per_bucket[record.bucket] += record.num_repeats
    return sum(math.ceil(count / batch_size) for count in per_bucket.values() if count)


@dataclass(frozen=True)
class RunLength:
    batches_per_epoch: int
    steps_per_epoch: int  # optimizer steps: batches split over processes, then accumulated
    epochs: int
    total_steps: int


def run_length(batches: int, *, num_processes: int, gradient_accumulation_steps: int, max_train_epochs: int,
               max_train_steps: int) -> RunLength:
    """Steps per epoch and in total, as sd-scripts computes them (spec §9: epochs override steps)."""
    steps_per_epoch = math.ceil(batches / num_processes / gradient_accumulation_steps) if batches else 0
    if max_train_epochs:
        return RunLength(batches, steps_per_epoch, max_train_epochs, max_train_epochs * steps_per_epoch)
    epochs = math.ceil(max_train_steps / steps_per_epoch) if steps_per_epoch else 0
    return RunLength(batches, steps_per_epoch, epochs, max_train_steps)
