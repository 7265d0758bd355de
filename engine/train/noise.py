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
    "NoiseDraws",
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


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) in float32, drawn on the generator's device."""
    return torch.randn(shape, generator=generator, device=generator.device)


def _uniform(batch: int, generator: torch.Generator) -> torch.Tensor:
    """One U(0, 1) draw, repeated for `batch` samples ([B] float32, on the generator's device)."""
    return torch.rand((), generator=generator, device=generator.device).expand(batch)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1, 1, …] to broadcast over ``like``."""
    return values.view(-1, *([1] * (like.ndim - 1)))


@dataclass
class NoiseDraws:
    """A batch's random numbers for one DDPM training step, drawn on the CPU in sd-scripts' order.

    Drawing and combining are separate so that the draws can be made per sample, each from its own generator
    (:meth:`per_sample`), and reach the device in one copy per kind instead of several per sample; the parts that
    depend on the latents (the adaptive noise offset, the pyramid's normalisation, x_t) are computed there.
    """

    base: torch.Tensor  # ε plus the pyramid's levels, not yet normalised, [B, C, H, W]
    offset_strength: torch.Tensor | None = None  # o, or U(0, 1)·o with random strength, [B]
    offset_noise: torch.Tensor | None = None  # N(0, 1) per image and channel, [B, C, 1, 1]
    timesteps: torch.Tensor | None = None  # [B] long
    ip_strength: torch.Tensor | None = None  # γ, or U(0, 1)·γ with random strength, [B]
    ip_noise: torch.Tensor | None = None  # the input perturbation ξ, [B, C, H, W]

    @classmethod
    def per_sample(cls, sample_shape: tuple[int, ...], settings: NoiseSettings,
                   generators: list[torch.Generator]) -> NoiseDraws:
        """Each sample's noise, timestep and input perturbation from its own generator (``sample_shape`` is one
        sample's, batch dimension 1), in the order one generator would draw them; stacked into one batch."""
        draws = []
        for generator in generators:
            drawn = _draw_noise(sample_shape, settings, generator)
            drawn.timesteps = sample_timesteps(1, settings, generator.device, generator)
            drawn.ip_strength, drawn.ip_noise = _draw_perturbation(sample_shape, settings, generator)
            draws.append(drawn)
        return cls(**{field.name: _cat([getattr(drawn, field.name) for drawn in draws]) for field in fields(cls)})

    def to(self, device: torch.device) -> NoiseDraws:
        """Every draw on ``device`` (from pinned memory without a host wait, engine.transfer)."""
        from engine.transfer import to_device

        return NoiseDraws(**{field.name: None if getattr(self, field.name) is None
                             else to_device(getattr(self, field.name), device) for field in fields(self)})

    def noise(self, latents: torch.Tensor, settings: NoiseSettings, *, per_sample_std: bool = True) -> torch.Tensor:
        """ε for ``latents`` (on their device, in their dtype): the base, plus the noise offset, normalised to unit
        standard deviation when the pyramid is on (per sample, or over the whole batch as sd-scripts does)."""
        noise = self.base
        if self.offset_noise is not None:
            offset = _per_sample(self.offset_strength, latents)
            if settings.adaptive_noise_scale:
                # o = max(0, o + s·|mean over H, W of the latents|), per image and channel.
                spatial = tuple(range(2, latents.ndim))
                latent_mean = latents.float().mean(dim=spatial, keepdim=True).abs()
                offset = (offset + settings.adaptive_noise_scale * latent_mean).clamp(min=0.0)
            noise = noise + offset * self.offset_noise
        if settings.multires_noise_iterations:
            std = noise.flatten(1).std(dim=1) if per_sample_std else noise.std().expand(noise.shape[0])
            noise = noise / _per_sample(std, noise)
        return noise.to(latents.dtype)

    def perturbed(self, noise: torch.Tensor) -> torch.Tensor:
        """ε + γ·ξ, the noise x_t is made with under input perturbation (``noise`` itself without it)."""
        if self.ip_noise is None:
            return noise
        return noise + _per_sample(self.ip_strength, noise) * self.ip_noise.to(noise.dtype)


def _cat(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    if values[0] is None:
        return None
    return values[0] if len(values) == 1 else torch.cat(values)


def _draw_noise(shape: tuple[int, ...], settings: NoiseSettings, generator: torch.Generator) -> NoiseDraws:
    """ε, the noise offset's draws, then the pyramid's levels (added into the base), for a batch of ``shape``.

    With random strength, the offset's o = U(0, 1)·noise_offset is one draw for the whole batch (sd-scripts).
    """
    draws = NoiseDraws(base=_randn(shape, generator))
    if settings.noise_offset:
        strength = torch.full((shape[0],), settings.noise_offset, device=generator.device)
        if settings.noise_offset_random_strength:
            strength = strength * _uniform(shape[0], generator)
        draws.offset_strength = strength
        draws.offset_noise = _randn(tuple(shape[:2]) + (1,) * (len(shape) - 2), generator)
    if settings.multires_noise_iterations:
        draws.base = draws.base + _pyramid_levels(shape, settings, generator)
    return draws


def _pyramid_levels(shape: tuple[int, ...], settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution noise: upsampled N(0, I) at sizes shrinking by a random factor r ~ U(2, 4) per level.

    Level i is drawn at (H, W) / r**i (at least 1x1), bilinearly upsampled and scaled by discount**i; the loop
    stops once a side reaches 1 (the caller rescales the sum to unit standard deviation). Level 0 is full-size,
    so it adds a second N(0, I), as in sd-scripts. r is drawn for every level, level 0 included, to keep the draw
    order; it is read on the host, from a CPU generator, which makes the device wait for nothing.
    """
    batch, channels, height, width = shape
    total = torch.zeros(shape, device=generator.device)
    for level in range(settings.multires_noise_iterations):
        ratio = 2.0 + 2.0 * torch.rand((), generator=generator, device=generator.device).item()
        size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = _randn((batch, channels, *size), generator)
        total = total + F.interpolate(coarse, size=(height, width), mode="bilinear") * \
            settings.multires_noise_discount**level
        if 1 in size:
            break
    return total


def _draw_perturbation(shape: tuple[int, ...], settings: NoiseSettings,
                       generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input perturbation's γ ([B]) and ξ, or (None, None) when ip_noise_gamma is off: the strength, then ξ."""
    if not settings.ip_noise_gamma:
        return None, None
    strength = torch.full((shape[0],), settings.ip_noise_gamma, device=generator.device)
    if settings.ip_noise_gamma_random_strength:
        strength = strength * _uniform(shape[0], generator)
    return strength, _randn(shape, generator)


def sample_noise(latents: torch.Tensor, settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """The noise ε for a batch of latents from one generator: N(0, I), plus the noise offset, then the
    multi-resolution pyramid (normalised over the whole batch, as sd-scripts does).

    This ε is also what an ε-prediction model is trained to predict. It is computed in float32 and returned in
    the latents' dtype. Training draws per sample instead (:meth:`NoiseDraws.per_sample`).
    """
    draws = _draw_noise(tuple(latents.shape), settings, generator).to(latents.device)
    return draws.noise(latents, settings, per_sample_std=False)


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
    strength, perturbation = _draw_perturbation(tuple(latents.shape), settings, generator)
    draws = NoiseDraws(base=noise, ip_strength=strength, ip_noise=perturbation).to(latents.device)
    return scheduler.add_noise(latents, draws.perturbed(noise), timesteps)


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    v_prediction: bool) -> torch.Tensor:
    """What the model should predict: v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 for v-prediction, otherwise ε itself."""
    if v_prediction:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise
