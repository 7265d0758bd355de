"""Diffusers → original (LDM / "single-file") key conversion for the UNet and the VAE.

The diffusers package only ships the opposite direction (LDM → diffusers, used by ``from_single_file``), and the
repository script that goes this way hard-codes SD1's 4 blocks × 2 layers. These functions derive every index from
the model config instead, so tiny test models, SD1/SD2 and SDXL all convert through the same code.

The rules are the inverse of ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` /
``convert_ldm_vae_checkpoint``; a round trip through those functions is what the tests check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["UNET_PREFIX", "VAE_PREFIX", "unet_to_ldm", "vae_to_ldm"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Module-level renames that need no index arithmetic: diffusers name → LDM name (inside the UNet).
_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    # SDXL's micro-conditioning MLP ("text_time") and class-conditioned UNets share LDM's label_emb slot.
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.weight": "label_emb.weight",
}

# Sub-module names inside a ResNet block differ between the two layouts (LDM keeps nn.Sequential indices).
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_VAE_FIXED = {
    "encoder.conv_norm_out.": "encoder.norm_out.",
    "decoder.conv_norm_out.": "decoder.norm_out.",
}

_VAE_IDENTICAL = (
    "quant_conv.",
    "post_quant_conv.",
    "encoder.conv_in.",
    "encoder.conv_out.",
    "decoder.conv_in.",
    "decoder.conv_out.",
)

# VAE mid-block attention: current diffusers names and the pre-0.14 ones, both → LDM's single-head conv attention.
_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def _per_block(value: int | Iterable[int], n_blocks: int) -> list[int]:
    """Expand an int-or-sequence config value (diffusers accepts both) into one entry per block."""
    if isinstance(value, int):
        return [value] * n_blocks
    values = list(value)
    if len(values) != n_blocks:
        raise ValueError(f"expected {n_blocks} per-block values, got {values}")
    return values


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _unet_prefix_map(keys: list[str], config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """List (diffusers prefix, LDM prefix, is_resnet) for every block-level module of the UNet.

    LDM numbers the down path as one flat ``input_blocks`` list: conv_in is 0, then each down block contributes
    its layers followed by one downsampler slot; the up path is the mirror image with one extra layer per block
    (the skip concatenation) and the upsampler appended to the block's last layer.
    """
    n_down = len(config["down_block_types"])
    layers = _per_block(config["layers_per_block"], n_down)
    entries: list[tuple[str, str, bool]] = []

    ldm_index = 1
    for block, n_layers in enumerate(layers):
        for layer in range(n_layers):
            entries.append((f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{ldm_index}.0.", True))
            entries.append((f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{ldm_index}.1.", False))
            ldm_index += 1
        if _has_prefix(keys, f"down_blocks.{block}.downsamplers."):
            entries.append((f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{ldm_index}.0.op.", False))
            ldm_index += 1

    # The mid block alternates resnet, attention, resnet: resnets sit at even LDM indices, attentions at odd ones.
    for index in range(4):
        entries.append((f"mid_block.resnets.{index}.", f"middle_block.{2 * index}.", True))
        entries.append((f"mid_block.attentions.{index}.", f"middle_block.{2 * index + 1}.", False))

    ldm_index = 0
    for block, n_layers in enumerate(reversed(layers)):
        for layer in range(n_layers + 1):
            entries.append((f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{ldm_index}.0.", True))
            entries.append((f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{ldm_index}.1.", False))
            ldm_index += 1
        # The upsampler follows the attention when the block has one, so its slot is 2 instead of 1.
        slot = 2 if _has_prefix(keys, f"up_blocks.{block}.attentions.") else 1
        entries.append((f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{ldm_index - 1}.{slot}.conv.", False))
    return entries


def _rename_resnet_part(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_UNET_RESNET_PARTS.get(head, head)}.{tail}"


def unet_to_ldm(unet_state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``UNet2DConditionModel`` state dict to LDM keys (``model.diffusion_model.*``).

    Works for any number of blocks and any ``layers_per_block`` (int or per-block), for SD1.x (1×1 conv
    projections), SD2.x (linear projections: same key names, different shapes) and SDXL (several transformer
    layers per block, ``add_embedding`` → ``label_emb``). Transformer internals keep their names in both layouts.

    Args:
        unet_state_dict: ``unet.state_dict()``.
        unet_config: ``unet.config`` (needs ``down_block_types`` and ``layers_per_block``).

    Returns:
        A new dict with LDM keys; tensors are shared with the input, not copied.

    Raises:
        ValueError: a key does not fit the layout described by the config, so the checkpoint would be incomplete.
    """
    keys = list(unet_state_dict)
    prefixes = _unet_prefix_map(keys, unet_config)
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key in keys:
        new_key = _convert_unet_key(key, prefixes)
        if new_key is None:
            unmapped.append(key)
        else:
            converted[UNET_PREFIX + new_key] = unet_state_dict[key]
    if unmapped:
        raise ValueError(f"unet_to_ldm: {len(unmapped)} UNet keys have no LDM equivalent, e.g. {unmapped[:5]}")
    return converted


