"""Model formats and loading: diffusers ↔ original (LDM, "single-file") checkpoints, family detection, loading.

Importing this package loads neither torch nor diffusers/transformers (they are imported inside the functions that
need them): the converters only need state dicts and configs, and the GUI can call :func:`detect_family` or
:func:`detect_model_family` without paying the multi-second imports. The diffusers configs and tokenizer files of
each family ship in ``engine/models/configs``, so single files load offline (:func:`load_model`).
"""

from engine.models.ldm_checkpoint import (
    EMBEDDED_CONFIGS_KEY,
    FAMILIES,
    detect_family,
    pipeline_configs,
    pipeline_to_ldm,
    save_ldm_checkpoint,
)
from engine.models.ldm_keys import UNET_PREFIX, VAE_PREFIX, unet_to_ldm, vae_to_ldm
from engine.models.ldm_text import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_TEXT1_PREFIX,
    SDXL_TEXT2_PREFIX,
    clip_to_ldm,
    open_clip_to_ldm,
)
from engine.models.loaded_model import LoadedModel
from engine.models.loading import ModelLoadError, detect_model_family, load_model

__all__ = [
    "EMBEDDED_CONFIGS_KEY",
    "FAMILIES",
    "SD1_TEXT_PREFIX",
    "SD2_TEXT_PREFIX",
    "SDXL_TEXT1_PREFIX",
    "SDXL_TEXT2_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "LoadedModel",
    "ModelLoadError",
    "clip_to_ldm",
    "detect_family",
    "detect_model_family",
    "load_model",
    "open_clip_to_ldm",
    "pipeline_configs",
    "pipeline_to_ldm",
    "save_ldm_checkpoint",
    "unet_to_ldm",
    "vae_to_ldm",
]
