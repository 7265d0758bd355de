"""Single-file VAEs: which key layout a file uses, its AutoencoderKL config read off the tensor shapes, and loading.

Single files carry no config, and diffusers' ``from_single_file`` would fetch one from the hub (stack-notes §2),
so the config is inferred here: the number of blocks and their widths from the encoder's ResNet convolutions,
``layers_per_block`` from the ResNets per block, the latent channels from ``encoder.conv_out`` (which outputs
mean and log-variance, hence twice the latent channels). GroupNorm's group count does not show in any shape;
every SD-family VAE uses 32.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.ldm_checkpoint import detect_family
from engine.models.ldm_keys import VAE_PREFIX

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

__all__ = ["VaeLoadError", "read_single_file", "single_file_family", "vae_from_state_dict"]


class VaeLoadError(ValueError):
    """The VAE cannot be loaded; the message names the file, folder or id and says what to do."""


# Layout name → (a key only that layout has, prefix stripped from the VAE's keys). Checked in order.
_LAYOUTS: dict[str, tuple[str, str]] = {
    "checkpoint": (VAE_PREFIX + "encoder.conv_in.weight", VAE_PREFIX),  # a whole SD checkpoint
    "ldm": ("encoder.down.0.block.0.conv1.weight", ""),  # a standalone VAE in LDM naming
    "diffusers": ("encoder.down_blocks.0.resnets.0.conv1.weight", ""),  # a standalone VAE in diffusers naming
}
# Per key naming: the encoder ResNets' second convolution (down block index, layer index) and the mid attention.
_RESNET = {"ldm": re.compile(r"encoder\.down\.(\d+)\.block\.(\d+)\.conv2\.weight$"),
           "diffusers": re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv2\.weight$")}
_MID_ATTENTION = {"ldm": "encoder.mid.attn_1.", "diffusers": "encoder.mid_block.attentions.0."}
_TORCH_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_NORM_GROUPS = 32
_SAMPLE_SIZE = 512  # only used by diffusers' tiled encoding, which caching does not use


def _keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    return list(_torch_state_dict(path))


def _torch_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        # mmap: a 4-7 GB checkpoint is not read into memory just to take its VAE out of it.
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise VaeLoadError(f"{path}: not a checkpoint (it holds a {type(data).__name__}, not tensors by name)")
    return data


def _layout(keys: list[str], path: Path) -> tuple[str, str]:
    present = set(keys)
    for name, (marker, prefix) in _LAYOUTS.items():
        if marker in present:
            return name, prefix
    raise VaeLoadError(f"{path}: no VAE weights found; expected keys under '{VAE_PREFIX}' (a whole SD checkpoint) "
                       "or 'encoder.' / 'decoder.' (a standalone VAE)")


def read_single_file(path: Path) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """The VAE tensors of a single file, with the prefix stripped.

    Returns:
        (state dict, layout "ldm" or "diffusers", family when the file is a whole checkpoint else None).

    Raises:
        VaeLoadError: an unsupported extension, an unreadable file or no VAE keys.
    """
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise VaeLoadError(f"{path}: unsupported file type {suffix or '(none)'}; use .safetensors or .ckpt")
    try:
        keys = _keys(path)
        layout, prefix = _layout(keys, path)
        wanted = [key for key in keys if key.startswith(prefix) and key[len(prefix):].split(".")[0] in
                  {"encoder", "decoder", "quant_conv", "post_quant_conv"}]
        state = _read_tensors(path, wanted)
    except VaeLoadError:
        raise
    except Exception as error:  # safetensors and torch.load signal damage with many types
        raise VaeLoadError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    state = {key[len(prefix):]: tensor for key, tensor in state.items()}
    family = _family_or_none(keys) if layout == "checkpoint" else None
    return state, "ldm" if layout == "checkpoint" else layout, family


def _read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    state = _torch_state_dict(path)
    return {key: state[key] for key in keys}


def _family_or_none(keys: list[str]) -> str | None:
    try:
        return detect_family(keys)
    except ValueError:  # a VAE-only file with the checkpoint prefix: no text encoder to tell by
        return None


def single_file_family(path: Path) -> str | None:
    """The family of a whole SD checkpoint from its key names (only the header is read for .safetensors)."""
    return _family_or_none(_keys(path))


def infer_vae_config(state: dict[str, torch.Tensor], layout: str) -> dict[str, Any]:
    """The ``AutoencoderKL`` config that fits a VAE state dict in ``layout`` ("ldm" or "diffusers")."""
    widths: dict[int, int] = {}
    layers: dict[int, int] = {}
    for key, tensor in state.items():
        match = _RESNET[layout].match(key)
        if match:
            block, layer = int(match[1]), int(match[2])
            widths[block] = int(tensor.shape[0])
            layers[block] = max(layers.get(block, 0), layer + 1)
    blocks = len(widths)
    if blocks == 0 or sorted(widths) != list(range(blocks)):
        raise VaeLoadError(f"the encoder's down blocks are incomplete (found blocks {sorted(widths)})")
    return {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": [widths[index] for index in range(blocks)],
        "layers_per_block": layers[0],
        "latent_channels": int(state["encoder.conv_out.weight"].shape[0]) // 2,
        "norm_num_groups": _NORM_GROUPS,
        "sample_size": _SAMPLE_SIZE,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": any(key.startswith(_MID_ATTENTION[layout]) for key in state),
    }


def vae_from_state_dict(state: dict[str, torch.Tensor], layout: str, path: Path) -> AutoencoderKL:
    """Build an ``AutoencoderKL`` (float32) from a prefix-free VAE state dict in ``layout``.

    LDM keys go through diffusers' own ``convert_ldm_vae_checkpoint(checkpoint, config)``.

    Raises:
        VaeLoadError: the shapes do not describe a VAE diffusers can build, or keys are missing / left over.
    """
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        config = infer_vae_config(state, layout)
    except KeyError as error:
        raise VaeLoadError(f"{path}: the VAE lacks {error.args[0]!r}; the file is incomplete") from error
    except VaeLoadError as error:
        raise VaeLoadError(f"{path}: {error}") from error
    if layout == "ldm":
        state = convert_ldm_vae_checkpoint(state, config)
    with torch.device("meta"):  # no random initialisation of weights that are overwritten at once
        vae = AutoencoderKL(**config)
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise VaeLoadError(f"{path}: the weights do not fit the VAE shape read from the file ({error})") from error
    return vae.float()
