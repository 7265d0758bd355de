"""The training loop: micro-batches, updates, and what happens between updates (reports, saves, samples, stops).

Counting: a *step* is one optimizer update (sd-scripts' global_step); an update follows `accumulation`
micro-batches, or the last micro-batch of an epoch. Everything random in a micro-batch is seeded from
(seed, epoch, micro-batch position, process), so a run resumed from a state continues exactly as the uninterrupted
run would have.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.train.dataset import EpochBatches, collate, derived_seed
from engine.train.setup import Session
from engine.train.state import TrainPosition


class NonFiniteLoss(RuntimeError):
    """A micro-batch whose loss is not finite; `images` are its images, so a bad input (a damaged image, a cache
    file that passed its checks but overflows the model) can be found."""

    def __init__(self, step: int, value: float, images: list[str] | None = None):
        named = f" (images of that batch: {', '.join(images)})" if images else ""
        super().__init__(f"the loss became {value} at step {step}{named}")
        self.step = step
        self.value = value
        self.images = list(images or [])


def micro_seed(seed: int, epoch: int, position: int, rank: int) -> int:
    """The seed of a micro-batch's global draws (dropout, VAE sampling) on one process."""
    return derived_seed(seed, epoch, position, rank)


class StepRunner:
    """Forward and backward of one micro-batch, and the update after the last one of a group.

    What differs per family (noise, target, the denoiser's call, its conditioning) comes from the family's
    objective (engine.train.objectives) and conditioning builder (engine.train.conditioning).
    """

    def __init__(self, session: Session):
        from engine.train.objectives import make_objective
        from engine.train.update import OptimizerUpdate

        self.session = session
        self.objective = make_objective(session)
        self.parameters = session.method.trainable_parameters()
        self.optimizer_update = OptimizerUpdate(session.optimizer, session.precision.scaler,
                                                self.parameters, session.config.optimizer.max_grad_norm)
        # optimizer.fused_backward_pass: each weight is averaged, clipped and stepped by a hook as soon as its
        # gradient is complete during backward, so update() only moves the schedule on.
        self.fused = None
        if session.config.optimizer.fused_backward_pass:
            from engine.train.fused_backward import FusedBackward

            self.fused = FusedBackward(session.optimizer, max_grad_norm=session.config.optimizer.max_grad_norm,
                                       world_size=session.accelerator.num_processes)

    def micro_batch(self, batch: dict[str, Any], seed: int, accumulation: int, step: int) -> torch.Tensor:
        """Loss of one micro-batch (detached, on the device, unscaled, for reporting); gradients are accumulated,
        divided by `accumulation`.

        Nothing here waits for the device: the losses of an update are read and checked once, after their backward
        passes (`checked_loss`). With the fused backward pass, whose hooks step the weights during backward, the
        loss is checked before it instead.
        """
        from engine.train.conditioning import batch_conditioning
        from engine.train.network_scaling import apply_batch_multipliers, reset_multipliers
        from engine.train.update import seed_step_generators

        session = self.session
        seed_step_generators(seed, session.device)  # dropout in the network and the text encoders, VAE sampling
        latents = self.latents(batch)
        # Each dataset's network_multiplier, from the text encoders (conditioning) to the backward pass.
        apply_batch_multipliers(session, batch)
        try:
            loss = self.objective.loss(latents, batch_conditioning(session, batch), batch)
            if self.fused is not None:
                checked_loss([loss.detach()], [batch.get("image")], step)
            self.optimizer_update.backward(loss / accumulation if accumulation > 1 else loss)
        finally:
            reset_multipliers(session)
        return loss.detach()

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's latents as the denoiser sees them (shifted and scaled), float32 on the device."""
        from engine.transfer import to_device

        session = self.session
        loaded = session.model.vae
        if "latents" in batch:
            return loaded.normalize(to_device(batch["latents"], session.device, torch.float32))
        vae = loaded.vae
        parameter = next(vae.parameters())
        with torch.no_grad():
            pixels = to_device(batch["pixels"], parameter.device, parameter.dtype)
            latents = vae.encode(pixels).latent_dist.sample(generator=None)
        return loaded.normalize(latents.to(session.device, torch.float32))

    def update(self) -> list[float]:
        """Average gradients across processes, clip, step the optimizer and the schedule; returns the lrs used."""
        session = self.session
        accelerator = session.accelerator
        if self.fused is not None:
            return self._after_fused_update()
        if accelerator.num_processes > 1:
            # Parts a method froze mid-run (DreamBooth's text encoders) must get no gradient, not a zero one.
            average_gradients([p for p in self.parameters if p.requires_grad], accelerator.num_processes)
        lrs = [group["lr"] for group in session.optimizer.param_groups]
        self.optimizer_update.step()
        session.lr_scheduler.step()
        after_update = getattr(session.method, "after_update", None)
        if after_update is not None:
            after_update()
        return lrs

    def _after_fused_update(self) -> list[float]:
        session = self.session
        lrs = [group["lr"] for group in session.optimizer.param_groups]
        session.lr_scheduler.step()
        after_update = getattr(session.method, "after_update", None)
        if after_update is not None:
            after_update()
        return lrs


