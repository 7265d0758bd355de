"""The training loop: micro-batches, updates, and what happens between updates (reports, saves, samples, stops).

Counting: a *step* is one optimizer update (sd-scripts' global_step); an update follows `accumulation`
micro-batches, or the last micro-batch of an epoch. Everything random in a micro-batch is seeded from
(seed, epoch, micro-batch position, process), so a run resumed from a state continues exactly as the uninterrupted
run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class StepResult:
    loss: float
    lrs: list[float]


def micro_seed(seed: int, epoch: int, position: int, rank: int) -> int:
    """The seed of a micro-batch's global draws (dropout, VAE sampling) on one process."""
    return derived_seed(seed, epoch, position, rank)


class StepRunner:
    """Forward and backward of one micro-batch, and the update after the last one of a group."""

    def __init__(self, session: Session):
        from engine.train.losses import LossSettings, snr_table
        from engine.train.noise import NoiseSettings

        self.session = session
        config = session.config
        self.noise_settings = NoiseSettings.from_config(config.training)
        self.loss_settings = LossSettings.from_config(config.training, config.model.v_parameterization)
        self.snr = snr_table(session.noise_scheduler).to(session.device)
        self.parameters = session.method.trainable_parameters()

    def micro_batch(self, batch: dict[str, Any], seed: int, accumulation: int, step: int) -> float:
        """Loss of one micro-batch (unscaled, for reporting); gradients are accumulated, divided by `accumulation`."""
        from engine.train.losses import batch_loss
        from engine.train.noise import training_target

        session = self.session
        torch.manual_seed(seed)  # dropout in the network and the text encoders, VAE sampling
        latents = self._latents(batch)
        noise, timesteps, noisy = self._noised(latents, batch["noise_seed"])
        conditioning = self._conditioning(batch)
        with session.accelerator.autocast():
            prediction = session.model.unet(noisy.to(session.weight_dtype), timesteps, **conditioning).sample
        target = training_target(session.noise_scheduler, latents, noise, timesteps,
                                 session.config.model.v_parameterization)
        weights = batch["loss_weight"].to(latents.device)
        loss = batch_loss(prediction.float(), target.float(), timesteps, weights, self.loss_settings, self.snr)
        value = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLoss(step, value, batch.get("image"))
        session.accelerator.backward(loss / accumulation)
        return value

    def _noised(self, latents: torch.Tensor, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise, timestep and noisy latents drawn per sample from the sample's own seed.

        Per sample rather than per batch, so that a sample gets the same noise whether it is trained by one process
        in a batch of 2b or by one of two processes in a batch of b (and in any position of the batch).
        """
        from engine.train.noise import noisy_latents, sample_noise, sample_timesteps

        scheduler, settings = self.session.noise_scheduler, self.noise_settings
        noises, steps, noisy = [], [], []
        for index, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(seed)
            sample = latents[index:index + 1]
            noise = sample_noise(sample, settings, generator)
            timestep = sample_timesteps(1, settings, sample.device, generator)
            noisy.append(noisy_latents(scheduler, sample, noise, timestep, settings, generator))
            noises.append(noise)
            steps.append(timestep)
        return torch.cat(noises), torch.cat(steps), torch.cat(noisy)

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        session = self.session
        scaling = session.model.vae.scaling_factor
        if "latents" in batch:
            return batch["latents"].to(session.device, torch.float32) * scaling
        vae = session.model.vae.vae
        parameter = next(vae.parameters())
        with torch.no_grad():
            pixels = batch["pixels"].to(parameter.device, parameter.dtype)
            latents = vae.encode(pixels).latent_dist.sample(generator=None)
        return latents.to(session.device, torch.float32) * scaling

    def _conditioning(self, batch: dict[str, Any]) -> dict[str, Any]:
        from engine.models.text_encoding import encode_captions

        session = self.session
        device, dtype = session.device, session.weight_dtype
        if "hidden_states" in batch:
            hidden, pooled = batch["hidden_states"], batch.get("pooled")
        else:
            config = session.config
            prepare = getattr(session.method, "prepare_captions", None)
            captions = prepare(batch["caption"]) if prepare is not None else batch["caption"]
            # Asked every step: DreamBooth stops training the text encoder part-way through a run.
            trains_text = any(session.method.trains_text_encoders)
            with torch.set_grad_enabled(trains_text), session.accelerator.autocast():
                encoded = encode_captions(session.model.text, captions, clip_skip=config.model.clip_skip,
                                          max_token_length=config.model.max_token_length)
            hidden, pooled = encoded.hidden_states, encoded.pooled
        conditioning: dict[str, Any] = {"encoder_hidden_states": hidden.to(device, dtype)}
        if session.model.family == "sdxl":
            time_ids = [list(o) + list(c) + list(t) for o, c, t in
                        zip(batch["original_size"], batch["crop_top_left"], batch["target_size"], strict=True)]
            conditioning["added_cond_kwargs"] = {
                "text_embeds": pooled.to(device, dtype),
                "time_ids": torch.tensor(time_ids, device=device, dtype=dtype),
            }
        return conditioning

    def update(self) -> list[float]:
        """Average gradients across processes, clip, step the optimizer and the schedule; returns the lrs used."""
        session = self.session
        accelerator = session.accelerator
        if accelerator.num_processes > 1:
            # Parts a method froze mid-run (DreamBooth's text encoders) must get no gradient, not a zero one.
            average_gradients([p for p in self.parameters if p.requires_grad], accelerator.num_processes)
        max_norm = session.config.optimizer.max_grad_norm
        if max_norm > 0:
            accelerator.clip_grad_norm_(self.parameters, max_norm)
        lrs = [group["lr"] for group in session.optimizer.param_groups]
        session.optimizer.step()
        session.lr_scheduler.step()
        session.optimizer.zero_grad(set_to_none=True)
        after_update = getattr(session.method, "after_update", None)
        if after_update is not None:
            after_update()
        return lrs


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
    from torch.utils.data import DataLoader

    schedule = session.schedule
    batches = EpochBatches(session.sampler, epoch=epoch, start=start, accumulation=schedule.accumulation,
                           epoch_first_step=(epoch - 1) * schedule.steps_per_epoch)
    workers = session.config.training.max_data_loader_n_workers
    return DataLoader(session.dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      persistent_workers=False)


def position_after(epoch: int, batches_done: int, global_step: int, batches_per_epoch: int) -> TrainPosition:
    """The position to resume from; a finished epoch resumes at the start of the next one."""
    if batches_done >= batches_per_epoch:
        return TrainPosition(epoch + 1, 0, global_step)
    return TrainPosition(epoch, batches_done, global_step)
