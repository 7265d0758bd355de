"""The learning rate of each trained part after the config's fallbacks, shared by every training method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config.schema import RunConfig


@dataclass(frozen=True)
class LearningRates:
    """Per-part learning rates after the config's fallbacks; 0 means that part is frozen."""

    unet: float
    text_encoders: tuple[float, ...]


def learning_rates(config: RunConfig, text_encoder_count: int) -> LearningRates:
    section = config.optimizer
    base = section.learning_rate
    unet = base if section.unet_lr is None else section.unet_lr
    first = base if section.text_encoder_lr is None else section.text_encoder_lr
    second = first if section.text_encoder2_lr is None else section.text_encoder2_lr
    # A third encoder (SD3's T5) takes the second's rate, as sd-scripts' `--text_encoder_lr a b` does.
    return LearningRates(unet, (first, *[second] * max(0, text_encoder_count - 1))[:text_encoder_count])


def full_trains_text_encoders(config: RunConfig, text_encoder_count: int) -> list[bool]:
    """Which text encoders SD1/SD2/SDXL DreamBooth and fine-tuning train: a learning rate above 0, unless their
    outputs are cached (the encoders then never run)."""
    caches_text = config.training.cache_text_encoder_outputs
    return [rate > 0 and not caches_text for rate in learning_rates(config, text_encoder_count).text_encoders]


def lora_trains_text_encoders(config: RunConfig, text_encoder_count: int) -> list[bool]:
    """Which text encoders a LoRA puts modules on, before the network's own say (FLUX's and SD3's T5 only with
    train_t5xxl): those full training would train, unless the LoRA trains the denoiser only."""
    unet_only = config.network.train_unet_only
    return [trains and not unet_only for trains in full_trains_text_encoders(config, text_encoder_count)]
