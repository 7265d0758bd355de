"""The SD/SDXL training loss as sd-scripts reduces it (spec §6, ``train_network.py`` ``process_batch``).

Pipeline: element loss in float32 -> × alpha mask (optional) -> mean over C, H, W -> × per-sample weights
(prior_loss_weight for regularization images) -> × SNR-based weights (min-SNR, scale-v-like-noise, debiased
estimation) -> mean over the batch.

Unlike sd-scripts (spec Appendix A #8), the SNR table comes from the schedule that is actually trained, i.e.
after the zero-terminal-SNR rescale. There the last step has SNR = 0; each weight below uses its mathematical
limit at SNR = 0 where one exists, and the one weight without a finite limit is clamped (see
:func:`_debiased_weight`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from engine.config.sections_training import TrainingSection

__all__ = [
    "ELEMENT_LOSSES",
    "HUBER_SCHEDULES",
    "LossSettings",
    "batch_loss",
    "batch_mask",
    "batch_weights",
    "element_loss",
    "huber_c",
    "snr_table",
    "snr_weights",
]

# sd-scripts caps the SNR at 1000 for scale-v-pred and debiased estimation: the SNR of step 0 is about 1175.
SNR_CAP = 1000.0


@dataclass(frozen=True)
class LossSettings:
    """The loss options of one run; the field names are the config's (``training.*``) plus the model's
    prediction type."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float = 0.0
    scale_v_pred_loss_like_noise_pred: bool = False
    debiased_estimation_loss: bool = False
    v_prediction: bool = False

    def __post_init__(self) -> None:
        if self.loss_type not in ELEMENT_LOSSES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {', '.join(ELEMENT_LOSSES)}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ValueError(f"unknown huber_schedule {self.huber_schedule!r}; choose one of "
                             f"{', '.join(HUBER_SCHEDULES)}")
        # sd-scripts raises here too; the config rules catch it earlier with a friendlier message.
        if self.scale_v_pred_loss_like_noise_pred and not self.v_prediction:
            raise ValueError("scale_v_pred_loss_like_noise_pred only applies to v-prediction models")

    @classmethod
    def from_config(cls, training: TrainingSection, v_prediction: bool) -> LossSettings:
        """The loss settings of a run: the training section's loss fields and ``model.v_parameterization``."""
        return cls(
            loss_type=training.loss_type,
            huber_schedule=training.huber_schedule,
            huber_c=training.huber_c,
            huber_scale=training.huber_scale,
            min_snr_gamma=training.min_snr_gamma,
            scale_v_pred_loss_like_noise_pred=training.scale_v_pred_loss_like_noise_pred,
            debiased_estimation_loss=training.debiased_estimation_loss,
            v_prediction=v_prediction,
        )


def snr_table(scheduler: DDPMScheduler) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) for every training step of the scheduler, in float32.

    Computed from the scheduler's own ``alphas_cumprod``, so with zero terminal SNR the last entry is 0 (never
    inf: ᾱ < 1 at every step, ᾱ_0 being 1 − β_0).
    """
    alphas_cumprod = scheduler.alphas_cumprod.detach().float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _lookup(table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``table[timesteps]`` on the timesteps' device, whichever device the table lives on."""
    return table[timesteps.to(table.device)].to(timesteps.device)


# --- Huber threshold c per sample ---------------------------------------------------------------------------------

HuberSchedule = Callable[[LossSettings, torch.Tensor, torch.Tensor], torch.Tensor]


