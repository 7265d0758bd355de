"""The flow-matching objective of FLUX.1 / Chroma training, as sd-scripts defines it (spec §2.2, §2.3, §4, §7).

Pure torch functions, no model code: σ per sample, the noisy input x_σ = (1 − σ)·x0 + σ·ε, the velocity target
ε − x0, the prediction types and loss weights, the 2×2 packing of latents into tokens with their position ids,
and the shifted schedule used when sampling.

Conventions (spec §4.1): σ ∈ [0, 1], σ = 1 is pure noise; the transformer receives σ itself and the loss
utilities see ``timesteps = σ·1000``. As in :mod:`engine.train.noise`, every draw takes an explicit
``torch.Generator`` (the trainer seeds one per sample) and happens on the generator's device, then moves to the
target device, so a CPU generator gives the same numbers on any accelerator and a resumed run draws what the
uninterrupted one would have.

Latent sizes are always given as ``latent_hw`` = (h, w) of the unpacked 16-channel latent (image size / 8), which
must both be even; the token grid is (h/2, w/2).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from engine.config.schema import RunConfig

__all__ = [
    "DENSITIES",
    "DensityParams",
    "LOSS_WEIGHTINGS",
    "NUM_TRAIN_TIMESTEPS",
    "PREDICTION_TYPES",
    "TIMESTEP_SAMPLERS",
    "FlowSettings",
    "apply_prediction_type",
    "draw_perturbation",
    "flow_noise",
    "flux_shift_mu",
    "image_ids",
    "inference_schedule",
    "loss_weighting",
    "loss_weights",
    "noisy_input",
    "pack_latents",
    "sample_sigmas",
    "shift_sigmas",
    "sigma_table",
    "text_ids",
    "time_shift",
    "unpack_latents",
    "velocity_target",
]

NUM_TRAIN_TIMESTEPS = 1000
# The resolution-dependent shift μ is a linear function of the token count through these two points (BFL's
# get_lin_function, diffusers' calculate_shift, sd-scripts' flux_shift): 256 tokens → 0.5, 4096 tokens → 1.15.
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
PATCH = 2  # FLUX packs 2×2 latent pixels into one token


# --- settings -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowSettings:
    """The flow-matching options of one run; names are the config's (``flow.*`` and two ``training.*`` fields).

    Defaults are sd-scripts' except ``model_prediction_type``: "raw", the only type consistent with how FLUX was
    trained (spec §4.4, Appendix A #6).
    """

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "raw"
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self) -> None:
        # The config's Literal types catch these first; this guards direct construction (tests, other callers).
        for name, registry in (("timestep_sampling", TIMESTEP_SAMPLERS), ("weighting_scheme", DENSITIES),
                               ("model_prediction_type", PREDICTION_TYPES)):
            value = getattr(self, name)
            if value not in registry:
                raise ValueError(f"unknown flow.{name} {value!r}; choose one of {', '.join(registry)}")
        if self.discrete_flow_shift <= 0:
            raise ValueError(f"flow.discrete_flow_shift must be above 0, got {self.discrete_flow_shift}")

    @classmethod
    def from_config(cls, config: RunConfig | Any) -> FlowSettings:
        """Reads the fields of the same name from ``config.flow`` and ``config.training`` (ip_noise_gamma*)."""
        values: dict[str, Any] = {}
        for section in (config.training, config.flow):
            values.update({f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)})
        return cls(**values)


# --- σ per sample (spec §4.2) -------------------------------------------------------------------------------------


def _randn(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, device=generator.device)


def _rand(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, device=generator.device)


@functools.lru_cache(maxsize=8)
def sigma_table(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """σ of FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift) in its (descending) order, float32.

    t_k = k for k = T…1, σ_k = s·(t_k/T) / (1 + (s − 1)·t_k/T). Computed with the same float32 operations as
    diffusers/sd-scripts, so the table is bit-identical to ``scheduler.sigmas``. Built once per (shift, T): the
    trainer draws σ per sample, and the table would otherwise be rebuilt for each one. Read it, never write to it.
    """
    steps = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32)
    return shift_sigmas(steps / num_train_timesteps, shift)


def shift_sigmas(sigmas: Any, shift: float) -> Any:
    """s·σ / (1 + (s − 1)·σ): the constant shift of the flow-matching schedules (s > 1 favours noisier σ).

    Plain arithmetic, written in the operation order of diffusers and sd-scripts so that it rounds as they do:
    works on tensors, numpy arrays and floats alike (the FLUX table and ``shift`` mode, SD3's training_shift and
    its sampling schedule).
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """e^μ / (e^μ + 1/t − 1): the resolution shift of BFL/sd-scripts (``time_shift(mu, 1.0, t)``).

    Written t·e^μ / (t·e^μ + 1 − t), the same value multiplied through by t, so that t = 1 gives exactly 1 and
    t = 0 exactly 0 (the other form rounds 1 to 1 + 2⁻⁵² and divides by zero at 0).
    """
    scaled = t * math.exp(mu)
    return scaled / (scaled + (1 - t))


