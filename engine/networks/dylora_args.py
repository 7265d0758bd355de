"""The settings of a DyLoRA network (sd-scripts' ``networks/dylora.py``), parsed without torch.

:mod:`engine.networks.dylora` builds the network with them; the config rules (:mod:`engine.config.rules_network`)
run the same parser, so a bad setting is a validation error naming the field.

What sd-scripts' DyLoRA takes, and so what is accepted here:

* ``unit`` (network_args, default 1): the block of ranks trained together; ``network_dim`` must be a multiple of it.
* ``conv_dim`` (0, or equal to ``network_dim``: sd-scripts asserts it) turns on the 3x3 convolutions, which then
  use ``network_alpha``: sd-scripts never passes ``conv_alpha`` on, so a different ``conv_alpha`` is refused rather
  than silently ignored.
* LoRA+ ratios (``loraplus_lr_ratio``, ``loraplus_unet_lr_ratio``, ``loraplus_text_encoder_lr_ratio``).
* No dropouts: sd-scripts' DyLoRA modules have none, so a non-zero dropout is refused.
* SD1.x, SD2.x and SDXL only: sd-scripts has no DyLoRA for FLUX.1, Chroma or SD3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.networks.arg_values import arg_number
from engine.networks.lora_names import NETWORK_ARGS, LoRAOptions, resolve_options

__all__ = ["DYLORA_ARGS", "DYLORA_NAMINGS", "DyLoRAOptions", "resolve_dylora_options"]

# The LoRA namings (engine.networks.lora_names) sd-scripts' DyLoRA supports: SD1.x/SD2.x and SDXL.
DYLORA_NAMINGS = ("diffusers", "sai")
DYLORA_ARGS = ("unit", "conv_dim", "conv_alpha", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
               "loraplus_text_encoder_lr_ratio")
_DROPOUTS = {"dropout": "network.network_dropout", "rank_dropout": "network.rank_dropout",
             "module_dropout": "network.module_dropout"}


@dataclass(frozen=True)
class DyLoRAOptions:
    """The resolved settings: the LoRA ones (rank, alpha, conv_dim, LoRA+) and DyLoRA's ``unit``."""

    lora: LoRAOptions
    unit: int = 1


def _unit(value: Any, dim: int) -> int:
    path = "network.network_args.unit"
    number = arg_number(path, value, "a whole number of at least 1")
    if number < 1 or number != int(number):
        raise ValueError(f"{path} must be a whole number of at least 1, got {value!r}")
    if dim % int(number):
        raise ValueError(f"{path} = {int(number)} does not divide network.network_dim = {dim}; DyLoRA trains the "
                         "rank in blocks of unit ranks, so set network_dim to a multiple of unit")
    return int(number)


def resolve_dylora_options(keywords: Mapping[str, Any], network_args: Mapping[str, Any] | None,
                           naming: str = "diffusers") -> DyLoRAOptions:
    """Check the settings of a DyLoRA network.

    Args:
        keywords: as for :func:`engine.networks.lora_names.resolve_options`.
        network_args: :data:`DYLORA_ARGS`.
        naming: the family's ``unet_naming``; only :data:`DYLORA_NAMINGS` have a DyLoRA.

    Raises:
        ValueError: an unsupported family, key or value; the message names the config path.
    """
    if naming not in DYLORA_NAMINGS:
        raise ValueError("network.network_type = 'dylora' is sd-scripts' DyLoRA for SD1.x, SD2.x and SDXL; this "
                         "model family has none: use network_type = 'lora'")
    args = dict(network_args or {})
    for key in args:
        if key not in DYLORA_ARGS:
            what = "has no dropouts" if key in _DROPOUTS else "has no such option"
            raise ValueError(f"network.network_args.{key}: sd-scripts' DyLoRA {what}; accepted keys: "
                             f"{', '.join(DYLORA_ARGS)}")
    unit = args.pop("unit", 1)
    options = resolve_options(keywords, {key: value for key, value in args.items() if key in NETWORK_ARGS}, naming)
    for key, path in _DROPOUTS.items():
        if getattr(options, key):
            raise ValueError(f"{path} has no effect with network_type = 'dylora' (sd-scripts' DyLoRA modules have "
                             "no dropout); set it to 0")
    if options.conv_dim and options.conv_dim != options.dim:
        raise ValueError(f"network.conv_dim = {options.conv_dim} must be 0 or network_dim ({options.dim}) with "
                         "DyLoRA, as in sd-scripts")
    if options.conv_dim and options.conv_alpha != options.alpha:
        raise ValueError(f"network.conv_alpha = {options.conv_alpha:g} has no effect with DyLoRA, whose "
                         f"convolutions use network_alpha ({options.alpha:g}) as in sd-scripts; set conv_alpha to "
                         "network_alpha")
    return DyLoRAOptions(options, _unit(unit, options.dim))
