"""The building blocks of the FLUX.1 / Chroma transformer: embeddings, rotary attention, norms and adaLN layers.

Parameter names are Black Forest Labs' (``scale``, ``in_layer``, ``lin``, ``adaLN_modulation``...), so the modules in
:mod:`engine.models.flux.transformer` built from them load BFL state dicts as they are. The blocks and the model
that put these together live there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Approximator",
    "LastLayer",
    "MLPEmbedder",
    "Modulation",
    "QKNorm",
    "RMSNorm",
    "SelfAttention",
    "apply_rope",
    "attention",
    "gelu_mlp",
    "modulate",
    "modulation_rows",
    "rope_table",
    "split_heads",
    "timestep_embedding",
]

# ------------------------------------------------------------------------------------------------ small functions


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding ``[cos | sin]`` of ``time_factor * t`` (float32, [N, dim]).

    The model takes sigma in 0..1 while its frequencies were laid out for 0..1000, hence the time factor.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (time_factor * t.float())[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


def rope_table(ids: Tensor, axes_dim: Sequence[int], theta: int) -> Tensor:
    """Rotary angles' (cos, sin) for position ids [B, L, n_axes]: [B, 1, L, head_dim/2, 2].

    Each axis gets its own slice of the head's channel pairs. The angles are computed in float64 where the device
    has it, because positions times the low frequencies lose phase in float32 (as the reference does).
    """
    wide = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=wide, device=ids.device) / dim)
        angles.append(ids[..., axis].to(wide)[..., None] * omega)
    angle = torch.cat(angles, dim=-1)
    return torch.stack((angle.cos(), angle.sin()), dim=-1).float()[:, None]


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate each adjacent channel pair (x0, x1) of x [B, H, L, D] by the table's angle, in float32."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = table.unbind(-1)
    rotated = torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1)
    return rotated.flatten(-2).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, key_mask: Tensor | None) -> Tensor:
    """Rotary attention over [B, H, L, D] heads; returns [B, L, H*D]. key_mask [B, 1, 1, L] True = attend."""
    out = F.scaled_dot_product_attention(apply_rope(q, table), apply_rope(k, table), v, attn_mask=key_mask)
    return out.transpose(1, 2).flatten(2)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H*D] -> three [B, H, L, D]; BFL packs Q, K, V one after the other, each head-major."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def _norm(x: Tensor) -> Tensor:
    """The parameter-free LayerNorm every modulated input goes through (its scale and shift come from adaLN)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * _norm(x) + shift


def gelu_mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    # A Sequential so the keys are BFL's ``img_mlp.0`` / ``img_mlp.2``.
    return nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))


# ---------------------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """RMS normalisation with a learned ``scale`` (BFL's name).

    All in float32: bf16 squares lose precision, and the scale may be stored in fp8, which does not mix with other
    dtypes in an elementwise product (sd-scripts multiplies by ``scale.float()`` for the same reason).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.float()
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (normed * self.scale.float()).to(x.dtype)


class QKNorm(nn.Module):
    """Per-head RMS norm of queries and keys, which keeps attention logits bounded."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """The per-stream attention weights of a double block (the attention itself is joint, in the block)."""

    def __init__(self, hidden: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.norm = QKNorm(hidden // num_heads)
        self.proj = nn.Linear(hidden, hidden)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class MLPEmbedder(nn.Module):
    """Two linear layers with a SiLU between them: how scalars' embeddings and the CLIP vector enter."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """FLUX.1's per-block adaLN head: conditioning vector [B, hidden] -> ``count`` vectors [B, count, hidden]."""

    def __init__(self, hidden: int, count: int) -> None:
        super().__init__()
        self.count = count
        self.lin = nn.Linear(hidden, count * hidden)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(F.silu(vec)).unflatten(-1, (self.count, -1))


class Approximator(nn.Module):
    """Chroma's ``distilled_guidance_layer``: a residual MLP run on every modulation slot independently."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden)
        self.layers = nn.ModuleList(MLPEmbedder(hidden, hidden) for _ in range(depth))
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(depth))
        self.out_proj = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


def modulation_rows(mods: Tensor) -> list[Tensor]:
    """Modulation vectors [B, n, hidden] -> n tensors [B, 1, hidden] that broadcast over the tokens."""
    return list(mods[:, :, None].unbind(1))



class LastLayer(nn.Module):
    """adaLN (BFL order: shift, then scale) and the projection back to packed latent channels."""

    def __init__(self, hidden: int, out_channels: int, modulated: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)) if modulated else None

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """``vec`` is FLUX.1's conditioning vector [B, hidden], or Chroma's 2 slot vectors [B, 2, hidden]."""
        mods = vec if self.adaLN_modulation is None else self.adaLN_modulation(vec).unflatten(-1, (2, -1))
        shift, scale = modulation_rows(mods)
        return self.linear(modulate(x, shift, scale))


# ----------------------------------------------------------------------------------------------------------- model
