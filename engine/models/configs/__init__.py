"""The diffusers configs of each model family, shipped with the package so that single files load offline.

``sd1/`` holds Stable Diffusion 1.5's configs, ``sd2/`` those of SD 2.1 (the 512 px base model; the 768-v model
differs only in its scheduler's ``prediction_type``, which the trainer takes from ``model.v_parameterization``), and
``sdxl/`` those of SDXL base 1.0. Each folder is laid out like the model's diffusers repository (``model_index.json``,
``unet/config.json``, ``scheduler/scheduler_config.json``, ``tokenizer/tokenizer_config.json``, ...), with the
values of the published repositories. The tokenizers' vocabulary is the CLIP BPE file beside them
(``bpe_simple_vocab_16e6.txt.gz``, see NOTICE); ``engine.models.tokenizers`` turns it into tokenizer files.

Reading these is pure JSON: no torch.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_ROOT", "component_file", "family_components", "shipped_configs"]

CONFIG_ROOT = Path(__file__).resolve().parent

# Components with a config, per family, in the order diffusers lists them.
_COMPONENTS = {
    "sd1": ("model_index", "unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sd2": ("model_index", "unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("model_index", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
# Where a component's config lives inside a diffusers folder, when it is not <component>/config.json.
_SPECIAL_FILES = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json",
                  "tokenizer": "tokenizer/tokenizer_config.json", "tokenizer_2": "tokenizer_2/tokenizer_config.json"}


def family_components(family: str) -> tuple[str, ...]:
    """The components ``family`` has a config for ("model_index", "unet", "vae", "text_encoder", ...)."""
    try:
        return _COMPONENTS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(_COMPONENTS)}") from None


def component_file(component: str) -> str:
    """The config file of ``component``, relative to a diffusers pipeline folder."""
    return _SPECIAL_FILES.get(component, f"{component}/config.json")


@cache
def _read(family: str) -> dict[str, dict[str, Any]]:
    folder = CONFIG_ROOT / family
    return {name: json.loads((folder / component_file(name)).read_text(encoding="utf-8"))
            for name in family_components(family)}


def shipped_configs(family: str) -> dict[str, dict[str, Any]]:
    """The shipped configs of ``family`` by component (a fresh copy, free to modify)."""
    return copy.deepcopy(_read(family))
