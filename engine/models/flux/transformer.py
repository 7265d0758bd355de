"""The FLUX.1 (dev, schnell) and Chroma transformer, with Black Forest Labs' state-dict key names (spec §1.1-1.3).

A BFL single file (``flux1-dev.safetensors``, ``Chroma.safetensors``) loads into :class:`Flux` with
``load_state_dict(strict=True)`` and saves back with the same keys, so nothing needs converting and LoRA module
names follow kohya's ``lora_unet_double_blocks_0_img_attn_qkv`` scheme directly.

How the model runs, in short:

* The packed latent tokens (``img``) and the T5 tokens (``txt``) are projected to the hidden width and go through
  ``depth`` double-stream blocks (separate weights per stream, one joint attention over ``txt`` then ``img``), then
  through ``depth_single_blocks`` single-stream blocks over the concatenated sequence, and the image part is
  projected back to 64 channels.
* Every block is modulated (adaLN: shift, scale, gate) by a conditioning vector. FLUX.1 builds one vector from the
  timestep, the guidance strength (dev) and the CLIP-L pooled vector, and each block owns a linear layer that turns
  it into its modulations. Chroma has no such layers: a small MLP (the "approximator", ``distilled_guidance_layer``)
  produces every modulation vector directly, one per numbered slot.
* Positions enter through 3-axis rotary embeddings on the attention queries and keys (spec §2.3).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "CHROMA",
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "DoubleStreamBlock",
    "Flux",
    "FluxParams",
    "SingleStreamBlock",
    "params_from_state_dict",
    "timestep_embedding",
]

# Width of the sinusoidal timestep/guidance embedding fed to time_in and guidance_in.
TIME_EMBED_DIM = 256


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


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H*D] -> three [B, H, L, D]; BFL packs Q, K, V one after the other, each head-major."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def _norm(x: Tensor) -> Tensor:
    """The parameter-free LayerNorm every modulated input goes through (its scale and shift come from adaLN)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * _norm(x) + shift


def _gelu_mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
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
        q, k, v = _split_heads(self.qkv(x), self.num_heads)
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


def _rows(mods: Tensor) -> list[Tensor]:
    """Modulation vectors [B, n, hidden] -> n tensors [B, 1, hidden] that broadcast over the tokens."""
    return list(mods[:, :, None].unbind(1))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text tokens first)."""

    def __init__(self, params: FluxParams) -> None:
        super().__init__()
        hidden = params.hidden_size
        self.num_heads = params.num_heads
        self.img_mod = None if params.chroma else Modulation(hidden, 6)
        self.img_attn = SelfAttention(hidden, params.num_heads, params.qkv_bias)
        self.img_mlp = _gelu_mlp(hidden, params.mlp_hidden)
        self.txt_mod = None if params.chroma else Modulation(hidden, 6)
        self.txt_attn = SelfAttention(hidden, params.num_heads, params.qkv_bias)
        self.txt_mlp = _gelu_mlp(hidden, params.mlp_hidden)

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, table: Tensor, key_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``vec`` is FLUX.1's conditioning vector [B, hidden], or Chroma's 12 slot vectors (6 image, 6 text)."""
        img_mods, txt_mods = self._modulations(vec)
        img_q, img_k, img_v = self.img_attn.heads(_modulate(img, img_mods[0], img_mods[1]))
        txt_q, txt_k, txt_v = self.txt_attn.heads(_modulate(txt, txt_mods[0], txt_mods[1]))
        joint = attention(
            torch.cat((txt_q, img_q), dim=2),
            torch.cat((txt_k, img_k), dim=2),
            torch.cat((txt_v, img_v), dim=2),
            table,
            key_mask,
        )
        txt_out, img_out = joint.split([txt.shape[1], img.shape[1]], dim=1)
        img = _finish_stream(img, img_out, img_mods, self.img_attn.proj, self.img_mlp)
        txt = _finish_stream(txt, txt_out, txt_mods, self.txt_attn.proj, self.txt_mlp)
        return img, txt

    def _modulations(self, vec: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        if self.img_mod is None or self.txt_mod is None:
            return _rows(vec[:, :6]), _rows(vec[:, 6:])
        return _rows(self.img_mod(vec)), _rows(self.txt_mod(vec))


def _finish_stream(x: Tensor, attn_out: Tensor, mods: list[Tensor], proj: nn.Module, mlp: nn.Module) -> Tensor:
    """The gated residual attention output, then the gated residual MLP on the re-modulated stream."""
    _, _, gate1, shift2, scale2, gate2 = mods
    x = x + gate1 * proj(attn_out)
    return x + gate2 * mlp(_modulate(x, shift2, scale2))


class SingleStreamBlock(nn.Module):
    """One stream over text + image tokens; QKV and the MLP input share ``linear1``, their outputs ``linear2``."""

    def __init__(self, params: FluxParams) -> None:
        super().__init__()
        hidden = params.hidden_size
        self.num_heads = params.num_heads
        self.split = [3 * hidden, params.mlp_hidden]
        self.linear1 = nn.Linear(hidden, 3 * hidden + params.mlp_hidden)
        self.linear2 = nn.Linear(hidden + params.mlp_hidden, hidden)
        self.norm = QKNorm(params.head_dim)
        self.modulation = None if params.chroma else Modulation(hidden, 3)

    def forward(self, x: Tensor, vec: Tensor, table: Tensor, key_mask: Tensor | None) -> Tensor:
        """``vec`` is FLUX.1's conditioning vector [B, hidden], or Chroma's 3 slot vectors [B, 3, hidden]."""
        shift, scale, gate = _rows(vec if self.modulation is None else self.modulation(vec))
        qkv, mlp_in = self.linear1(_modulate(x, shift, scale)).split(self.split, dim=-1)
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        mixed = torch.cat((attention(q, k, v, table, key_mask), F.gelu(mlp_in, approximate="tanh")), dim=-1)
        return x + gate * self.linear2(mixed)


class LastLayer(nn.Module):
    """adaLN (BFL order: shift, then scale) and the projection back to packed latent channels."""

    def __init__(self, hidden: int, out_channels: int, modulated: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden)) if modulated else None

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """``vec`` is FLUX.1's conditioning vector [B, hidden], or Chroma's 2 slot vectors [B, 2, hidden]."""
        mods = vec if self.adaLN_modulation is None else self.adaLN_modulation(vec).unflatten(-1, (2, -1))
        shift, scale = _rows(mods)
        return self.linear(_modulate(x, shift, scale))


