"""Cross-field rules of SD3 / SD3.5 (spec §8).

What SD3 trains and saves, the network_args sd-scripts' `networks.lora_sd3` does not take (spec §8.6), and the
loss options flow matching cannot use. Settings that only other families use are refused by the generic
`settings_suit_the_family` rule through their `families`; the bucket multiple (16 px) and the block-swap limit
(36, the exact depth - 2 checked when the model is loaded) come from `FAMILY_INFO["sd3"]`. Registered with the same
`@rule` as the rules in :mod:`engine.config.rules`, which imports this module so that `check()` runs them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from engine.config.choices import NETWORK_TYPES, SD3_FAMILIES, family_label
from engine.config.rule_registry import Problem, RuleContext, rule

if TYPE_CHECKING:
    from engine.config.schema import RunConfig

# FLUX's lora_flux network_args -> what to use instead on SD3 (None: SD3 has no such part; its blocks are all joint).
_FLUX_ARGS: dict[str, str | None] = {
    "img_attn_dim": "x_attn_dim", "img_mlp_dim": "x_mlp_dim", "img_mod_dim": "x_mod_dim",
    "txt_attn_dim": "context_attn_dim", "txt_mlp_dim": "context_mlp_dim", "txt_mod_dim": "context_mod_dim",
    "in_dims": "emb_dims", "train_double_block_indices": "train_block_indices",
    "train_single_block_indices": "train_block_indices", "single_dim": None, "single_mod_dim": None,
    "train_blocks": None,
}
# lora_flux options that lora_sd3 does not have (spec §8.6).
_NOT_IN_LORA_SD3 = ("network_reg_dims", "network_reg_lrs")


def _is_sd3(config: RunConfig) -> bool:
    return config.model.model_family in SD3_FAMILIES


def unsupported_network_arg(key: str) -> str | None:
    """Why SD3's kohya LoRA cannot take network_args `key`, or None when it may."""
    if key in _FLUX_ARGS:
        instead = _FLUX_ARGS[key]
        hint = f"use {instead}" if instead else "SD3 has only joint blocks; remove it"
        return f"{key} is an option of FLUX.1's LoRA, not of SD3's (sd-scripts' networks.lora_sd3): {hint}"
    if key in _NOT_IN_LORA_SD3 or key.startswith("ggpo"):
        return (f"{key} is not supported by SD3's LoRA (sd-scripts' networks.lora_sd3 has no such option); "
                "remove it")
    return None


@rule
def sd3_network_args_fit(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    network = config.network
    if not _is_sd3(config) or config.method != "lora" or NETWORK_TYPES[network.network_type].backend != "kohya":
        return  # LyCORIS' network_args are its own options
    for key in network.network_args:
        why = unsupported_network_arg(key)
        if why is not None:
            yield Problem("network.network_args", why)


@rule
def sd3_training_fits(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if not _is_sd3(config):
        return
    label = family_label(config.model.model_family)
    if config.method == "textual_inversion":
        yield Problem("method", f"Textual Inversion is not available for {label}; train a LoRA instead")
    training = config.training
    if training.loss_type in ("huber", "smooth_l1") and training.huber_schedule == "snr":
        yield Problem("training.huber_schedule", f"the snr schedule needs a noise schedule {label}'s flow matching "
                      "does not have; use 'constant' or 'exponential'")
    if config.method in ("dreambooth", "finetune") and config.saving.save_model_as == "ckpt":
        yield Problem("saving.save_model_as", f"{label} full fine-tuning saves a single file ('safetensors', the "
                      "layout ComfyUI loads) or a diffusers folder ('diffusers', 'diffusers_safetensors'), not a "
                      ".ckpt")