def flux_shift_mu(image_seq_len: float, base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """μ for an image of ``image_seq_len`` tokens: linear through (256, base_shift) and (4096, max_shift).

    Extrapolates past 4096 tokens, as every reference does. The equivalent constant shift is e^μ.
    """
    slope = (max_shift - base_shift) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return slope * image_seq_len + (base_shift - slope * BASE_SEQ_LEN)


def _token_grid(latent_hw: Sequence[int]) -> tuple[int, int]:
    height, width = (int(v) for v in latent_hw)
    if height % PATCH or width % PATCH or height <= 0 or width <= 0:
        raise ValueError(f"FLUX latents must have an even, positive height and width (images a multiple of 16 px); "
                         f"got a latent of {height}x{width} — check the bucket steps / sample size")
    return height // PATCH, width // PATCH


class DensityParams(Protocol):
    """What a density reads: FlowSettings (FLUX) and engine.train.sd3_objective.SD3Settings both have these."""

    logit_mean: float
    logit_std: float
    mode_scale: float


Density = Callable[[int, DensityParams, torch.Generator], torch.Tensor]


def _logit_normal_density(batch: int, settings: DensityParams, generator: torch.Generator) -> torch.Tensor:
    """u = sigmoid(N(logit_mean, logit_std)) (SD3 paper §3.1, rf/lognorm)."""
    return torch.sigmoid(settings.logit_mean + settings.logit_std * _randn((batch,), generator))


def _mode_density(batch: int, settings: DensityParams, generator: torch.Generator) -> torch.Tensor:
    """u = 1 − u₀ − mode_scale·(cos²(π·u₀/2) − 1 + u₀), u₀ ~ U(0, 1) (SD3 paper, mode sampling with heavy tails)."""
    u = _rand((batch,), generator)
    return 1 - u - settings.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def _uniform_density(batch: int, settings: DensityParams, generator: torch.Generator) -> torch.Tensor:
    return _rand((batch,), generator)


# u for the default `sigma` mode, by weighting_scheme; the schemes that only weight the loss draw uniformly.
DENSITIES: dict[str, Density] = {
    "logit_normal": _logit_normal_density,
    "mode": _mode_density,
    "uniform": _uniform_density,
    "none": _uniform_density,
    "sigma_sqrt": _uniform_density,
    "cosmap": _uniform_density,
}

SigmaSampler = Callable[[int, FlowSettings, tuple[int, int], torch.Generator], torch.Tensor]


def _sigma_mode(batch: int, settings: FlowSettings, latent_hw: tuple[int, int],
                generator: torch.Generator) -> torch.Tensor:
    """σ = the scheduler's table at floor(u·T), u from the weighting scheme; the table carries discrete_flow_shift.

    The index is clamped into the table: u can reach 1 exactly (mode density at u₀ = 0, or mode_scale above
    about 1.3), where sd-scripts would index one past the end.
    """
    table = sigma_table(settings.discrete_flow_shift, settings.num_train_timesteps).to(generator.device)
    u = DENSITIES[settings.weighting_scheme](batch, settings, generator)
    index = (u * settings.num_train_timesteps).long().clamp(0, settings.num_train_timesteps - 1)
    return table[index]


def _uniform_mode(batch: int, settings: FlowSettings, latent_hw: tuple[int, int],
                  generator: torch.Generator) -> torch.Tensor:
    return _rand((batch,), generator)


def _logistic(batch: int, settings: FlowSettings, generator: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(settings.sigmoid_scale * _randn((batch,), generator))


def _sigmoid_mode(batch: int, settings: FlowSettings, latent_hw: tuple[int, int],
                  generator: torch.Generator) -> torch.Tensor:
    return _logistic(batch, settings, generator)


def _shift_mode(batch: int, settings: FlowSettings, latent_hw: tuple[int, int],
                generator: torch.Generator) -> torch.Tensor:
    return shift_sigmas(_logistic(batch, settings, generator), settings.discrete_flow_shift)


def _flux_shift_mode(batch: int, settings: FlowSettings, latent_hw: tuple[int, int],
                     generator: torch.Generator) -> torch.Tensor:
    rows, columns = _token_grid(latent_hw)
    return time_shift(flux_shift_mu(rows * columns), _logistic(batch, settings, generator))


TIMESTEP_SAMPLERS: dict[str, SigmaSampler] = {
    "sigma": _sigma_mode,
    "uniform": _uniform_mode,
    "sigmoid": _sigmoid_mode,
    "shift": _shift_mode,
    "flux_shift": _flux_shift_mode,
}


def sample_sigmas(batch: int, settings: FlowSettings, latent_hw: Sequence[int], generator: torch.Generator,
                  device: torch.device | str) -> torch.Tensor:
    """σ for ``batch`` samples ([B], float32 on ``device``) by ``settings.timestep_sampling`` (spec §4.2).

    ``latent_hw`` only matters to ``flux_shift``. The loss utilities' timesteps are ``σ·1000``.
    """
    hw = (int(latent_hw[0]), int(latent_hw[1]))
    return TIMESTEP_SAMPLERS[settings.timestep_sampling](batch, settings, hw, generator).float().to(device)


# --- noisy input, target, prediction, weights (spec §4.3-§4.5) ---------------------------------------------------


def per_sample_draws(seeds: list[int], draw: Callable[[torch.Generator], tuple[torch.Tensor, ...]],
                     device: torch.device) -> list[torch.Tensor]:
    """``draw`` run for each sample with a CPU generator seeded from its own seed, each kind of draw stacked over
    the batch and moved to ``device`` in one copy (no host wait on a GPU, engine.transfer).

    Drawing on the CPU gives the same numbers on any accelerator, and the per-sample seeds make a sample's draws
    independent of its batch and of the process count.
    """
    from engine.transfer import to_device

    rows = [draw(torch.Generator().manual_seed(seed)) for seed in seeds]
    return [to_device(torch.cat(column), device) for column in zip(*rows, strict=True)]


def flow_noise(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ε ~ N(0, I) shaped like ``latents`` (plain randn: FLUX ignores noise offset and pyramid noise, spec §4.7)."""
    return _randn(latents.shape, generator).to(latents.device, latents.dtype)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1, 1, …] to broadcast over ``like``."""
    return values.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))


def draw_perturbation(shape: Sequence[int], ip_noise_gamma: float, random_strength: bool,
                      generator: torch.Generator) -> torch.Tensor:
    """γ·ξ for input perturbation, on the generator's device: γ = ip_noise_gamma, or U(0, 1)·ip_noise_gamma with
    random strength, and ξ ~ N(0, I). Draw order: the strength, then ξ (as in ``engine.train.noise``)."""
    strength: float | torch.Tensor = ip_noise_gamma
    if random_strength:
        strength = ip_noise_gamma * _rand((), generator)
    return strength * _randn(shape, generator)


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, *, ip_noise_gamma: float = 0.0,
                ip_noise_gamma_random_strength: bool = False, generator: torch.Generator | None = None,
                perturbation: torch.Tensor | None = None) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·(ε + γ·ξ) (spec §4.3), computed in float32 and returned in the latents' dtype.

    γ·ξ is ``perturbation`` when given (drawn beforehand with :func:`draw_perturbation`), else drawn here from
    ``generator`` when ip_noise_gamma is set. The target stays the plain ε (see :func:`velocity_target`).
    """
    noise32 = noise.float()
    if perturbation is None and ip_noise_gamma:
        if generator is None:
            raise ValueError("noisy_input needs a generator when ip_noise_gamma is set (it draws the perturbation)")
        perturbation = draw_perturbation(latents.shape, ip_noise_gamma, ip_noise_gamma_random_strength, generator)
    if perturbation is not None:
        noise32 = noise32 + perturbation.to(latents.device)
    sigma = _per_sample(sigmas, latents)
    return ((1 - sigma) * latents.float() + sigma * noise32).to(latents.dtype)


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x0 ("noise − latents"), whatever the prediction type (spec §4.4)."""
    return noise - latents