def checked_loss(losses: list[torch.Tensor], images: list[list[str] | None], step: int) -> float:
    """The mean of an update's micro-batch losses, read from the device in one transfer.

    Raises:
        NonFiniteLoss: a micro-batch's loss is NaN or infinite (the first such, with its images); the caller
            must then not step the optimizer.
    """
    # One device-to-host copy for the whole update.
    values = [float(losses[0])] if len(losses) == 1 else [float(value) for value in torch.stack(losses).cpu()]
    for value, named in zip(values, images, strict=True):
        if not math.isfinite(value):
            raise NonFiniteLoss(step, value, named)
    return sum(values) / len(values)


def average_gradients(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce every gradient in one flat buffer and divide by the process count (what DDP would do).

    The network's modules are called from inside the frozen UNet, never through a DDP wrapper's forward, so DDP's
    own hooks would not fire; reducing here is explicit and cannot silently skip.
    """
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for parameter, grad in zip(parameters, grads, strict=True):
        count = grad.numel()
        parameter.grad = flat[offset:offset + count].view_as(grad).to(grad.dtype)
        offset += count


def epoch_loader(session: Session, epoch: int, start: int) -> Any:
    """The DataLoader of one epoch, from batch `start` on.

    With training.persistent_data_loader_workers (and workers > 0) one DataLoader serves every epoch: its batch
    sampler is moved to the new epoch, and the worker processes started for the first epoch keep running instead
    of being started again (and importing torch again) at each epoch. The batch sampler runs in this process, so
    moving it is all the workers need.
    """
    from torch.utils.data import DataLoader

    schedule = session.schedule
    position = {"epoch": epoch, "start": start, "epoch_first_step": (epoch - 1) * schedule.steps_per_epoch}
    training = session.config.training
    workers = training.max_data_loader_n_workers
    persistent = training.persistent_data_loader_workers and workers > 0
    kept = getattr(session, _KEPT_LOADER, None) if persistent else None
    if kept is not None:
        kept.batch_sampler.move_to(**position)
        return kept
    batches = EpochBatches(session.sampler, accumulation=schedule.accumulation, **position)
    # Pinned batches reach the GPU without the host waiting for the copy (engine.transfer); caches kept on
    # the device give batches that are there already (and cannot be pinned).
    pin = session.device.type == "cuda" and not training.cache_on_device
    loader = DataLoader(session.dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                        persistent_workers=persistent, pin_memory=pin)
    if persistent:
        setattr(session, _KEPT_LOADER, loader)  # the session lives as long as the run, and so do the workers
    return loader


_KEPT_LOADER = "_persistent_data_loader"


def position_after(epoch: int, batches_done: int, global_step: int, batches_per_epoch: int) -> TrainPosition:
    """The position to resume from; a finished epoch resumes at the start of the next one."""
    if batches_done >= batches_per_epoch:
        return TrainPosition(epoch + 1, 0, global_step)
    return TrainPosition(epoch, batches_done, global_step)
