"""The SD3 / SD3.5 MMDiT, with Stability AI's state-dict key names (spec §8.1).

The MMDiT part of a SAI single file (``sd3_medium.safetensors``, ``sd3.5_large.safetensors``; keys after the
``model.diffusion_model.`` prefix) loads into :class:`MMDiT` with ``load_state_dict(strict=True)`` and saves back
with the same keys, so LoRA module names follow kohya's ``lora_unet_joint_blocks_0_x_block_attn_qkv`` directly.

How the model runs, in short:

* The latent [B, 16, H, W] is cut into 2 x 2 patches (``x_embedder``), plus the centred window of the stored sincos
  position table; the text context [B, L, 4096] (CLIP-L + CLIP-G, then T5) is projected to the hidden width.
* The conditioning vector is the timestep's embedding (t on the 0..1000 scale) plus the pooled CLIP vector's.
* ``depth`` joint blocks: each stream (``context_block``, ``x_block``) has its own weights and adaLN modulation, and
  one attention runs over both streams' tokens. SD3.5 normalises queries and keys (qk-norm); SD3.5 medium's first
  blocks add an image-only attention (``attn2``). The last block's context stream only feeds that attention.
* The final layer modulates the image tokens and folds them back into patches.

The layers live in ``mmdit_layers.py``, the position tables in ``pos_embed.py``, the sizes in ``params.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from engine.models.checkpointing import checkpoint_block
from engine.models.sd3.mmdit_layers import (
    TIME_EMBED_DIM,
    DismantledBlock,
    Embedder,
    FinalLayer,
    PatchEmbed,
    attention,
    timestep_embedding,
)
from engine.models.sd3.params import SD3Params
from engine.models.sd3.pos_embed import ScaledPosEmbeds, crop_window, sincos_pos_embed, window_corner

__all__ = ["DismantledBlock", "JointBlock", "MMDiT"]


class JointBlock(nn.Module):
    """The context and image streams of one block, attending jointly (context tokens first, as sd-scripts)."""

    def __init__(self, params: SD3Params, index: int) -> None:
        super().__init__()
        hidden, heads, mlp = params.hidden_size, params.num_heads, params.mlp_hidden
        self.context_block = DismantledBlock(hidden, heads, mlp, qk_norm=params.qk_norm,
                                             pre_only=index == params.depth - 1)
        self.x_block = DismantledBlock(hidden, heads, mlp, qk_norm=params.qk_norm,
                                       attn2=index in params.attn2_layers)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        """(context [B, Lc, hidden], x [B, Lx, hidden]) -> the updated pair; context is None after the last block."""
        ctx_qkv, _, ctx_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_qkv2, x_mods = self.x_block.pre_attention(x, c)
        joint = attention(*(torch.cat((ctx_part, x_part), dim=2) for ctx_part, x_part in zip(ctx_qkv, x_qkv,
                                                                                            strict=True)))
        ctx_out, x_out = joint.split([context.shape[1], x.shape[1]], dim=1)
        x_out2 = None if x_qkv2 is None else attention(*x_qkv2)
        x = self.x_block.post_attention(x, x_out, x_out2, x_mods)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, ctx_out, None, ctx_mods), x


class MMDiT(nn.Module):
    """SD3 medium, SD3.5 medium or SD3.5 large by ``params``; state-dict keys are SAI's (no prefix).

    Training options (set by the trainer; spec §8.5):

    * ``pos_emb_random_crop_rate``: with this probability per forward pass the position window is drawn at random
      instead of centred, from ``pos_emb_generator`` when the trainer sets one (a CPU ``torch.Generator``, so a
      resumed run can restore it) or else torch's global RNG; nothing is drawn while the rate is 0.
    * :meth:`enable_scaled_pos_embed`: per-resolution scaled position tables instead of the stored one.

    Both act only in passes that record gradients (training steps), so sampling and the validation loss see the
    model as inference does; sd-scripts applies them in every pass.
    """

    def __init__(self, params: SD3Params) -> None:
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        self.x_embedder = PatchEmbed(params.patch_size, params.in_channels, hidden)
        self.register_buffer("pos_embed", sincos_pos_embed(hidden, params.pos_embed_max_size))
        self.t_embedder = Embedder(TIME_EMBED_DIM, hidden)
        self.y_embedder = Embedder(params.adm_in_channels, hidden)
        self.context_embedder = nn.Linear(params.context_in_dim, hidden)
        self.joint_blocks = nn.ModuleList(JointBlock(params, index) for index in range(params.depth))
        self.final_layer = FinalLayer(hidden, params.patch_size, params.in_channels)
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.pos_emb_random_crop_rate = 0.0
        self.pos_emb_generator: torch.Generator | None = None
        self.scaled_pos_embeds: ScaledPosEmbeds | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj.weight.device

    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        """Recompute each joint block in the backward pass; ``cpu_offload`` also parks the blocks' inputs on the
        CPU (as the FLUX transformer; sd-scripts has no such option for SD3)."""
        self.gradient_checkpointing = True
        self.cpu_offload_checkpointing = cpu_offload

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False

    def enable_scaled_pos_embed(self, latent_sizes: Iterable[int]) -> None:
        """Use KohakuBlueleaf's scaled position tables in training, one per latent size (``round(√(w·h)) / 8`` of
        each training resolution). The stored ``pos_embed`` stays (it is saved with the model and used otherwise)."""
        self.scaled_pos_embeds = ScaledPosEmbeds(self.params.hidden_size, self.params.patch_size, latent_sizes)

    def disable_scaled_pos_embed(self) -> None:
        self.scaled_pos_embeds = None

    def forward(self, x: Tensor, t: Tensor, y: Tensor, context: Tensor) -> Tensor:
        """Predict for noisy latents.

        Args:
            x: latents [B, in_channels, H, W], H and W multiples of the patch size (2).
            t: timesteps [B] on the 0..1000 scale (σ·1000), float.
            y: pooled CLIP-L + CLIP-G vector [B, adm_in_channels].
            context: text tokens [B, L, context_in_dim].

        Returns:
            The model output [B, in_channels, H, W] (a flow velocity: x0 = x − σ·output).
        """
        height, width = self._patch_grid(x)
        tokens = self.x_embedder(x)
        tokens = tokens + self._positions(height, width, tokens.device).to(tokens.dtype)
        c = self.t_embedder(timestep_embedding(t).to(tokens.dtype)) + self.y_embedder(y)
        ctx: Tensor | None = self.context_embedder(context)
        for block in self.joint_blocks:
            ctx, tokens = self._run_block(block, ctx, tokens, c)
        return self.final_layer(tokens, c, height, width)

    def _patch_grid(self, x: Tensor) -> tuple[int, int]:
        patch = self.params.patch_size
        if x.ndim != 4 or x.shape[1] != self.params.in_channels:
            raise ValueError(f"MMDiT.forward: x must be latents [B, {self.params.in_channels}, H, W], got "
                             f"{tuple(x.shape)}")
        if x.shape[2] % patch or x.shape[3] % patch:
            raise ValueError(f"MMDiT.forward: latent size {x.shape[2]}x{x.shape[3]} must be a multiple of {patch} "
                             "(image sides a multiple of 16)")
        return x.shape[2] // patch, x.shape[3] // patch

    def _positions(self, height: int, width: int, device: torch.device) -> Tensor:
        """The position window [1, h*w, hidden] for an h x w patch grid (spec §8.5 in training passes)."""
        training = torch.is_grad_enabled()
        rate = self.pos_emb_random_crop_rate
        random = training and rate > 0 and torch.rand(1, generator=self.pos_emb_generator).item() < rate
        if training and self.scaled_pos_embeds is not None:
            table, grid = self.scaled_pos_embeds.table(height, width, device, self.pos_embed.dtype)
        else:
            table, grid = self.pos_embed, self.params.pos_embed_max_size
        corner = window_corner(grid, height, width, random, self.pos_emb_generator)
        return crop_window(table, grid, corner, height, width)

    def _run_block(self, block: nn.Module, context: Tensor | None, x: Tensor, c: Tensor
                   ) -> tuple[Tensor | None, Tensor]:
        """Run one joint block, checkpointed when enabled and gradients are on.

        With CPU offload the token streams enter the checkpoint as CPU copies: the checkpoint keeps only those
        (the device originals are freed) and the recomputation moves them back. ``c`` is shared by every block.
        """
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return block(context, x, c)
        return checkpoint_block(block, context, x, c, streams=2 if self.cpu_offload_checkpointing else 0)