def _constant_c(settings: LossSettings, timesteps: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    return torch.full(timesteps.shape, settings.huber_c * settings.huber_scale, device=timesteps.device)


def _exponential_c(settings: LossSettings, timesteps: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    """c = huber_scale·huber_c^(t/T): c falls from huber_scale at t = 0 towards huber_scale·huber_c at t = T."""
    num_steps = snr.shape[0]
    return settings.huber_scale * torch.exp(timesteps.float() * math.log(settings.huber_c) / num_steps)


def _snr_c(settings: LossSettings, timesteps: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    """c = (1 − huber_c)/(1 + σ_t)² + huber_c with σ_t = √((1 − ᾱ_t)/ᾱ_t); huber_scale is not applied (sd-scripts).

    σ_t = 1/√SNR_t, so 1/(1 + σ_t)² = (√SNR_t/(1 + √SNR_t))², which is finite for every SNR and gives
    c = huber_c at SNR = 0 (the zero-terminal-SNR last step, where σ is infinite): the formula's limit.
    """
    root = _lookup(snr, timesteps).sqrt()
    return (1.0 - settings.huber_c) * (root / (1.0 + root)) ** 2 + settings.huber_c


HUBER_SCHEDULES: dict[str, HuberSchedule] = {
    "constant": _constant_c,
    "exponential": _exponential_c,
    "snr": _snr_c,
}


def huber_c(settings: LossSettings, timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """The Huber threshold c of each sample (float32, shape [B]) for ``settings.huber_schedule``."""
    return HUBER_SCHEDULES[settings.huber_schedule](settings, timesteps, snr_table(scheduler))


# --- element-wise loss --------------------------------------------------------------------------------------------

ElementLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _per_sample(c: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Shape the per-sample threshold [B] to broadcast over a [B, C, H, W] loss."""
    if c is None:
        raise ValueError("the huber and smooth_l1 losses need a threshold c per sample (see huber_c)")
    return c.to(like).view(-1, *([1] * (like.ndim - 1)))


def _l2(pred: torch.Tensor, target: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    return (pred - target) ** 2


def _l1(pred: torch.Tensor, target: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    return (pred - target).abs()


def _huber(pred: torch.Tensor, target: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """2c·(√((p − y)² + c²) − c): pseudo-Huber, ≈ (p − y)² for small errors and ≈ 2c·|p − y| for large ones."""
    c = _per_sample(c, pred)
    return 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)


def _smooth_l1(pred: torch.Tensor, target: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """2·(√((p − y)² + c²) − c): the pseudo-Huber curve without the factor c, ≈ 2|p − y| for large errors."""
    c = _per_sample(c, pred)
    return 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)


ELEMENT_LOSSES: dict[str, ElementLoss] = {
    "l2": _l2,
    "l1": _l1,
    "huber": _huber,
    "smooth_l1": _smooth_l1,
}
_NEEDS_C = frozenset({"huber", "smooth_l1"})


def element_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                 c: torch.Tensor | None = None) -> torch.Tensor:
    """The unreduced loss, computed in float32 whatever the model's dtype (sd-scripts does the same).

    ``c`` is the per-sample threshold ([B]) that huber and smooth_l1 need; l2 and l1 ignore it.
    """
    return ELEMENT_LOSSES[loss_type](pred.float(), target.float(), c)


# --- SNR-based per-sample weights ---------------------------------------------------------------------------------

SnrWeight = Callable[[torch.Tensor, LossSettings, torch.Tensor], torch.Tensor]


def _min_snr_weight(snr: torch.Tensor, settings: LossSettings, table: torch.Tensor) -> torch.Tensor:
    """Min-SNR-γ (arXiv 2303.09556): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v.

    The ε form is written min(1, γ/SNR): equal for SNR > 0, and at SNR = 0 it gives the limit 1, not 0/0.
    """
    gamma = settings.min_snr_gamma
    if settings.v_prediction:
        return snr.clamp(max=gamma) / (snr + 1.0)
    return (gamma / snr).clamp(max=1.0)


def _scale_v_weight(snr: torch.Tensor, settings: LossSettings, table: torch.Tensor) -> torch.Tensor:
    """SNR'/(SNR' + 1) with SNR' = min(SNR, 1000): weights a v-loss like an ε-loss (0 at SNR = 0)."""
    capped = snr.clamp(max=SNR_CAP)
    return capped / (capped + 1.0)


def _debiased_weight(snr: torch.Tensor, settings: LossSettings, table: torch.Tensor) -> torch.Tensor:
    """Debiased estimation (arXiv 2310.08442): 1/√SNR' for ε-prediction, 1/(SNR' + 1) for v; SNR' = min(SNR, 1000).

    1/√SNR has no finite limit at SNR = 0 (the zero-terminal-SNR last step). Our clamp: SNR' is also floored
    at the smallest positive SNR of the schedule, so that step gets the weight of the step before it (about 2250
    with SD's betas) instead of inf. Only ε-prediction with zero terminal SNR reaches it, which the config
    rules already warn about.
    """
    capped = snr.clamp(max=SNR_CAP)
    if settings.v_prediction:
        return 1.0 / (capped + 1.0)
    # The smallest positive SNR, without boolean indexing (whose result size the host would have to wait for).
    floor = torch.where(table > 0, table, torch.inf).min().to(capped.device)
    return capped.clamp(min=floor).rsqrt()


# Applied in sd-scripts' order (post_process_loss); the weights multiply.
_SNR_WEIGHTS: tuple[tuple[str, SnrWeight], ...] = (
    ("min_snr_gamma", _min_snr_weight),
    ("scale_v_pred_loss_like_noise_pred", _scale_v_weight),
    ("debiased_estimation_loss", _debiased_weight),
)


def snr_weights(timesteps: torch.Tensor, settings: LossSettings, table: torch.Tensor) -> torch.Tensor:
    """The product of the enabled SNR-based loss weights, per sample (float32, shape [B]; ones if none is on).

    ``table`` is :func:`snr_table` of the trained scheduler.
    """
    snr = _lookup(table, timesteps).float()
    weight = torch.ones_like(snr)
    for option, rule in _SNR_WEIGHTS:
        if getattr(settings, option):
            weight = weight * rule(snr, settings, table)
    return weight


# --- the whole reduction ------------------------------------------------------------------------------------------


def _resize_mask(mask: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """An image-sized mask ([B, H, W] or [B, 1, H, W], values 0-1) area-resized to the latent size."""
    if mask.ndim == loss.ndim - 1:
        mask = mask.unsqueeze(1)
    return F.interpolate(mask.to(loss), size=tuple(loss.shape[2:]), mode="area")


def batch_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, sample_weights: torch.Tensor | None,
               settings: LossSettings, table: torch.Tensor | None, *,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar loss of one batch, reduced as sd-scripts does.

    Args:
        pred: the model's output, [B, C, H, W].
        target: from ``engine.train.noise.training_target``.
        timesteps: the batch's timesteps, [B].
        sample_weights: per-sample loss weights, [B] (prior_loss_weight for regularization images, else 1);
            None when every weight is 1 (see :func:`batch_weights`), which skips the multiplication.
        settings: the loss options.
        table: :func:`snr_table` of the trained scheduler; None for flow matching, which has no SNR table: its
            ``timesteps`` are σ·1000 (floats), the SNR-based weights do not apply and the Huber "snr" schedule is
            refused (sd-scripts raises too, spec FLUX §4.7).
        mask: optional alpha mask, [B, H, W] or [B, 1, H, W] at any size; the loss is multiplied by it before
            the mean over C, H, W (not renormalised by the mask's area, as in sd-scripts).
    """
    c = None
    if settings.loss_type in _NEEDS_C:
        if table is None and settings.huber_schedule == "snr":
            raise ValueError("huber_schedule 'snr' needs a noise schedule with an SNR; use constant or exponential")
        steps_table = table if table is not None else torch.zeros(_FLOW_STEPS)
        c = HUBER_SCHEDULES[settings.huber_schedule](settings, timesteps, steps_table)
    loss = element_loss(pred, target, settings.loss_type, c)
    if mask is not None:
        loss = loss * _resize_mask(mask, loss)
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss)
    if table is not None and any(getattr(settings, option) for option, _ in _SNR_WEIGHTS):
        loss = loss * snr_weights(timesteps, settings, table).to(loss.device)
    return loss.mean()


def batch_weights(batch: dict, device: torch.device) -> torch.Tensor | None:
    """A batch's per-sample loss weights on ``device``, or None when all are 1 (most batches: only regularization
    images differ). The data loader gives them as host numbers, so deciding costs no read from the device; a
    tensor given instead is used as it is."""
    from engine.transfer import to_device

    weights = batch["loss_weight"]
    if isinstance(weights, torch.Tensor):
        return to_device(weights, device)
    if all(weight == 1.0 for weight in weights):
        return None
    return to_device(torch.tensor(weights, dtype=torch.float32), device)


def batch_mask(batch: dict, device: torch.device) -> torch.Tensor | None:
    """A batch's loss masks ([B, H, W] in pixels, 0..1) on ``device``, or None when its images have none (masked
    loss: ``alpha_mask`` subsets, ``conditioning_data_dir`` masks; engine.data.masks)."""
    from engine.transfer import to_device

    masks = batch.get("loss_mask")
    return None if masks is None else to_device(masks, device, torch.float32)


_FLOW_STEPS = 1000  # flow timesteps are σ·1000: the exponential Huber schedule divides by this
