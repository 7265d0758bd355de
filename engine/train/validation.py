"""The validation pass: the training objective on the held-out images, at fixed timesteps and with fixed noise.

Every pass does the same work, so two checkpoints are compared on equal terms (sd-scripts' FLUX path does not: its
σ sampler ignores the fixed timesteps, spec FLUX Appendix A #11):

* the held-out images (engine.data.validation_split) in one fixed order of batches, grouped by dataset and
  bucket, with no augmentation (no flip, crop, colour shift or caption dropout) and one repeat each;
* each batch at sd-scripts' four timesteps, ``linspace(min_timestep, max_timestep, 6)[1:-1]`` (200, 400, 600, 800
  by default; flow matching's σ = t/1000), each image's noise drawn from a seed of (seed, image, timestep);
* the cached latents and text-encoder outputs of training are reused; without a latent cache the VAE's sampling
  is seeded per batch;
* no gradients, and the caller puts the trained modules in eval mode (dropout off) around the pass.

The random state training continues with is saved before the pass and restored after it, so a run with
validation trains exactly as the same run without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from engine.data.records import ScanResult
from engine.train.dataset import Example, SampleKey, TrainingDataset, batch_sizes, collate, derived_seed

if TYPE_CHECKING:
    from engine.train.loop import StepRunner
    from engine.train.setup import Session

TIMESTEP_COUNT = 4  # sd-scripts' fixed validation timesteps per batch


def validation_timesteps(min_timestep: int, max_timestep: int) -> list[int]:
    """The fixed timesteps every validation batch is evaluated at: the inner four of six evenly spaced points
    from min_timestep to max_timestep (sd-scripts), at most 999 (the last DDPM step)."""
    points = torch.linspace(float(min_timestep), float(max_timestep), TIMESTEP_COUNT + 2)[1:-1]
    return [min(int(point), 999) for point in points.tolist()]


def validation_examples(scan: ScanResult) -> list[Example]:
    """Every held-out image with its subset's settings, augmentation and caption randomness turned off."""
    from engine.data.captions import CaptionOptions

    examples = []
    for dataset in scan.datasets:
        multiplier = float(dataset.params.get("network_multiplier", 1.0))
        for subset in dataset.subsets:
            options = replace(CaptionOptions.from_params(subset.params), shuffle_caption=False,
                              caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                              caption_tag_dropout_rate=0.0, token_warmup_step=0)
            examples.extend(Example(record, options, False, False, False, subset.params.get("resize_interpolation"),
                                    multiplier) for record in subset.validation if record.bucket is not None)
    return examples


def fixed_batches(examples: Sequence[Example], sizes: dict[int, int]) -> list[list[int]]:
    """The examples' indices in batches of one dataset and bucket each (a dataset's own batch size), in a fixed
    order: by dataset, then bucket, then the examples' order."""
    groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
    for index, example in enumerate(examples):
        record = example.record
        groups.setdefault((record.dataset_index, tuple(record.bucket)), []).append(index)
    batches = []
    for (dataset_index, _), indices in sorted(groups.items()):
        size = max(1, sizes.get(dataset_index, 1))
        batches.extend(indices[start:start + size] for start in range(0, len(indices), size))
    return batches


@dataclass(frozen=True)
class ValidationResult:
    """One pass: the mean loss over every image and timestep, the mean per timestep, and what it covered."""

    loss: float
    by_timestep: dict[int, float]
    images: int
    batches: int


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore the global generators (CPU, and the device's on CUDA) after the block."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


class Validator:
    """Computes the validation loss of whatever weights the model holds when :meth:`evaluate` is called."""

    def __init__(self, session: Session, runner: StepRunner, *, max_batches: int = 0):
        self.session = session
        self.runner = runner
        self.seed = int(session.config.training.seed)
        examples = validation_examples(session.scan)
        training = session.dataset  # its caches hold the held-out images too (engine.cache jobs_from_scan)
        self.dataset = TrainingDataset(examples, seed=self.seed, max_train_steps=0,
                                       latents=getattr(training, "latents", None) if examples else None,
                                       texts=getattr(training, "texts", None) if examples else None)
        batches = fixed_batches(examples, batch_sizes(session.scan))
        self.batches = batches[:max_batches] if max_batches > 0 else batches
        settings = session.config.training
        self.timesteps = validation_timesteps(settings.min_timestep, settings.max_timestep)

    @property
    def empty(self) -> bool:
        return not self.batches

    def evaluate(self) -> ValidationResult:
        """The loss of the current weights. Each process takes every num_processes-th batch; the sums are added
        across processes, so every process returns the same result."""
        session = self.session
        accelerator = session.accelerator
        rank, count = accelerator.process_index, accelerator.num_processes
        # Per timestep: the sum of the batch losses weighted by their image count; then the image count.
        totals = torch.zeros(len(self.timesteps) + 1, dtype=torch.float64, device=session.device)
        with preserved_rng(session.device), torch.no_grad():
            for position in range(rank, len(self.batches), count):
                totals += self._batch_totals(position)
        if count > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        values = totals.tolist()
        images = int(values[-1])
        by_timestep = {t: value / images for t, value in zip(self.timesteps, values, strict=False)} if images else {}
        loss = sum(by_timestep.values()) / len(by_timestep) if by_timestep else float("nan")
        return ValidationResult(loss, by_timestep, images, len(self.batches))

    def _batch_totals(self, position: int) -> torch.Tensor:
        from engine.train.conditioning import batch_conditioning
        from engine.train.network_scaling import apply_batch_multipliers, reset_multipliers
        from engine.train.update import seed_step_generators

        session = self.session
        keys = [SampleKey(index, epoch=0, position=position, step=0, slot=slot)
                for slot, index in enumerate(self.batches[position])]
        batch = collate([self.dataset[key] for key in keys])
        size = len(keys)
        seed_step_generators(derived_seed("validation", self.seed, position), session.device)  # VAE sampling
        latents = self.runner.latents(batch)
        apply_batch_multipliers(session, batch)
        try:
            conditioning = batch_conditioning(session, batch)
            losses = []
            for t in self.timesteps:
                batch["noise_seed"] = [derived_seed("validation", self.seed, image, t) for image in batch["image"]]
                fixed = torch.full((size,), t, dtype=torch.long, device=session.device)
                losses.append(self.runner.objective.loss(latents, conditioning, batch, timesteps=fixed).double())
        finally:
            reset_multipliers(session)
        return torch.stack([*(loss * size for loss in losses),
                            torch.tensor(float(size), dtype=torch.float64, device=losses[0].device)])


def result_fields(result: ValidationResult) -> dict[str, Any]:
    """A result as the `validation` event's fields (timesteps as strings: JSON object keys)."""
    return {"loss": result.loss, "by_timestep": {str(t): value for t, value in result.by_timestep.items()},
            "images": result.images, "batches": result.batches}
