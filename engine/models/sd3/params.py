"""The sizes of an SD3 / SD3.5 MMDiT (:class:`SD3Params`), the three published variants, and reading them from a
state dict (spec §8.1).

Kept apart from the model so that loaders, the doctor and the LoRA tools can size a transformer, and tell the
variant, from a file's header without building it. Everything here is plain Python (no torch).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "HEAD_DIM",
    "SAI_PREFIX",
    "SD35_LARGE",
    "SD35_MEDIUM",
    "SD3_MEDIUM",
    "SD3Params",
    "VARIANTS",
    "params_from_state_dict",
    "sd3_variant_of",
    "tiny_params",
]

# SD3's "magic": every head is 64 wide and there are as many heads as blocks, so hidden = 64 * depth.
HEAD_DIM = 64
# The prefix of the MMDiT keys in a SAI single file; the functions here take the keys without it.
SAI_PREFIX = "model.diffusion_model."
# sd-scripts' model_type names, the variants' names everywhere in Atelier (metadata, scheduler_config, presets).
VARIANTS = ("medium", "5-medium", "5-large")


@dataclass(frozen=True)
class SD3Params:
    """Sizes of an MMDiT. ``qk_norm`` is SD3.5's RMS norm of queries and keys; ``attn2_layers`` are the blocks
    whose image stream has SD3.5 medium's second, image-only attention (diffusers' ``dual_attention_layers``)."""

    depth: int
    patch_size: int = 2
    in_channels: int = 16
    pos_embed_max_size: int = 192
    adm_in_channels: int = 2048
    context_in_dim: int = 4096
    qk_norm: bool = False
    attn2_layers: tuple[int, ...] = ()
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"SD3Params: depth must be at least 1, got {self.depth}")
        outside = [index for index in self.attn2_layers if not 0 <= index < self.depth]
        if outside:
            raise ValueError(f"SD3Params: attn2_layers {outside} must be block indices below depth {self.depth}")

    @property
    def hidden_size(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def num_heads(self) -> int:
        return self.depth

    @property
    def head_dim(self) -> int:
        return HEAD_DIM

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def variant(self) -> str:
        """sd-scripts' model_type: no qk-norm -> "medium"; qk-norm with attn2 -> "5-medium"; else "5-large"."""
        if not self.qk_norm:
            return "medium"
        return "5-medium" if self.attn2_layers else "5-large"


SD3_MEDIUM = SD3Params(depth=24, pos_embed_max_size=192)
SD35_MEDIUM = SD3Params(depth=24, pos_embed_max_size=384, qk_norm=True, attn2_layers=tuple(range(13)))
SD35_LARGE = SD3Params(depth=38, pos_embed_max_size=192, qk_norm=True)


def tiny_params(variant: str) -> SD3Params:
    """A two-block model of the variant's architecture (hidden 128, two heads) for tests and tiny files."""
    if variant not in VARIANTS:
        raise ValueError(f"SD3 variant {variant!r} is not one of {', '.join(VARIANTS)}")
    return SD3Params(
        depth=2,
        pos_embed_max_size=16,
        adm_in_channels=64,
        context_in_dim=64,
        qk_norm=variant != "medium",
        attn2_layers=(0,) if variant == "5-medium" else (),
    )


# --------------------------------------------------------------------------------------------- state-dict shapes

_ATTN2 = re.compile(r"^joint_blocks\.(\d+)\.x_block\.attn2\.")
_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.")
_QK_NORM_KEY = "joint_blocks.0.context_block.attn.ln_k.weight"


def _attn2_layers(keys: Sequence[str]) -> tuple[int, ...]:
    return tuple(sorted({int(match[1]) for key in keys if (match := _ATTN2.match(key))}))


def sd3_variant_of(shapes: Mapping[str, Sequence[int]]) -> str:
    """"medium", "5-medium" or "5-large" from the key names alone (no prefix), as sd-scripts tells them apart."""
    keys = list(shapes)
    _check_layout(keys)
    if _QK_NORM_KEY not in shapes:
        return "medium"
    return "5-medium" if _attn2_layers(keys) else "5-large"


def _check_layout(keys: Sequence[str]) -> None:
    if any(key.startswith(SAI_PREFIX) for key in keys):
        raise ValueError(f"SD3 state dict keys still carry the {SAI_PREFIX!r} prefix: strip it first")
    if not any(key.startswith("joint_blocks.") for key in keys):
        raise ValueError(
            "SD3 state dict has no joint_blocks.* keys: it is not a SAI-layout SD3/SD3.5 MMDiT "
            "(diffusers-layout transformers need engine.models.sd3.convert.diffusers_to_sai first)"
        )


def params_from_state_dict(shapes: Mapping[str, Sequence[int]]) -> SD3Params:
    """Work out the MMDiT sizes from SAI key names (no prefix) and their tensor shapes (spec §8.1).

    Widths come from the shapes, qk-norm and the attn2 blocks from which keys exist, as sd-scripts'
    ``analyze_state_dict_state`` does; the number of joint blocks must agree with the width (hidden = 64 * depth).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"SD3 state dict has no {key!r}: the file is incomplete or not an SD3/SD3.5 MMDiT")
        return tuple(shapes[key])

    keys = list(shapes)
    _check_layout(keys)
    hidden, in_channels, patch_size, _ = shape("x_embedder.proj.weight")
    if hidden % HEAD_DIM:
        raise ValueError(f"SD3 state dict: x_embedder.proj.weight has {hidden} outputs, not a multiple of {HEAD_DIM}")
    depth = hidden // HEAD_DIM
    blocks = max((int(match[1]) for key in keys if (match := _BLOCK.match(key))), default=-1) + 1
    if blocks != depth:
        raise ValueError(f"SD3 state dict has {blocks} joint blocks but its width {hidden} means {depth}: "
                         "the file is truncated or not an SD3/SD3.5 MMDiT")
    tokens = shape("pos_embed")[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"SD3 state dict: pos_embed has {tokens} positions, not a square grid")
    return SD3Params(
        depth=depth,
        patch_size=patch_size,
        in_channels=in_channels,
        pos_embed_max_size=grid,
        adm_in_channels=shape("y_embedder.mlp.0.weight")[1],
        context_in_dim=shape("context_embedder.weight")[1],
        qk_norm=_QK_NORM_KEY in shapes,
        attn2_layers=_attn2_layers(keys),
        mlp_ratio=shape("joint_blocks.0.x_block.mlp.fc1.weight")[0] / hidden,
    )
