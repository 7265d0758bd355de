"""A whole model seen by the LoRA tools: its layers under kohya's module names, and saving it as one checkpoint.

The names come from :mod:`engine.networks.lora_names`, the code that names the modules of the networks we train,
so merge and extract address exactly the layers ``create_lora_network`` wraps.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.models.families import family_info
from engine.models.ldm_checkpoint import pipeline_configs, write_pipeline_checkpoint
from engine.models.loading import ModelLoadError, detect_model_family, load_model
from engine.models.text_encoders import TEXT_COMPONENTS
from engine.networks.lora_names import LoRATarget, text_encoder_targets, unet_targets
from engine.networks.tools.lora_file import ToolError

if TYPE_CHECKING:
    from engine.models.loaded_model import LoadedModel

__all__ = ["is_v_prediction", "layer_targets", "load_base_model", "model_family", "save_checkpoint"]


def load_base_model(location: str | Path, role: str) -> LoadedModel:
    """Load a single file or diffusers folder in float32 on the CPU; ``role`` ("base model") names it in errors."""
    try:
        return load_model(location, dtype=torch.float32)
    except ModelLoadError as error:
        raise ToolError(f"{role}: {error}") from error


def model_family(location: str | Path) -> str | None:
    """The family of the model at ``location`` from its header or config files only, or None when that cannot be
    told (a hub id not downloaded yet, a damaged file): :func:`load_base_model` then reports the problem."""
    try:
        return detect_model_family(location)
    except ModelLoadError:
        return None


def layer_targets(model: LoadedModel, *, include_conv_blocks: bool) -> list[LoRATarget]:
    """Every layer a kohya LoRA can wrap in this model (UNet, then each text encoder), with its kohya name.

    Args:
        include_conv_blocks: also the ResNet/down/up-sampling blocks (LoCon); create_lora_network does this when
            conv_dim is given.
    """
    targets = unet_targets(model.unet, model.family, include_conv_blocks=include_conv_blocks)
    prefixes = family_info(model.family).text_encoder_lora_prefixes
    for encoder, prefix in zip(model.text.encoders, prefixes, strict=True):
        targets += text_encoder_targets(encoder, prefix)
    return targets


def is_v_prediction(model: LoadedModel) -> bool:
    return model.scheduler_config.get("prediction_type") == "v_prediction"


def _components(model: LoadedModel) -> dict[str, nn.Module]:
    components: dict[str, nn.Module] = {"unet": model.unet, "vae": model.vae.vae}
    for (_, name), encoder in zip(TEXT_COMPONENTS[model.family], model.text.encoders, strict=True):
        components[name] = encoder
    return components


def save_checkpoint(model: LoadedModel, path: Path, metadata: dict[str, str],
                    dtype: torch.dtype | None = None) -> Path:
    """Write the model as one LDM-layout .safetensors file that :func:`load_model` reads back exactly.

    The components' configs and the scheduler config are embedded, so a model with non-standard sizes (or a
    v-prediction one) loads without guessing. Written to a temporary file and renamed: never half a file.
    """
    components = _components(model)
    configs = {**pipeline_configs(components), "scheduler": model.scheduler_config}
    return write_pipeline_checkpoint(components, model.family, path, metadata, dtype=dtype, configs=configs)
