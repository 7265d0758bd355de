"""The SD3 / SD3.5 training objective and conditioning, as sd-scripts defines them (flux-sd3-spec §8.3, §8.4).

Flow matching like FLUX (σ = 1 is pure noise, x_σ = (1 − σ)·x0 + σ·ε), but with SD3's own choices:

* σ comes in steps of 0.001: u from the ``flow.weighting_scheme`` density, shifted by ``flow.training_shift``,
  stretched onto [min_timestep, max_timestep] and floored to an integer timestep t; σ = t/1000 (σ can be 0).
* The MMDiT sees t (0…1000), ``context`` and ``y``; its output p is preconditioned to an x0 estimate
  x̂0 = x_σ − σ·p and compared with the clean latents, weighted by ``weighting_scheme`` (σ⁻², cosmap or 1).
  x̂0 − x0 = σ·(p − (ε − x0)), so this is the velocity loss weighted by σ² (times the scheme's weight).
* No input perturbation, noise offset or SNR weighting (sd-scripts ignores them for SD3, spec App. A #10).
* Per sample and per text encoder, ``training.{clip_l,clip_g,t5}_dropout_rate`` replace that encoder's share of
  ``context`` and ``y`` with zeros (spec §8.3), on fresh and cached encodings alike.

Every draw comes from a CPU generator seeded from the sample's own ``batch["noise_seed"]`` (the text dropout from a
seed derived from it), so a sample draws the same whatever its batch or process count, and a resumed run draws
what the uninterrupted one would have. The one exception is ``flow.pos_emb_random_crop_rate``'s window, drawn once
per micro-batch (the MMDiT crops one table for the whole batch) from its first sample's seed: a resumed run draws
it again, but another batch size or process count draws other windows. The maths are pure functions, unit-tested
against the spec's formulas; the objective and the conditioning builder put them together for the trainer.

Differences from sd-scripts, on purpose:
* σ and t stay in float32; sd-scripts casts t to the weight dtype before σ = t/1000, which in bfloat16 rounds
  t (e.g. 999 → 1000) and so σ.
* ``sigma_sqrt``'s σ⁻² is taken with σ floored at 0.001 (:func:`engine.train.flow.loss_weighting`): at t = 0
  sd-scripts multiplies a zero loss by inf and the batch loss becomes NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.transfer import to_device

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.encoded_text import EncodedText
    from engine.train.setup import Session

__all__ = ["SD3Objective", "SD3Settings", "noisy_input", "sample_timesteps", "sd3_conditioning", "sigmas_of",
           "text_dropout_generators", "x0_prediction"]

NUM_TRAIN_TIMESTEPS = 1000
# flow.* and training.* fields read by SD3Settings.from_config; the names are sd-scripts'.
_FLOW_FIELDS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "training_shift")
_TRAINING_FIELDS = ("min_timestep", "max_timestep", "clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate")


@dataclass(frozen=True)
class SD3Settings:
    """The SD3 objective's options; names and defaults are sd-scripts' (``flow.*`` and ``training.*``)."""

    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    training_shift: float = 1.0
    min_timestep: int = 0
    max_timestep: int = NUM_TRAIN_TIMESTEPS
    clip_l_dropout_rate: float = 0.0
    clip_g_dropout_rate: float = 0.0
    t5_dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        # The config's types and rules catch these first; this guards direct construction (tests, other callers).
        from engine.train.flow import DENSITIES

        if self.weighting_scheme not in DENSITIES:
            raise ValueError(f"unknown flow.weighting_scheme {self.weighting_scheme!r}; choose one of "
                             f"{', '.join(DENSITIES)}")
        if self.training_shift <= 0:
            raise ValueError(f"flow.training_shift must be above 0, got {self.training_shift}")
        # min == max is allowed: every sample then trains at that one timestep (sd-scripts' validation trick).
        if not 0 <= self.min_timestep <= self.max_timestep <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"training.min_timestep ({self.min_timestep}) and max_timestep ({self.max_timestep}) "
                             f"must satisfy 0 <= min <= max <= {NUM_TRAIN_TIMESTEPS}")
        for name, rate in zip(_TRAINING_FIELDS[2:], self.dropout_rates, strict=True):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"training.{name} must lie in [0, 1], got {rate}")

    @property
    def dropout_rates(self) -> tuple[float, float, float]:
        """(CLIP-L, CLIP-G, T5) text dropout rates, in the order of the text encoders."""
        return (self.clip_l_dropout_rate, self.clip_g_dropout_rate, self.t5_dropout_rate)

    @classmethod
    def from_config(cls, config: RunConfig | Any) -> SD3Settings:
        """Reads the fields of the same name from ``config.flow`` and ``config.training``."""
        values = {name: getattr(config.flow, name) for name in _FLOW_FIELDS}
        values.update({name: getattr(config.training, name) for name in _TRAINING_FIELDS})
        return cls(**values)


# --- the maths (spec §8.4) ----------------------------------------------------------------------------------------


def sample_timesteps(batch: int, settings: SD3Settings, generator: torch.Generator,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """t for ``batch`` samples ([B], float32 whole numbers in [min_timestep, max_timestep]), spec §8.4 steps 1-3.

    u from the weighting scheme's density (uniform, logit_normal, mode; the same densities as FLUX's ``sigma``
    mode), u ← s·u/(1 + (s − 1)·u) with s = training_shift, t = ⌊u·(t_max − t_min) + t_min⌋. t reaches t_max only
    where u is exactly 1 (the mode density at u₀ = 0).
    """
    from engine.train.flow import DENSITIES, shift_sigmas

    u = shift_sigmas(DENSITIES[settings.weighting_scheme](batch, settings, generator), settings.training_shift)
    span = settings.max_timestep - settings.min_timestep
    t = torch.floor(u.float() * span + settings.min_timestep)
    return t.to(device) if device is not None else t


def sigmas_of(timesteps: torch.Tensor) -> torch.Tensor:
    """σ = t/1000 (float32)."""
    return timesteps.float() / NUM_TRAIN_TIMESTEPS


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = σ·ε + (1 − σ)·x0 in float32, returned in the latents' dtype (no input perturbation for SD3)."""
    from engine.train import flow

    return flow.noisy_input(latents, noise, sigmas)