Prediction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _raw(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    return pred


def _additive(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    return pred + noisy


def _sigma_scaled(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ − σ·p: an x0 estimate compared with the velocity target — sd-scripts' default, kept for parity only
    (spec §4.4, Appendix A #6). Unlike sd-scripts, it works with every timestep_sampling (sd-scripts has σ only
    in `sigma` mode and fails otherwise)."""
    return noisy - _per_sample(sigmas, pred).to(pred.dtype) * pred


PREDICTION_TYPES: dict[str, Prediction] = {
    "raw": _raw,
    "additive": _additive,
    "sigma_scaled": _sigma_scaled,
}


def apply_prediction_type(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor, kind: str) -> torch.Tensor:
    """The quantity the loss compares with the velocity target: p, p + x_σ or x_σ − σ·p (unpacked [B, C, h, w])."""
    return PREDICTION_TYPES[kind](pred, noisy, sigmas)


# σ below which sigma_sqrt's σ⁻² is clamped: the smallest σ of the unshifted training table. `uniform` sampling can
# draw σ = 0 exactly (torch.rand includes 0), which would make the weight, and the loss, infinite.
_SIGMA_SQRT_FLOOR = 1.0 / NUM_TRAIN_TIMESTEPS

LossWeighting = Callable[[torch.Tensor], torch.Tensor]

LOSS_WEIGHTINGS: dict[str, LossWeighting] = {
    # σ⁻² despite the name (SD3 paper / diffusers' compute_loss_weighting_for_sd3).
    "sigma_sqrt": lambda s: s.clamp(min=_SIGMA_SQRT_FLOOR) ** -2.0,
    "cosmap": lambda s: 2 / (math.pi * (1 - 2 * s + 2 * s**2)),
}


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights [B] (float32) of ``weighting_scheme`` (spec §4.5): σ⁻², cosmap, or ones."""
    sigmas = sigmas.float()
    rule = LOSS_WEIGHTINGS.get(scheme)
    return torch.ones_like(sigmas) if rule is None else rule(sigmas)


def loss_weights(settings: FlowSettings, sigmas: torch.Tensor) -> torch.Tensor | None:
    """The per-sample weights a FLUX loss is multiplied by, or None for none (spec §4.4/§4.5).

    sd-scripts weights the FLUX loss only with ``model_prediction_type = sigma_scaled``; multiplying the
    per-sample mean by these equals its element-wise weighting.
    """
    if settings.model_prediction_type != "sigma_scaled":
        return None
    return loss_weighting(settings.weighting_scheme, sigmas)


# --- packing and position ids (spec §2.2, §2.3) -------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] → [B, (h/2)·(w/2), C·4]: 2×2 patches, tokens row-major, channel = c·4 + ph·2 + pw."""
    batch, channels, height, width = latents.shape
    rows, columns = _token_grid((height, width))
    patches = latents.reshape(batch, channels, rows, PATCH, columns, PATCH)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * columns, channels * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, latent_hw: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: [B, L, C·4] → [B, C, h, w] for the latent size ``latent_hw``."""
    rows, columns = _token_grid(latent_hw)
    batch, length, width = tokens.shape
    if length != rows * columns or width % (PATCH * PATCH):
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} tokens into a {latent_hw[0]}x{latent_hw[1]} latent "
                         f"(expects {rows * columns} tokens of a multiple of 4 channels)")
    channels = width // (PATCH * PATCH)
    patches = tokens.reshape(batch, rows, columns, channels, PATCH, PATCH)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, rows * PATCH, columns * PATCH)


def image_ids(batch: int, latent_hw: Sequence[int], device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, L, 3] position ids of the packed tokens: (0, row, column), in packing order."""
    rows, columns = _token_grid(latent_hw)
    ids = torch.zeros(rows, columns, 3, dtype=dtype, device=device)
    ids[..., 1] = torch.arange(rows, dtype=dtype, device=device)[:, None]
    ids[..., 2] = torch.arange(columns, dtype=dtype, device=device)[None, :]
    return ids.reshape(1, rows * columns, 3).expand(batch, -1, -1).contiguous()


def text_ids(batch: int, length: int, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, L_txt, 3] zeros: text tokens carry no position in FLUX's 3-axis RoPE."""
    return torch.zeros(batch, length, 3, dtype=dtype, device=device)


# --- sampling schedule (spec §7) ----------------------------------------------------------------------------------


def inference_schedule(steps: int, image_seq_len: int, shift: bool = True, base_shift: float = BASE_SHIFT,
                       max_shift: float = MAX_SHIFT) -> list[float]:
    """BFL's ``get_schedule``: steps + 1 values of σ from 1 down to 0, time-shifted by μ(image_seq_len) if ``shift``.

    t = linspace(1, 0, steps + 1), then t ← e^μ/(e^μ + 1/t − 1). Computed in float64 (BFL in float32).
    """
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        t = time_shift(flux_shift_mu(image_seq_len, base_shift, max_shift), t)
    return t.tolist()