def _convert_unet_key(key: str, prefixes: list[tuple[str, str, bool]]) -> str | None:
    for old, new in _UNET_FIXED.items():
        if key.startswith(old):
            return new + key[len(old) :]
    for old, new, is_resnet in prefixes:
        if key.startswith(old):
            rest = key[len(old) :]
            return new + (_rename_resnet_part(rest) if is_resnet else rest)
    return None


def _vae_prefix_map(keys: list[str]) -> list[tuple[str, str]]:
    """List (diffusers prefix, LDM prefix) pairs for the VAE's blocks.

    LDM's decoder numbers its ``up`` blocks from the lowest resolution, i.e. in reverse of diffusers' order.
    """
    n_down = 1 + max((int(k.split(".")[2]) for k in keys if k.startswith("encoder.down_blocks.")), default=-1)
    n_up = 1 + max((int(k.split(".")[2]) for k in keys if k.startswith("decoder.up_blocks.")), default=-1)
    entries: list[tuple[str, str]] = []
    for block in range(n_down):
        entries.append((f"encoder.down_blocks.{block}.resnets.", f"encoder.down.{block}.block."))
        entries.append((f"encoder.down_blocks.{block}.downsamplers.0.", f"encoder.down.{block}.downsample."))
    for block in range(n_up):
        ldm_block = n_up - 1 - block
        entries.append((f"decoder.up_blocks.{block}.resnets.", f"decoder.up.{ldm_block}.block."))
        entries.append((f"decoder.up_blocks.{block}.upsamplers.0.", f"decoder.up.{ldm_block}.upsample."))
    for side in ("encoder", "decoder"):
        entries.append((f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1."))
        entries.append((f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2."))
    return entries


def _convert_vae_attention(key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """Map a mid-block attention parameter; LDM implements those projections as 1×1 convs, hence the reshape."""
    for side in ("encoder", "decoder"):
        prefix = f"{side}.mid_block.attentions.0."
        if not key.startswith(prefix):
            continue
        module, _, param = key[len(prefix) :].rpartition(".")
        if module not in _VAE_ATTENTION_PARTS:
            return None
        if param == "weight" and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        return f"{side}.mid.attn_1.{_VAE_ATTENTION_PARTS[module]}.{param}", tensor
    return None


def vae_to_ldm(vae_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``AutoencoderKL`` state dict to LDM keys (``first_stage_model.*``).

    Args:
        vae_state_dict: ``vae.state_dict()``; any number of down/up blocks and layers.

    Returns:
        A new dict with LDM keys. Attention q/k/v/proj_out weights become ``[C, C, 1, 1]`` conv kernels.

    Raises:
        ValueError: a key has no LDM equivalent.
    """
    keys = list(vae_state_dict)
    prefixes = _vae_prefix_map(keys)
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key in keys:
        tensor = vae_state_dict[key]
        attention = _convert_vae_attention(key, tensor)
        if attention is not None:
            converted[VAE_PREFIX + attention[0]] = attention[1]
            continue
        new_key = _convert_vae_key(key, prefixes)
        if new_key is None:
            unmapped.append(key)
        else:
            converted[VAE_PREFIX + new_key] = tensor
    if unmapped:
        raise ValueError(f"vae_to_ldm: {len(unmapped)} VAE keys have no LDM equivalent, e.g. {unmapped[:5]}")
    return converted


def _convert_vae_key(key: str, prefixes: list[tuple[str, str]]) -> str | None:
    for old, new in _VAE_FIXED.items():
        if key.startswith(old):
            return new + key[len(old) :]
    for old, new in prefixes:
        if key.startswith(old):
            # LDM's ResnetBlock calls its 1×1 channel-changing shortcut "nin_shortcut".
            return new + key[len(old) :].replace("conv_shortcut", "nin_shortcut")
    # conv_in / conv_out / quant_conv / post_quant_conv are named identically in both layouts.
    return key if key.startswith(_VAE_IDENTICAL) else None
