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
