"""Model formats and loading: diffusers ↔ original (LDM, "single-file") checkpoints, family detection, loading.

Importing this package loads neither torch nor diffusers/transformers (they are imported inside the functions that
need them): the converters only need state dicts and configs, and the GUI can call :func:`detect_family` or
:func:`detect_model_family` without paying the multi-second imports. The diffusers configs and tokenizer files of
each family ship in ``engine/models/configs``, so single files load offline (:func:`load_model`).
"""

from importlib import import_module
from typing import Any

# The package's names, by the module that defines them, imported on first use: engine.models.families (pure data,
# which the config rules read) is imported without the converters and loaders (issue 17: the GUI's start).
_EXPORTS = {
    "engine.models.ldm_checkpoint": ("EMBEDDED_CONFIGS_KEY", "FAMILIES", "detect_family", "pipeline_configs",
                                     "pipeline_to_ldm", "save_ldm_checkpoint"),
    "engine.models.ldm_keys": ("UNET_PREFIX", "VAE_PREFIX", "unet_to_ldm", "vae_to_ldm"),
    "engine.models.ldm_text": ("SD1_TEXT_PREFIX", "SD2_TEXT_PREFIX", "SDXL_TEXT1_PREFIX", "SDXL_TEXT2_PREFIX",
                               "clip_to_ldm", "open_clip_to_ldm"),
    "engine.models.loaded_model": ("LoadedModel",),
    "engine.models.loading": ("ModelLoadError", "detect_model_family", "load_model"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


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
