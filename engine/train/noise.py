"""Noise, timesteps, noisy latents and targets for SD/SDXL training, as sd-scripts makes them (spec §6).

The order of the steps (and of the random draws) follows sd-scripts' ``get_noise_noisy_latents_and_timesteps``:
noise, noise offset, multi-resolution noise, timesteps, input perturbation. Every draw takes an explicit
``torch.Generator``: the trainer saves that generator's state with each checkpoint, so a resumed run draws exactly
the numbers the uninterrupted run would have. Draws happen on the generator's device (a CPU generator gives the
same numbers on any accelerator) and are then moved to the latents' device.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from engine.config.sections_training import TrainingSection

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "NoiseSettings",
    "make_noise_scheduler",
    "noisy_latents",
    "sample_noise",
    "sample_timesteps",
    "training_target",
]

# sd-scripts' training schedule for every SD/SDXL family (train_util SCHEDULER_* constants).
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def make_noise_scheduler(*, v_prediction: bool, zero_terminal_snr: bool) -> DDPMScheduler:
    """The DDPM schedule training adds noise with: sd-scripts' betas, optionally rescaled to zero terminal SNR.

    diffusers' ``rescale_betas_zero_snr`` is the same rescale as sd-scripts' (arXiv 2305.08891, Algorithm 1:
    shift and scale sqrt(alphas_cumprod) so the last step is 0 and the first is unchanged). Using the config flag
    rather than patching ``betas`` afterwards keeps ``scheduler.config`` truthful for anything built from it.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction" if v_prediction else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


@dataclass(frozen=True)
class NoiseSettings:
    """The noise options of one run; the field names are the config's (``training.*``). All off by default."""

    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = NUM_TRAIN_TIMESTEPS
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self) -> None:
        # sd-scripts raises here too; the config rules catch it earlier with a friendlier message.
        if self.adaptive_noise_scale and not self.noise_offset:
            raise ValueError("adaptive_noise_scale scales the noise offset, so it needs noise_offset above 0")
        if self.min_timestep < 0 or not 0 <= self.max_timestep <= self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}], got min_timestep="
                             f"{self.min_timestep}, max_timestep={self.max_timestep}")

    @classmethod
    def from_config(cls, training: TrainingSection) -> NoiseSettings:
        """Reads every field of the same name from the training section (the schedule length is sd-scripts')."""
        names = [field.name for field in fields(cls) if field.name in type(training).model_fields]
        return cls(**{name: getattr(training, name) for name in names})


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """N(0, 1) in float32, drawn on the generator's device and moved to ``device``."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _uniform(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One U(0, 1) scalar (a 0-d float32 tensor), drawn on the generator's device and moved to ``device``."""
    return torch.rand((), generator=generator, device=generator.device).to(device)


def sample_noise(latents: torch.Tensor, settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """The noise ε for a batch of latents: N(0, I), plus the noise offset, then the multi-resolution pyramid.

    This ε is also what an ε-prediction model is trained to predict. It is computed in float32 and returned in
    the latents' dtype.
    """
    noise = _randn(tuple(latents.shape), generator, latents.device)
    if settings.noise_offset:
        noise = _add_noise_offset(noise, latents, settings, generator)
    if settings.multires_noise_iterations:
        noise = _pyramid_noise(noise, settings, generator)
    return noise.to(latents.dtype)


def _add_noise_offset(noise: torch.Tensor, latents: torch.Tensor, settings: NoiseSettings,
                      generator: torch.Generator) -> torch.Tensor:
    """ε += o·N(0, 1)[B, C, 1, 1]: one constant per image and channel, so the model can shift mean brightness.

    With random strength, o = U(0, 1)·noise_offset (one draw per batch). With an adaptive scale s,
    o = max(0, o + s·|mean over H, W of the latents|), per image and channel.
    """
    offset: float | torch.Tensor = settings.noise_offset
    if settings.noise_offset_random_strength:
        offset = offset * _uniform(generator, latents.device)
    if settings.adaptive_noise_scale:
        spatial = tuple(range(2, latents.ndim))
        latent_mean = latents.float().mean(dim=spatial, keepdim=True).abs()
        offset = (offset + settings.adaptive_noise_scale * latent_mean).clamp(min=0.0)
    per_channel = tuple(latents.shape[:2]) + (1,) * (latents.ndim - 2)
    return noise + offset * _randn(per_channel, generator, latents.device)


def _pyramid_noise(noise: torch.Tensor, settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise: add upsampled N(0, I) at sizes shrinking by a random factor r ~ U(2, 4) per level.

    Level i is drawn at (H, W) / r**i (at least 1x1), bilinearly upsampled and scaled by discount**i; the loop
    stops once a side reaches 1, and the sum is rescaled to unit standard deviation. Level 0 is full-size, so it
    adds a second N(0, I), as in sd-scripts. r is drawn for every level, level 0 included, to keep the draw order.
    """
    batch, channels, height, width = noise.shape
    for level in range(settings.multires_noise_iterations):
        ratio = 2.0 + 2.0 * _uniform(generator, noise.device).item()
        size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = _randn((batch, channels, *size), generator, noise.device)
        upsampled = F.interpolate(coarse, size=(height, width), mode="bilinear")
        noise = noise + upsampled * settings.multires_noise_discount**level
        if 1 in size:
            break
    return noise / noise.std()


def sample_timesteps(batch_size: int, settings: NoiseSettings, device: torch.device | str,
                     generator: torch.Generator) -> torch.Tensor:
    """One timestep per sample, uniform in [min_timestep, max_timestep) (the upper bound is exclusive).

    If min_timestep >= max_timestep, sd-scripts trains every sample at max_timestep; that index is clamped to
    the last step (T - 1) because max_timestep may be T itself, one past the end of the schedule.
    """
    low, high = settings.min_timestep, settings.max_timestep
    if low >= high:
        fixed = min(high, settings.num_train_timesteps - 1)
        return torch.full((batch_size,), fixed, dtype=torch.long, device=device)
    drawn = torch.randint(low, high, (batch_size,), generator=generator, device=generator.device)
    return drawn.to(device)


def noisy_latents(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε, with input perturbation if ip_noise_gamma is set.

    Input perturbation (arXiv 2301.11706) noises the input with ε + γ·N(0, I) (γ = U(0, 1)·ip_noise_gamma with
    random strength) while the target stays the plain ε, so the model learns to correct the exposure bias of
    sampling. The caller must therefore compute the target from ``noise``, not from anything returned here.
    """
    if settings.ip_noise_gamma:
        strength: float | torch.Tensor = settings.ip_noise_gamma
        if settings.ip_noise_gamma_random_strength:
            strength = strength * _uniform(generator, latents.device)
        perturbation = _randn(tuple(latents.shape), generator, latents.device).to(noise.dtype)
        noise = noise + strength * perturbation
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    v_prediction: bool) -> torch.Tensor:
    """What the model should predict: v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 for v-prediction, otherwise ε itself."""
    if v_prediction:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise
