"""Diffusers configs for a single file that carries none: the family's shipped configs with the sizes read off the
tensor shapes.

Everything that changes a parameter's shape shows in the file: block widths and counts, layers per block,
transformer depth, cross-attention width, 1×1-conv vs linear projections, SDXL's micro-conditioning input, the text
encoders' width, depth, MLP size and vocabulary. What does not show is taken from the family's convention: SD1's
UNet has 8 attention heads everywhere, SD2's and SDXL's heads are 64 wide (``attention_head_dim`` lists the head
*count* per block, diffusers' legacy naming), and CLIP heads are 64 wide. Values that shape nothing (sample size,
scheduler, activation, scaling factor) stay as shipped.

Input is a mapping key → shape of the LDM-layout checkpoint, so only the header of a .safetensors file is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from engine.models.configs import shipped_configs
from engine.models.families import family_info
from engine.models.ldm_checkpoint import TEXT_ENCODER_LAYOUTS
from engine.models.ldm_keys import UNET_PREFIX, VAE_PREFIX
from engine.models.ldm_text import SD2_TEXT_PREFIX

__all__ = ["ConfigInferenceError", "infer_clip_config", "infer_configs", "infer_unet_config", "infer_vae_config"]

Shapes = Mapping[str, tuple[int, ...]]

_HEAD_WIDTH = 64
# diffusers drops block 23 of SD2's 24-block OpenCLIP-H when it converts a checkpoint (SD2 conditions on the
# penultimate layer, so the last one is never used); the diffusers config has 23 layers.
_UNUSED_SD2_BLOCK = 23
# The VAE's encoder ResNets (block, layer) per key naming, and its mid-block attention.
_VAE_RESNET = {"ldm": re.compile(r"encoder\.down\.(\d+)\.block\.(\d+)\.conv2\.weight$"),
               "diffusers": re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv2\.weight$")}
_VAE_MID_ATTENTION = {"ldm": "encoder.mid.attn_1.", "diffusers": "encoder.mid_block.attentions.0."}


class ConfigInferenceError(ValueError):
    """The shapes do not describe a model of the expected kind (a key the layout needs is missing)."""


def infer_configs(family: str, shapes: Shapes) -> dict[str, dict[str, Any]]:
    """The shipped configs of ``family`` with every structural value taken from the checkpoint's ``shapes``.

    Components the file lacks (e.g. no text encoder in a UNet-only file) keep their shipped config.

    Raises:
        ConfigInferenceError: a component is present but incomplete.
    """
    configs = shipped_configs(family)
    projection = None
    for component, layout, prefix in TEXT_ENCODER_LAYOUTS[family]:
        if _has_prefix(shapes, prefix):
            configs[component] = infer_clip_config(shapes, prefix, layout, configs[component])
            if configs[component]["architectures"] == ["CLIPTextModelWithProjection"]:
                projection = configs[component]["projection_dim"]
    if _has_prefix(shapes, UNET_PREFIX):
        configs["unet"] = infer_unet_config(shapes, configs["unet"], family, pooled_width=projection)
    vae_shapes = {key[len(VAE_PREFIX):]: shape for key, shape in shapes.items() if key.startswith(VAE_PREFIX)}
    if vae_shapes:
        configs["vae"] = infer_vae_config(vae_shapes, "ldm", configs["vae"])
    return configs


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def _shape(shapes: Shapes, key: str) -> tuple[int, ...]:
    try:
        return shapes[key]
    except KeyError:
        raise ConfigInferenceError(f"the checkpoint lacks {key!r}; the file is incomplete or not an SD model") from None


def _put(config: dict[str, Any], key: str, value: Any, default: Any) -> None:
    """Set ``key``, except where the config leaves it out and ``value`` is diffusers' default anyway: the result
    then equals the shipped config whenever the file has the shipped shapes."""
    if key in config or value != default:
        config[key] = value


# --- UNet --------------------------------------------------------------------------------------------------------


def infer_unet_config(shapes: Shapes, base: Mapping[str, Any], family: str,
                      pooled_width: int | None = None) -> dict[str, Any]:
    """``base`` (the family's UNet config) with the block structure of the LDM UNet in ``shapes``.

    LDM numbers the down path as one list: ``input_blocks.0`` is conv_in, then each level has ``layers`` blocks
    followed by a downsampler (``input_blocks.N.0.op``), so the first downsampler sits at ``layers + 1``.
    """
    p = UNET_PREFIX
    downsamplers = sorted(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight$"))
    layers = downsamplers[0] - 1 if downsamplers else max(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\."),
                                                           default=1)
    levels = len(downsamplers) + 1
    firsts = [1 + level * (layers + 1) for level in range(levels)]  # first input block of each level
    widths = [_shape(shapes, f"{p}input_blocks.{first}.0.out_layers.3.weight")[0] for first in firsts]
    attention = [f"{p}input_blocks.{first}.1.proj_in.weight" in shapes for first in firsts]
    depth = [len(_indices(shapes, re.escape(f"{p}input_blocks.{first}.1.") + r"transformer_blocks\.(\d+)\.")) or 1
             for first in firsts]
    up_attention = [f"{p}output_blocks.{level * (layers + 1)}.1.proj_in.weight" in shapes for level in range(levels)]
    projection = _first_shape(shapes, p, ".proj_in.weight")
    cross = _first_shape(shapes, p, ".attn2.to_k.weight")

    config = dict(base)
    config["in_channels"] = _shape(shapes, f"{p}input_blocks.0.0.weight")[1]
    config["out_channels"] = _shape(shapes, f"{p}out.2.weight")[0]
    config["block_out_channels"] = widths
    config["layers_per_block"] = layers
    config["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    config["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention]
    if cross is not None and projection is not None:
        config["cross_attention_dim"] = cross[1]
        _put(config, "use_linear_projection", len(projection) == 2, False)
    _put(config, "transformer_layers_per_block", depth if any(d != 1 for d in depth) else 1, 1)
    if not family_info(family).unet_attention_heads:  # SD1: 8 heads in every block, whatever the width (shipped)
        config["attention_head_dim"] = [max(1, width // _HEAD_WIDTH) for width in widths]
    label = shapes.get(f"{p}label_emb.0.0.weight")
    if label is not None:  # SDXL: sinusoidal embeddings of 6 size/crop values + the pooled text embedding
        config["projection_class_embeddings_input_dim"] = label[1]
        if pooled_width is not None and (label[1] - pooled_width) % 6 == 0:
            config["addition_time_embed_dim"] = (label[1] - pooled_width) // 6
    return config


def _first_shape(shapes: Shapes, prefix: str, suffix: str) -> tuple[int, ...] | None:
    return next((shape for key, shape in shapes.items() if key.startswith(prefix) and key.endswith(suffix)), None)


def _indices(shapes: Shapes, pattern: str) -> set[int]:
    """The numbers that ``pattern``'s one group captures at the start of the keys (block or layer indices)."""
    regex = re.compile(pattern)
    return {int(match[1]) for key in shapes if (match := regex.match(key))}


# --- text encoders -------------------------------------------------------------------------------------------------

# Where each size shows, per layout: token embedding [vocab, width], positions [n, width], first MLP [inner, width],
# and the pattern that numbers the layers.
_CLIP_KEYS = {
    "clip": ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
             "text_model.encoder.layers.0.mlp.fc1.weight", r"text_model\.encoder\.layers\.(\d+)\."),
    "open_clip": ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight",
                  r"transformer\.resblocks\.(\d+)\."),
}


