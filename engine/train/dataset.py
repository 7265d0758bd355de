"""The training data: scanned records joined with their subset settings, caches and per-step randomness.

Every random choice of a sample (flip, crop, colour, caption shuffle and dropout) is drawn from a generator seeded
by (seed, epoch, position in the epoch, record), never from a shared stream. A resumed run therefore sees exactly
the samples the interrupted one would have seen, and data-loader workers need no coordination.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.cache.latent_files import CachedLatents
from engine.cache.text_encoder import CachedText
from engine.data.buckets import BucketAssignment
from engine.data.captions import CaptionOptions, process_caption
from engine.data.records import ImageRecord, ScanResult
from engine.data.sampler import BucketBatchSampler
from engine.data.transforms import prepare, to_mask_tensor, to_model_tensor


@dataclass(frozen=True)
class Example:
    """One trained image with the settings of the subset it came from."""

    record: ImageRecord
    captions: CaptionOptions
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    interpolation: str | None
    network_multiplier: float = 1.0  # the dataset's strength of the trained network (engine.train.network_scaling)
    preserve_output: bool = False  # custom_attributes.diff_output_preservation of the subset
    face_crop_range: tuple[float, float] | None = None  # face_crop_aug_range (buckets off; engine.data.face_crop)


@dataclass(frozen=True)
class SampleKey:
    """What the batch sampler hands the dataset: which example, and where in the run it is drawn."""

    index: int
    epoch: int  # counted from 1, as sd-scripts counts epochs for caption dropout
    position: int  # the batch's index within the epoch
    step: int  # the optimizer step the batch belongs to (token warm-up)
    slot: int = 0  # the sample's place in the global batch (all processes together)


def examples_from_scan(scan: ScanResult) -> list[Example]:
    """Every image that is trained on (regularization images left unused by balancing are dropped)."""
    examples = []
    for dataset in scan.datasets:
        multiplier = float(dataset.params.get("network_multiplier", 1.0))
        for subset in dataset.subsets:
            params = subset.params
            options = CaptionOptions.from_params(params)
            preserve = bool((params.get("custom_attributes") or {}).get("diff_output_preservation"))
            face_range = params.get("face_crop_aug_range")
            face_range = None if face_range is None or dataset.params.get("enable_bucket") else tuple(face_range)
            for record in subset.records:
                if record.num_repeats > 0 and record.bucket is not None:
                    examples.append(Example(record, options, bool(params.get("flip_aug")),
                                            bool(params.get("color_aug")), bool(params.get("random_crop")),
                                            params.get("resize_interpolation"), multiplier, preserve, face_range))
    return examples


def batch_sizes(scan: ScanResult) -> dict[int, int]:
    """Dataset index -> batch size per device."""
    return {index: int(dataset.params.get("batch_size", 1)) for index, dataset in enumerate(scan.datasets)}


def sample_rng(seed: int, key: SampleKey) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across processes and Python runs.
    # (epoch, position, slot) names a sample the same way whatever the number of processes.
    return random.Random(f"{seed}/{key.epoch}/{key.position}/{key.slot}")


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text, the same in every process and Python run (no hash randomisation)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_seed(seed: int, key: SampleKey) -> int:
    """The seed of this sample's noise and timestep: per sample, so N processes draw what one process would."""
    return derived_seed("noise", seed, key.epoch, key.position, key.slot)


class TrainingDataset(torch.utils.data.Dataset):
    """Turns a `SampleKey` into the tensors and caption of one sample.

    Args:
        examples: from :func:`examples_from_scan`.
        seed: the run's seed.
        max_train_steps: the run's length (token warm-up as a fraction of it).
        latents: cached latents by (image path, bucket); None loads and prepares pixels every step.
        texts: cached text-encoder outputs by image path; None returns processed captions.
    """

    def __init__(self, examples: Sequence[Example], *, seed: int, max_train_steps: int,
                 latents: dict[tuple[Path, tuple[int, int]], CachedLatents] | None = None,
                 texts: dict[Path, CachedText] | None = None):
        self.examples = list(examples)
        self.seed = seed
        self.max_train_steps = max_train_steps
        self.latents = latents
        self.texts = texts

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        example = self.examples[key.index]
        record = example.record
        rng = sample_rng(self.seed, key)
        item: dict[str, Any] = {"loss_weight": float(record.loss_weight), "target_size": _hw(record.bucket),
                                "noise_seed": noise_seed(self.seed, key), "image": str(record.path),
                                "network_multiplier": example.network_multiplier,
                                "diff_output_preservation": example.preserve_output}
        flip = example.flip_aug and rng.random() < 0.5
        if self.latents is not None:
            cached = self.latents[(record.path, tuple(record.bucket))]
            chosen = cached.latents_flipped if flip and cached.latents_flipped is not None else cached.latents
            item["latents"] = _as_tensor(chosen, np.float32)
            item["original_size"] = _hw(cached.original_size)
            item["crop_top_left"] = _crop(cached, flip, record.resized[0])
            if record.mask is not None:
                item["loss_mask"] = _cached_mask(cached, flip, record.path)
        else:
            assignment = BucketAssignment(tuple(record.bucket), tuple(record.resized), 0.0)
            prepared = prepare(record.path, assignment, flip=flip, random_crop=example.random_crop, rng=rng,
                               interpolation=example.interpolation, color_aug=example.color_aug,
                               face_crop_range=example.face_crop_range, mask=record.mask)
            item["pixels"] = to_model_tensor(prepared.pixels)
            if prepared.mask is not None:
                item["loss_mask"] = to_mask_tensor(prepared.mask)
            item["original_size"] = _hw(prepared.original_size)
            item["crop_top_left"] = (prepared.crop_ltrb[1], prepared.crop_ltrb[0])
        if self.texts is not None:
            text = self.texts[record.path]
            item["hidden_states"] = _as_tensor(text.hidden_states, np.float32)
            if text.pooled is not None:
                item["pooled"] = _as_tensor(text.pooled, np.float32)
            if text.mask is not None:
                item["text_mask"] = _as_tensor(text.mask, bool)
        else:
            item["caption"] = process_caption(record.caption, example.captions, rng=rng, epoch=key.epoch,
                                              step=key.step, max_train_steps=self.max_train_steps)
        return item


