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

The sizes (:class:`~engine.models.flux.params.FluxParams`) live in ``params.py`` and the layers the blocks are made of
in ``layers.py``; this module holds the two block kinds (LoRA naming looks them up by class name) and the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.checkpointing import checkpoint_block
from engine.models.flux.layers import (
    Approximator,
    LastLayer,
    MLPEmbedder,
    Modulation,
    QKNorm,
    SelfAttention,
    attention,
    gelu_mlp,
    modulate,
    modulation_rows,
    rope_table,
    split_heads,
    timestep_embedding,
)
from engine.models.flux.params import FLUX_DEV, FluxParams

__all__ = ["DoubleStreamBlock", "Flux", "SingleStreamBlock"]

# Width of the sinusoidal timestep/guidance embedding fed to time_in and guidance_in.
TIME_EMBED_DIM = 256


# ---------------------------------------------------------------------------------------------------------- blocks


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text tokens first)."""

    def __init__(self, params: FluxParams) -> None:
        super().__init__()
        hidden = params.hidden_size
        self.num_heads = params.num_heads
        self.img_mod = None if params.chroma else Modulation(hidden, 6)
        self.img_attn = SelfAttention(hidden, params.num_heads, params.qkv_bias)
        self.img_mlp = gelu_mlp(hidden, params.mlp_hidden)
        self.txt_mod = None if params.chroma else Modulation(hidden, 6)
        self.txt_attn = SelfAttention(hidden, params.num_heads, params.qkv_bias)
        self.txt_mlp = gelu_mlp(hidden, params.mlp_hidden)

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, table: Tensor, key_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``vec`` is FLUX.1's conditioning vector [B, hidden], or Chroma's 12 slot vectors (6 image, 6 text)."""
        img_mods, txt_mods = self._modulations(vec)
        img_q, img_k, img_v = self.img_attn.heads(modulate(img, img_mods[0], img_mods[1]))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(txt, txt_mods[0], txt_mods[1]))
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
            return modulation_rows(vec[:, :6]), modulation_rows(vec[:, 6:])
        return modulation_rows(self.img_mod(vec)), modulation_rows(self.txt_mod(vec))


def _finish_stream(x: Tensor, attn_out: Tensor, mods: list[Tensor], proj: nn.Module, mlp: nn.Module) -> Tensor:
    """The gated residual attention output, then the gated residual MLP on the re-modulated stream."""
    _, _, gate1, shift2, scale2, gate2 = mods
    x = x + gate1 * proj(attn_out)
    return x + gate2 * mlp(modulate(x, shift2, scale2))


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
        shift, scale, gate = modulation_rows(vec if self.modulation is None else self.modulation(vec))
        qkv, mlp_in = self.linear1(modulate(x, shift, scale)).split(self.split, dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        mixed = torch.cat((attention(q, k, v, table, key_mask), F.gelu(mlp_in, approximate="tanh")), dim=-1)
        return x + gate * self.linear2(mixed)





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
        return checkpoint_block(block, *streams, *shared, streams=len(streams) if self.cpu_offload_checkpointing else 0)


def _key_mask(txt_mask: Tensor, image_tokens: int) -> Tensor:
    """SDPA key mask [B, 1, 1, Lt + L]: the text mask, then every image token (broadcast over heads and queries)."""
    image = torch.ones(txt_mask.shape[0], image_tokens, dtype=torch.bool, device=txt_mask.device)
    return torch.cat((txt_mask.bool(), image), dim=1)[:, None, None, :]