def infer_clip_config(shapes: Shapes, prefix: str, layout: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (the family's text-encoder config) with the sizes of the encoder under ``prefix`` in ``shapes``."""
    # Files written with transformers >= 5.6 may lack the "text_model." level of the HF layout.
    if layout == "clip" and f"{prefix}text_model.embeddings.token_embedding.weight" not in shapes:
        shapes = {prefix + "text_model." + key[len(prefix):]: shape for key, shape in shapes.items()
                  if key.startswith(prefix)}
    token, position, mlp, numbered = _CLIP_KEYS[layout]
    vocab, width = _shape(shapes, prefix + token)
    indices = _indices(shapes, re.escape(prefix) + numbered)
    if prefix == SD2_TEXT_PREFIX:
        indices.discard(_UNUSED_SD2_BLOCK)
    config = dict(base)
    config.update(vocab_size=vocab, hidden_size=width, max_position_embeddings=_shape(shapes, prefix + position)[0],
                  intermediate_size=_shape(shapes, prefix + mlp)[0], num_hidden_layers=len(indices),
                  num_attention_heads=max(1, width // _HEAD_WIDTH))
    projection = shapes.get(prefix + "text_projection")
    if projection is not None and base.get("architectures") == ["CLIPTextModelWithProjection"]:
        config["projection_dim"] = projection[1]  # OpenCLIP's [width, dim] matrix
    return config


# --- VAE -----------------------------------------------------------------------------------------------------------


def infer_vae_config(shapes: Shapes, layout: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (a VAE config) with the values that shape parameters read from a prefix-free VAE in ``layout``.

    ``layout`` is "ldm" (``encoder.down.0.block.0...``) or "diffusers" (``encoder.down_blocks.0.resnets.0...``).
    Blocks and widths come from the encoder's ResNets, the latent channels from ``encoder.conv_out`` (mean and
    log-variance, hence twice the latent channels). GroupNorm's group count shows in no shape; it stays as in
    ``base`` (32 in every SD VAE).

    Raises:
        ConfigInferenceError: the encoder's blocks are incomplete or a key the layout needs is missing.
    """
    widths: dict[int, int] = {}
    layers: dict[int, int] = {}
    for key, shape in shapes.items():
        match = _VAE_RESNET[layout].match(key)
        if match:
            block, layer = int(match[1]), int(match[2])
            widths[block] = int(shape[0])
            layers[block] = max(layers.get(block, 0), layer + 1)
    blocks = len(widths)
    if blocks == 0 or sorted(widths) != list(range(blocks)):
        raise ConfigInferenceError(f"the VAE encoder's down blocks are incomplete (found blocks {sorted(widths)})")
    config = dict(base)
    config.update(
        in_channels=_shape(shapes, "encoder.conv_in.weight")[1],
        out_channels=_shape(shapes, "decoder.conv_out.weight")[0],
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=[widths[index] for index in range(blocks)],
        layers_per_block=layers[0],
        latent_channels=_shape(shapes, "encoder.conv_out.weight")[0] // 2,
    )
    _put(config, "use_quant_conv", "quant_conv.weight" in shapes, True)
    _put(config, "use_post_quant_conv", "post_quant_conv.weight" in shapes, True)
    _put(config, "mid_block_add_attention", any(k.startswith(_VAE_MID_ATTENTION[layout]) for k in shapes), True)
    return config