def x0_prediction(pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_σ − σ·p: the MMDiT's output preconditioned to the clean latents it is compared with."""
    from engine.train import flow

    return flow.apply_prediction_type(pred, noisy, sigmas, "sigma_scaled")


# --- the objective ------------------------------------------------------------------------------------------------


class SD3Objective:
    """Flow matching with an x0 target on an SD3 MMDiT (engine.models.sd3.mmdit.MMDiT), spec §8.4."""

    def __init__(self, session: Session):
        from engine.train.losses import LossSettings

        config = session.config
        self.session = session
        self.settings = SD3Settings.from_config(config)
        self.loss_settings = LossSettings.from_config(config.training, False)
        self.mmdit = getattr(session.model.unet, "module", session.model.unet)  # DDP wraps a fully trained one

    def loss(self, latents: torch.Tensor, conditioning: dict[str, Any], batch: dict[str, Any],
             timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's loss; given `timesteps` (t in 0…1000, one per sample) replace the drawn ones (validation)."""
        from engine.train.flow import loss_weighting
        from engine.train.losses import batch_loss, batch_mask, batch_weights
        from engine.train.network_scaling import preserved_target

        session = self.session
        noise, timesteps, noisy = self._noised(latents, batch["noise_seed"], timesteps)
        sigmas = sigmas_of(timesteps)

        def predict() -> torch.Tensor:
            if getattr(self.mmdit, "pos_emb_random_crop_rate", 0.0) > 0:  # set by configure_positions
                # The crop window's draw comes from the micro-batch's first seed, so a resumed run draws it again
                # (and diff_output_preservation's second forward the same window).
                from engine.train.dataset import derived_seed

                seed = derived_seed("pos_emb_crop", batch["noise_seed"][0])
                self.mmdit.pos_emb_generator = torch.Generator().manual_seed(seed)
            with session.precision.autocast():
                # t stays float32: the MMDiT's timestep embedding computes its frequencies in float32 anyway.
                pred = session.model.unet(x=noisy.to(session.weight_dtype), t=timesteps, y=conditioning["y"],
                                          context=conditioning["context"])
            return x0_prediction(pred.float(), noisy.float(), sigmas)

        prediction = predict()
        target = preserved_target(session, batch, latents.float(), predict)
        weights = batch_weights(batch, latents.device)
        weighting = loss_weighting(self.settings.weighting_scheme, sigmas)
        weights = weighting if weights is None else weights * weighting
        return batch_loss(prediction, target, timesteps, weights, self.loss_settings, None,
                          mask=batch_mask(batch, latents.device))

    def _noised(self, latents: torch.Tensor, seeds: list[int],
                fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ε, t and x_σ per sample, from its own seed: ε first, then u (sd-scripts' order); `fixed` replaces t."""
        from engine.train.flow import flow_noise, per_sample_draws

        sample_shape = (1, *latents.shape[1:])

        def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            return flow_noise(torch.empty(sample_shape), generator), sample_timesteps(1, self.settings, generator)

        noise, timesteps = per_sample_draws(seeds, draw, latents.device)
        if fixed is not None:
            timesteps = fixed.to(timesteps.device, timesteps.dtype)
        noise = noise.to(latents.dtype)
        return noise, timesteps, noisy_input(latents, noise, sigmas_of(timesteps))


def training_latent_sizes(scan: Any) -> list[int]:
    """round(√(w·h)) / 8 of every dataset's resolution: the latent sizes the scaled position tables are built for
    (sd-scripts collects them the same way, spec §8.5)."""
    sizes = {round(math.sqrt(width * height)) // 8 for width, height in
             (dataset.params["resolution"] for dataset in scan.datasets)}
    return sorted(sizes)


def configure_positions(config: RunConfig, model: Any, scan: Any) -> None:
    """flow.pos_emb_random_crop_rate and flow.enable_scaled_pos_embed on the loaded MMDiT (before training starts);
    the MMDiT applies them only in passes that record gradients, so samples and validation use the centred table,
    as inference does."""
    model.unet.pos_emb_random_crop_rate = config.flow.pos_emb_random_crop_rate
    if config.flow.enable_scaled_pos_embed:
        model.unet.enable_scaled_pos_embed(training_latent_sizes(scan))


# --- conditioning (spec §8.3) -------------------------------------------------------------------------------------


def text_dropout_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample for the text dropout, seeded from (not with) the sample's noise seed, so its
    draws neither repeat the noise's nor change with the batch, and a resumed run drops what it dropped before."""
    from engine.train.dataset import derived_seed

    return [torch.Generator().manual_seed(derived_seed("text_dropout", seed)) for seed in seeds]


def sd3_conditioning(session: Session, batch: dict[str, Any], encoded: EncodedText) -> dict[str, Any]:
    """The MMDiT's ``context`` [B, 77 + L, C] and ``y`` [B, adm] for ``batch``, after the per-encoder dropout."""
    from engine.models.sd3.text import drop_text_outputs, text_layout

    rates = SD3Settings.from_config(session.config).dropout_rates
    if any(rates):
        encoded = drop_text_outputs(encoded, text_layout(session.model.text), rates,
                                    text_dropout_generators(batch["noise_seed"]))
    if encoded.pooled is None:
        raise ValueError("SD3 conditioning needs the pooled CLIP-L + CLIP-G vector, and the text encoding gave none; "
                         "re-cache the text-encoder outputs (delete the _sd3_te cache files)")
    device, dtype = session.device, session.weight_dtype
    return {"context": to_device(encoded.hidden_states, device, dtype), "y": to_device(encoded.pooled, device, dtype)}