def _as_tensor(value: np.ndarray | torch.Tensor, dtype: Any) -> torch.Tensor:
    """A cache entry's array as a tensor (already one, on the device, with training.cache_on_device)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(value, dtype=dtype))


def _cached_mask(cached: CachedLatents, flipped: bool, image: Path) -> torch.Tensor:
    """The loss mask stored with the latents, mirrored for a flipped step (the cache holds it unflipped)."""
    if cached.alpha_mask is None:
        raise ValueError(f"{image}: its cached latents hold no loss mask; rebuild the latent cache")
    mask = _as_tensor(cached.alpha_mask, np.float32)
    return torch.flip(mask, dims=[1]) if flipped else mask


def caches_on_device(latents: dict[Any, CachedLatents] | None, texts: dict[Path, CachedText] | None,
                     device: torch.device) -> tuple[dict[Any, CachedLatents] | None, dict[Path, CachedText] | None]:
    """The caches with every array converted once to a tensor on `device` (training.cache_on_device): batches are
    then stacked where the model runs, instead of being copied from system memory at every step."""
    def move(value: np.ndarray | None, dtype: Any) -> torch.Tensor | None:
        return None if value is None else _as_tensor(value, dtype).to(device)

    if latents is not None:
        latents = {key: replace(entry, latents=move(entry.latents, np.float32),
                                latents_flipped=move(entry.latents_flipped, np.float32),
                                alpha_mask=move(entry.alpha_mask, np.float32))
                   for key, entry in latents.items()}
    if texts is not None:
        texts = {key: replace(entry, hidden_states=move(entry.hidden_states, np.float32),
                              pooled=move(entry.pooled, np.float32), mask=move(entry.mask, bool))
                 for key, entry in texts.items()}
    return latents, texts


def _hw(size_wh: Sequence[int] | None) -> tuple[int, int]:
    width, height = size_wh  # type: ignore[misc]
    return int(height), int(width)


def _crop(cached: CachedLatents, flipped: bool, resized_width: int) -> tuple[int, int]:
    left, top, right, _ = cached.crop_ltrb
    if flipped:
        # The flipped latents were encoded from the mirrored crop: its left edge is the original's right margin.
        left = resized_width - right
    return int(top), int(left)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; all items share a bucket, so every tensor has the same shape."""
    _fill_loss_masks(items)
    batch: dict[str, Any] = {}
    for name in items[0]:
        values = [item[name] for item in items]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    batch["loss_weight"] = [float(weight) for weight in batch["loss_weight"]]  # host numbers (losses.batch_weights)
    if "network_multiplier" in batch:  # host numbers: the step compares them without reading the device
        batch["network_multiplier"] = [float(value) for value in batch["network_multiplier"]]
    batch["noise_seed"] = [int(seed) for seed in batch["noise_seed"]]
    return batch


def _fill_loss_masks(items: list[dict[str, Any]]) -> None:
    """A batch mixing images with and without a loss mask (subsets of one dataset): the others get a mask of ones,
    the full loss they would have had alone."""
    masks = [item["loss_mask"] for item in items if "loss_mask" in item]
    if not masks or len(masks) == len(items):
        return
    for item in items:
        if "loss_mask" not in item:
            item["loss_mask"] = torch.ones_like(masks[0])


class EpochBatches:
    """The batch sampler handed to DataLoader: one epoch's batches of `SampleKey`, from a start position.

    Wraps the bucket sampler (which decides order and sharding) and labels each index with what the dataset
    needs for its per-sample randomness. `start` skips batches already trained when a run resumes mid-epoch.
    """

    def __init__(self, sampler: BucketBatchSampler, *, epoch: int, start: int, accumulation: int,
                 epoch_first_step: int):
        self.sampler = sampler
        self.epoch = epoch
        self.start = start
        self.accumulation = accumulation
        self.epoch_first_step = epoch_first_step  # optimizer steps taken before this epoch began
        sampler.set_epoch(epoch)

    def move_to(self, *, epoch: int, start: int, epoch_first_step: int) -> None:
        """Serve another epoch (a DataLoader with persistent workers keeps its batch sampler between epochs)."""
        self.epoch = epoch
        self.start = start
        self.epoch_first_step = epoch_first_step
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        batches = self.sampler.rank_batches_with_slots(self.epoch)
        for position in range(self.start, len(batches)):
            step = self.epoch_first_step + position // self.accumulation
            yield [SampleKey(index, self.epoch, position, step, slot) for index, slot in batches[position]]

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)
