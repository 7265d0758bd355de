"""The loaded base model every family's loader returns (engine.models.loading for SD, engine.models.flux.loading,
engine.models.sd3.loading): kept apart so that those loaders need not import the dispatcher that calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from engine.models.text_encoders import LoadedTextEncoders
    from engine.models.vae import LoadedVae

__all__ = ["LoadedModel"]


@dataclass
class LoadedModel:
    """A base model ready for training or sampling.

    Attributes:
        family: "sd1", "sd2" or "sdxl".
        unet: the ``UNet2DConditionModel`` on ``device`` in ``dtype``, in eval mode; the trainer decides what trains.
        vae: the VAE (the model's own or the separate one), frozen.
        text: tokenizers and text encoders, frozen.
        scheduler_config: the model's noise-scheduler config (diffusers JSON). A single file states no
            ``prediction_type``; its shipped config says epsilon, and ``model.v_parameterization`` overrides it.
        source: what was asked for (file, folder or hub id).
        model_file: the single file the weights came from (for hashing), None for folders and hub ids.
    """

    family: str
    unet: UNet2DConditionModel
    vae: LoadedVae
    text: LoadedTextEncoders
    scheduler_config: dict[str, Any]
    source: str
    model_file: Path | None
