"""Model-format helpers: diffusers → original (LDM, "single-file") checkpoint conversion and family detection.

Importing this package loads neither torch nor diffusers/transformers (torch is imported inside the functions that
need it): the converters only need state dicts and configs, and the GUI can call :func:`detect_family` without
paying the multi-second imports.
"""

from engine.models.ldm_checkpoint import FAMILIES, detect_family, pipeline_to_ldm, save_ldm_checkpoint
from engine.models.ldm_keys import UNET_PREFIX, VAE_PREFIX, unet_to_ldm, vae_to_ldm
from engine.models.ldm_text import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_TEXT1_PREFIX,
    SDXL_TEXT2_PREFIX,
    clip_to_ldm,
    open_clip_to_ldm,
)

__all__ = [
    "FAMILIES",
    "SD1_TEXT_PREFIX",
    "SD2_TEXT_PREFIX",
    "SDXL_TEXT1_PREFIX",
    "SDXL_TEXT2_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "clip_to_ldm",
    "detect_family",
    "open_clip_to_ldm",
    "pipeline_to_ldm",
    "save_ldm_checkpoint",
    "unet_to_ldm",
    "vae_to_ldm",
]
