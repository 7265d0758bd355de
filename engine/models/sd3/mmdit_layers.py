"""The building blocks of the SD3 / SD3.5 MMDiT: embedders, attention weights, the dismantled block, final layer.

Parameter names are Stability AI's (``mlp.0``, ``attn.qkv``, ``attn.ln_q``, ``adaLN_modulation.1``, ``fc1``...) so
the model in :mod:`engine.models.sd3.mmdit` loads SAI state dicts as they are. The maths is sd-scripts'
``library/sd3_models.py`` (itself mcmonkey's sd3-ref); the joint block and the model live in ``mmdit.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionLinears",
    "DismantledBlock",
    "Embedder",
    "FinalLayer",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "attention",
    "layer_norm",
    "modulate",
    "timestep_embedding",
]

# Width of the sinusoidal timestep embedding fed to t_embedder.
TIME_EMBED_DIM = 256

# ------------------------------------------------------------------------------------------------ small functions


def timestep_embedding(t: Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos | sin]`` of t (float32, [N, dim]); t is on the 0..1000 scale (σ·1000).

    Same frequencies and order as sd-scripts and diffusers' ``Timesteps(flip_sin_to_cos=True, shift=0)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat((angles.cos(), angles.sin()), dim=-1), (0, dim % 2))


def layer_norm(x: Tensor) -> Tensor:
    """The parameter-free LayerNorm before every modulation (its scale and shift come from adaLN)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN on an already normalised x; shift and scale are [B, 1, hidden] and broadcast over the tokens."""
    return x * (1 + scale) + shift


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain multi-head attention over [B, H, L, D] heads (no mask: the MMDiT never gets one); [B, L, H*D]."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------------------------------- layers


class PatchEmbed(nn.Module):
    """``x_embedder``: a p x p stride-p convolution turning latent patches into tokens [B, h*w, hidden]."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Embedder(nn.Module):
    """``t_embedder`` / ``y_embedder``: Linear, SiLU, Linear in a Sequential named ``mlp`` (keys ``mlp.0``,
    ``mlp.2``)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class RMSNorm(nn.Module):
    """SD3.5's per-head query/key RMS norm with a learned ``weight`` (eps 1e-6).

    In float32: bf16 squares lose precision, and a weight kept in fp8 does not mix with other dtypes.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.float()
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (normed * self.weight.float()).to(x.dtype)


class Mlp(nn.Module):
    """fc1, tanh-GELU, fc2."""

    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AttentionLinears(nn.Module):
    """One stream's attention weights: ``qkv`` (Q, K, V one after the other, head-major), optional ``ln_q`` /
    ``ln_k`` and the output ``proj`` (absent in the last block's pre-only context stream)."""

    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, pre_only: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.ln_q = RMSNorm(hidden // num_heads) if qk_norm else None
        self.ln_k = RMSNorm(hidden // num_heads) if qk_norm else None
        self.proj = None if pre_only else nn.Linear(hidden, hidden)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens [B, L, hidden] -> Q, K, V [B, H, L, D], queries and keys normalised when the model has qk-norm."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        if self.ln_q is not None and self.ln_k is not None:
            q, k = self.ln_q(q).to(v.dtype), self.ln_k(k).to(v.dtype)
        return q, k, v


class DismantledBlock(nn.Module):
    """One stream (context or image) of a joint block, with adaLN modulation (spec §8.1).

    Its modulation rows are (shift, scale, gate) for attention and for the MLP, then (SD3.5 medium's ``attn2``
    blocks) shift, scale, gate for the image-only attention; a pre-only block (the last context stream) has only
    the attention's shift and scale, no output projection and no MLP. LoRA targets every nn.Linear inside.
    """

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int, *, qk_norm: bool, pre_only: bool = False,
                 attn2: bool = False) -> None:
        super().__init__()
        if pre_only and attn2:
            raise ValueError("DismantledBlock: a pre-only (last context) stream cannot have attn2")
        self.pre_only = pre_only
        self.attn = AttentionLinears(hidden, num_heads, qk_norm, pre_only)
        self.attn2 = AttentionLinears(hidden, num_heads, qk_norm) if attn2 else None
        self.mlp = None if pre_only else Mlp(hidden, mlp_hidden)
        self.mod_count = 2 if pre_only else 9 if attn2 else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.mod_count * hidden))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None, list[Tensor]]:
        """Q, K, V for the joint attention, those of attn2 (or None) and the modulation rows [B, 1, hidden]."""
        mods = [row[:, None] for row in self.adaLN_modulation(c).chunk(self.mod_count, dim=-1)]
        normed = layer_norm(x)
        qkv = self.attn.heads(modulate(normed, mods[0], mods[1]))
        qkv2 = None if self.attn2 is None else self.attn2.heads(modulate(normed, mods[6], mods[7]))
        return qkv, qkv2, mods

    def post_attention(self, x: Tensor, attn_out: Tensor, attn2_out: Tensor | None, mods: list[Tensor]) -> Tensor:
        """Gated residual attention output(s), then the gated residual MLP on the re-modulated stream."""
        if self.attn.proj is None or self.mlp is None:
            raise RuntimeError("DismantledBlock: a pre-only stream has no post-attention part")
        _, _, gate1, shift2, scale2, gate2 = mods[:6]
        x = x + gate1 * self.attn.proj(attn_out)
        if self.attn2 is not None and self.attn2.proj is not None and attn2_out is not None:
            x = x + mods[8] * self.attn2.proj(attn2_out)
        return x + gate2 * self.mlp(modulate(layer_norm(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (SAI order: shift, then scale), the projection to patch pixels and the unpatchify to [B, C, H, W]."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor, height: int, width: int) -> Tensor:
        """Tokens [B, h*w, hidden] of an h x w patch grid -> [B, C, h*p, w*p]."""
        shift, scale = (row[:, None] for row in self.adaLN_modulation(c).chunk(2, dim=-1))
        x = self.linear(modulate(layer_norm(x), shift, scale))
        p, channels = self.patch_size, self.out_channels
        x = x.view(x.shape[0], height, width, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], channels, height * p, width * p)
