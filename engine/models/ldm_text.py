"""Text-encoder conversion from transformers' CLIP layout to the layouts found in original SD checkpoints.

* SD1 and SDXL's first encoder (CLIP ViT-L) are stored as a Hugging Face ``CLIPTextModel`` under a prefix, so
  only the prefix (and the ``text_model.`` wrapper that transformers ≥ 5.6 dropped) has to be added.
* SD2 and SDXL's second encoder come from OpenCLIP, which names things differently and fuses q/k/v into one
  ``in_proj`` matrix; the projection is a bare ``[width, embed_dim]`` parameter used as ``x @ text_projection``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "SD1_TEXT_PREFIX",
    "SD2_TEXT_PREFIX",
    "SDXL_TEXT1_PREFIX",
    "SDXL_TEXT2_PREFIX",
    "clip_to_ldm",
    "open_clip_to_ldm",
]

SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

# Top-level children of transformers' CLIPTextTransformer; anything else (text_projection) sits beside it.
_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")

_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}

_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def _with_text_model(key: str) -> str:
    """Return the key in the pre-5.6 transformers layout, where the transformer sits under ``text_model.``."""
    return "text_model." + key if key.startswith(_TEXT_MODEL_CHILDREN) else key


def _without_text_model(key: str) -> str:
    return key.removeprefix("text_model.")


def clip_to_ldm(
    text_encoder_state_dict: Mapping[str, torch.Tensor], prefix: str = SD1_TEXT_PREFIX
) -> dict[str, torch.Tensor]:
    """Prefix a Hugging Face CLIP text model's state dict for an LDM checkpoint.

    Args:
        text_encoder_state_dict: ``CLIPTextModel.state_dict()`` in either transformers layout (with or without
            the ``text_model.`` wrapper).
        prefix: ``SD1_TEXT_PREFIX`` for SD1.x, ``SDXL_TEXT1_PREFIX`` for SDXL's first encoder.

    Returns:
        ``{prefix + "text_model.…": tensor}``, the layout SD checkpoints (and kohya tools) expect.
    """
    return {prefix + _with_text_model(key): value for key, value in text_encoder_state_dict.items()}


def open_clip_to_ldm(
    text_encoder_state_dict: Mapping[str, torch.Tensor], prefix: str = SD2_TEXT_PREFIX
) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face CLIP text model's state dict to OpenCLIP's layout.

    Args:
        text_encoder_state_dict: ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` state dict.
        prefix: ``SD2_TEXT_PREFIX`` for SD2.x, ``SDXL_TEXT2_PREFIX`` for SDXL's second (bigG) encoder.

    Returns:
        ``{prefix + openclip_key: tensor}``: ``token_embedding``, ``positional_embedding``,
        ``transformer.resblocks.N.{attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_1, ln_2, mlp.c_fc,
        mlp.c_proj}``, ``ln_final`` and, when the model has one, ``text_projection`` (transposed).

    Raises:
        ValueError: a key has no OpenCLIP equivalent, or a layer lacks one of q/k/v.
    """
    state = {_without_text_model(key): value for key, value in text_encoder_state_dict.items()}
    converted: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        if key in _OPEN_CLIP_FIXED:
            converted[prefix + _OPEN_CLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            # nn.Linear stores [out, in]; OpenCLIP multiplies by a [width, embed_dim] matrix.
            converted[prefix + "text_projection"] = value.t().contiguous()
        elif key.startswith("encoder.layers."):
            if not _convert_open_clip_layer_key(key, value, prefix, converted, fused):
                unmapped.append(key)
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"open_clip_to_ldm: {len(unmapped)} keys have no OpenCLIP equivalent, e.g. {unmapped[:5]}")
    converted.update(_fuse_qkv(fused, prefix))
    return converted


def _convert_open_clip_layer_key(
    key: str,
    value: torch.Tensor,
    prefix: str,
    converted: dict[str, torch.Tensor],
    fused: dict[str, dict[str, torch.Tensor]],
) -> bool:
    """Handle one ``encoder.layers.N.*`` key; q/k/v parts are collected in ``fused`` for later concatenation."""
    layer, _, rest = key.removeprefix("encoder.layers.").partition(".")
    block = f"transformer.resblocks.{layer}."
    for projection in ("q", "k", "v"):
        head = f"self_attn.{projection}_proj."
        if rest.startswith(head):
            param = rest[len(head) :]  # "weight" or "bias"
            fused.setdefault(f"{block}attn.in_proj_{param}", {})[projection] = value
            return True
    for old, new in _OPEN_CLIP_LAYER_PARTS.items():
        if rest.startswith(old):
            converted[prefix + block + new + rest[len(old) :]] = value
            return True
    return False


def _fuse_qkv(fused: Mapping[str, Mapping[str, torch.Tensor]], prefix: str) -> dict[str, torch.Tensor]:
    """Concatenate q, k, v in that order along dim 0: this is how nn.MultiheadAttention's in_proj is laid out."""
    import torch  # Deferred so that importing engine.models stays cheap (detect_family needs no torch).

    result: dict[str, torch.Tensor] = {}
    for key, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"open_clip_to_ldm: {key} is missing {sorted({'q', 'k', 'v'} - set(parts))}")
        result[prefix + key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return result
