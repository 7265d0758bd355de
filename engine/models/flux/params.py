"""The sizes of a FLUX.1 / Chroma transformer (:class:`FluxParams`), the presets, and reading them from a state dict.

Kept apart from the model so that loaders, the doctor and the LoRA tools can size a transformer from a file's header
without building it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["CHROMA", "FLUX_DEV", "FLUX_SCHNELL", "FluxParams", "params_from_state_dict"]

@dataclass(frozen=True)
class FluxParams:
    """Sizes of a FLUX.1 or Chroma transformer; defaults are FLUX.1 dev's (spec §1.1)."""

    in_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled width; unused by Chroma, which has no vector input
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True
    chroma: bool = False
    approximator_in_dim: int = 64
    approximator_depth: int = 5
    approximator_hidden: int = 5120

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"FluxParams: hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"FluxParams: axes_dim {self.axes_dim} must add up to the head width {self.head_dim}")
        if self.chroma and self.guidance_embed:
            raise ValueError("FluxParams: Chroma feeds guidance to its approximator; set guidance_embed=False")
        if self.chroma and self.approximator_in_dim % 4:
            raise ValueError(f"FluxParams: approximator_in_dim {self.approximator_in_dim} must divide by 4")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def modulation_slots(self) -> int:
        """Chroma's approximator output count: 3 per single block, 6 + 6 per double block, 2 for the last layer."""
        return 3 * self.depth_single_blocks + 12 * self.depth + 2


FLUX_DEV = FluxParams()
FLUX_SCHNELL = FluxParams(guidance_embed=False)
CHROMA = FluxParams(guidance_embed=False, chroma=True)


# --------------------------------------------------------------------------------------------- state-dict shapes


def _block_count(keys: Sequence[str], prefix: str) -> int:
    """1 + the highest block index under ``prefix`` (0 when there is none); pruned models have fewer blocks."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = [int(match.group(1)) for key in keys if (match := pattern.match(key))]
    return max(indices, default=-1) + 1


def params_from_state_dict(shapes: Mapping[str, Sequence[int]]) -> FluxParams:
    """Work out the transformer sizes from BFL key names (no prefix) and their tensor shapes.

    Block counts come from the keys (pruned models load), widths from the shapes, and the head width from the
    QK-norm scale, so the RoPE axes split the head as FLUX does (128 -> 16, 56, 56).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(
                f"FLUX transformer state dict has no {key!r}: it is not a BFL-layout FLUX.1/Chroma transformer "
                "(strip a 'model.diffusion_model.' prefix first; diffusers-layout files need converting)"
            )
        return tuple(shapes[key])

    keys = list(shapes)
    hidden, in_channels = shape("img_in.weight")
    depth = _block_count(keys, "double_blocks")
    singles = _block_count(keys, "single_blocks")
    if depth:
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    else:
        head_dim = shape("single_blocks.0.norm.query_norm.scale")[0]
        mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
        qkv_bias = True
    rope = (head_dim - head_dim // 8) // 2
    common = dict(
        in_channels=in_channels,
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=singles,
        axes_dim=(head_dim // 8, rope, rope),
        qkv_bias=qkv_bias,
    )
    if "distilled_guidance_layer.in_proj.weight" in shapes:
        approximator_hidden, approximator_in = shape("distilled_guidance_layer.in_proj.weight")
        return FluxParams(
            **common,
            guidance_embed=False,
            chroma=True,
            approximator_in_dim=approximator_in,
            approximator_depth=_block_count(keys, "distilled_guidance_layer.layers"),
            approximator_hidden=approximator_hidden,
        )
    return FluxParams(
        **common,
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )
