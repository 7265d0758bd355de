"""The bucket batch sampler: batches never mix buckets, are reshuffled every epoch with the seed, and are split
evenly across training processes. Pure Python, so DataLoader takes it as `batch_sampler` and tests need no torch."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

from engine.data.records import ImageRecord


class BucketBatchSampler:
    """Yields lists of record indices; each list is one batch from one bucket of one dataset.

    Every record appears `num_repeats` times per epoch. The order of images inside each bucket and the order of
    the batches are shuffled with `seed + epoch` (as sd-scripts does), so a resumed run replays the same epoch.
    With several processes the epoch is cut into *global* batches of `batch_size * num_replicas` images and rank r
    takes the r-th slice of each: N processes with batch b train on exactly the images one process with batch N*b
    would, step by step. A short last global batch is split evenly, repeating its first images where needed, so
    every rank runs the same number of steps (DDP needs them in lockstep).
    """

    def __init__(self, records: Sequence[ImageRecord], batch_sizes: dict[int, int], *, seed: int,
                 num_replicas: int = 1, rank: int = 0, drop_partial: bool = False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must be in [0, {num_replicas})")
        self.records = records
        self.batch_sizes = batch_sizes  # dataset index -> batch size per process
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_partial = drop_partial
        self.epoch = 0
        self._groups = self._group_by_bucket(records)
        self._cached: tuple[int, list[list[tuple[int, int]]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _group_by_bucket(records: Sequence[ImageRecord]) -> list[tuple[int, list[int]]]:
        """(dataset index, record indices repeated num_repeats times) per bucket, in a fixed order."""
        groups: dict[tuple[int, tuple[int, int]], list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            groups[(record.dataset_index, record.bucket or (0, 0))].extend([index] * record.num_repeats)
        return [(key[0], groups[key]) for key in sorted(groups)]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of an epoch (every rank's share together), in the order they will be served."""
        rng = random.Random(self.seed + epoch)
        batches = []
        for dataset_index, indices in self._groups:
            items = list(indices)
            rng.shuffle(items)
            size = self.batch_sizes.get(dataset_index, 1) * self.num_replicas
            for start in range(0, len(items), size):
                batch = items[start:start + size]
                if len(batch) == size or not self.drop_partial:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def rank_batches_with_slots(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches as (record index, slot) pairs; the slot is the place in the global batch, the same
        whatever the number of processes, so per-sample randomness can be keyed by it."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, [self._slice(batch) for batch in self.epoch_batches(epoch)])
        return self._cached[1]

    def _slice(self, batch: list[int]) -> list[tuple[int, int]]:
        share = -(-len(batch) // self.num_replicas)  # ceil: a short global batch is split evenly
        first = self.rank * share
        return [(batch[slot % len(batch)], slot % len(batch)) for slot in range(first, first + share)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([[index for index, _ in batch] for batch in self.rank_batches_with_slots(self.epoch)])

    def __len__(self) -> int:
        return len(self.rank_batches_with_slots(self.epoch))