# ----------------------------------------------------------------------------------------------------------- model


def _text_window(txt_mask: Tensor, length: int) -> tuple[int, Tensor]:
    """Chroma's text window: each sample attends to its tokens plus one padding token; the batch keeps the longest.

    Returns the number of text tokens to keep and the key mask over them [B, keep].
    """
    lengths = (txt_mask[:, :length].sum(dim=1) + 1).clamp(max=length)
    keep = int(lengths.max())
    return keep, torch.arange(keep, device=txt_mask.device)[None] < lengths[:, None]


class Flux(nn.Module):
    """FLUX.1 dev / schnell, or Chroma when ``params.chroma``; state-dict keys are BFL's (spec §1.2)."""

    def __init__(self, params: FluxParams = FLUX_DEV) -> None:
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, hidden)
        if params.chroma:
            self.distilled_guidance_layer = Approximator(
                params.approximator_in_dim, hidden, params.approximator_hidden, params.approximator_depth
            )
        else:
            self.time_in = MLPEmbedder(TIME_EMBED_DIM, hidden)
            self.vector_in = MLPEmbedder(params.vec_in_dim, hidden)
            if params.guidance_embed:
                self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, hidden)
        self.txt_in = nn.Linear(params.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(params) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(params) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(hidden, params.in_channels, modulated=not params.chroma)
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        """Recompute each block in the backward pass; ``cpu_offload`` also parks the blocks' inputs on the CPU."""
        self.gradient_checkpointing = True
        self.cpu_offload_checkpointing = cpu_offload

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor | None = None,
        guidance: Tensor | None = None,
        txt_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow velocity for packed latents.

        Args:
            img: packed noisy latents [B, L, 64]; img_ids their positions [B, L, 3] (spec §2.2-2.3).
            txt: T5 hidden states [B, Lt, context_in_dim]; txt_ids [B, Lt, 3] (zeros).
            timesteps: sigma in 0..1 [B].
            y: CLIP-L pooled vector [B, vec_in_dim]; None for Chroma.
            guidance: guidance strength [B] (FLUX.1 dev needs it; Chroma treats None as 0; schnell ignores it).
            txt_mask: T5 padding mask [B, Lt], True = real token. Masked text tokens are never attended to
                (spec §3.4); Chroma also drops the padding past one extra token.

        Returns:
            The prediction for the image tokens [B, L, 64].
        """
        self._check_inputs(img, txt, y, guidance)
        if self.params.chroma and txt_mask is not None:
            keep, txt_mask = _text_window(txt_mask, txt.shape[1])
            txt, txt_ids = txt[:, :keep], txt_ids[:, :keep]
        conditioning = self._conditioning(timesteps, y, guidance, img.dtype)
        img, txt = self.img_in(img), self.txt_in(txt)
        table = rope_table(torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta)
        key_mask = None if txt_mask is None else _key_mask(txt_mask, img.shape[1])
        for index, block in enumerate(self.double_blocks):
            img, txt = self._run_block(block, (img, txt), self._double_vec(conditioning, index), table, key_mask)
        x = torch.cat((txt, img), dim=1)
        for index, block in enumerate(self.single_blocks):
            x = self._run_block(block, (x,), self._single_vec(conditioning, index), table, key_mask)
        return self.final_layer(x[:, txt.shape[1] :], self._final_vec(conditioning))

    def _check_inputs(self, img: Tensor, txt: Tensor, y: Tensor | None, guidance: Tensor | None) -> None:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"Flux.forward: img and txt must be [B, L, C] token tensors, got {img.shape}, {txt.shape}")
        if not self.params.chroma and y is None:
            raise ValueError("Flux.forward: FLUX.1 needs y, the CLIP-L pooled vector [B, 768]; only Chroma has none")
        if self.params.guidance_embed and guidance is None:
            raise ValueError("Flux.forward: FLUX.1 dev is guidance-distilled: pass guidance [B] (flow.guidance_scale)")

    def _conditioning(self, timesteps: Tensor, y: Tensor | None, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        """FLUX.1: the conditioning vector [B, hidden]; Chroma: every modulation slot's vector [B, slots, hidden]."""
        if self.params.chroma:
            if guidance is None:
                guidance = torch.zeros_like(timesteps)
            return self.distilled_guidance_layer(self._approximator_input(timesteps, guidance).to(dtype))
        vec = self.time_in(timestep_embedding(timesteps, TIME_EMBED_DIM).to(dtype))
        if self.params.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, TIME_EMBED_DIM).to(dtype))
        return vec + self.vector_in(y)

    def _approximator_input(self, timesteps: Tensor, guidance: Tensor) -> Tensor:
        """[B, slots, in_dim]: the timestep and guidance embeddings (a quarter each) and the slot number (a half).

        The slot number is embedded like a timestep so that one shared MLP can give every slot its own vector.
        sd-scripts runs the approximator under no_grad (a workaround noted in its code); here it is an ordinary
        layer, which costs nothing while it is frozen and lets a full fine-tune train it.
        """
        quarter, slots = self.params.approximator_in_dim // 4, self.params.modulation_slots
        scalars = torch.cat((timestep_embedding(timesteps, quarter), timestep_embedding(guidance, quarter)), dim=-1)
        slot_ids = timestep_embedding(torch.arange(slots, device=timesteps.device), 2 * quarter)
        batch = timesteps.shape[0]
        return torch.cat((scalars[:, None].expand(-1, slots, -1), slot_ids[None].expand(batch, -1, -1)), dim=-1)

    # Chroma's slot order (spec §1.2): 3 per single block, then 6 per double block for the image stream, then 6 per
    # double block for the text stream, then the last layer's shift and scale.

    def _double_vec(self, conditioning: Tensor, index: int) -> Tensor:
        if not self.params.chroma:
            return conditioning
        img_start = 3 * self.params.depth_single_blocks + 6 * index
        txt_start = img_start + 6 * self.params.depth
        return torch.cat((conditioning[:, img_start : img_start + 6], conditioning[:, txt_start : txt_start + 6]), 1)

    def _single_vec(self, conditioning: Tensor, index: int) -> Tensor:
        return conditioning[:, 3 * index : 3 * index + 3] if self.params.chroma else conditioning

    def _final_vec(self, conditioning: Tensor) -> Tensor:
        return conditioning[:, -2:] if self.params.chroma else conditioning

    def _run_block(
        self, block: nn.Module, streams: tuple[Tensor, ...], *shared: Tensor | None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Run one block, checkpointed when enabled and gradients are on.

        With CPU offload the token streams enter the checkpoint as CPU copies: the checkpoint keeps only those
        (the GPU originals are freed) and the recomputation moves them back. ``shared`` (conditioning, RoPE table,
        mask) is the same for every block, so it stays where it is.
        """
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return block(*streams, *shared)
        if not self.cpu_offload_checkpointing:
            return checkpoint(block, *streams, *shared, use_reentrant=False)
        device, count = streams[0].device, len(streams)

        def on_device(*args: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
            moved = tuple(stream.to(device, non_blocking=True) for stream in args[:count])
            return block(*moved, *args[count:])

        return checkpoint(on_device, *(stream.to("cpu") for stream in streams), *shared, use_reentrant=False)


def _key_mask(txt_mask: Tensor, image_tokens: int) -> Tensor:
    """SDPA key mask [B, 1, 1, Lt + L]: the text mask, then every image token (broadcast over heads and queries)."""
    image = torch.ones(txt_mask.shape[0], image_tokens, dtype=torch.bool, device=txt_mask.device)
    return torch.cat((txt_mask.bool(), image), dim=1)[:, None, None, :]
