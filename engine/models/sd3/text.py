"""Caption encoding for SD3 / SD3.5, as sd-scripts' ``Sd3TextEncodingStrategy`` and diffusers'
``StableDiffusion3Pipeline.encode_prompt`` do (spec §8.3).

* CLIP-L and CLIP-G: tokens padded/truncated to 77; ``hidden_states[-2]`` (penultimate layer, no final norm) and
  ``text_embeds`` (the projected pooled output at the EOS, as ``CLIPTextModelWithProjection`` computes it). Their
  padding masks go into their attention only with ``apply_lg_mask`` (``model.apply_lg_attn_mask``).
* T5-XXL: tokens padded/truncated to ``t5_max_length`` (``t5xxl_max_token_length``, 256 by default);
  ``last_hidden_state``; the mask goes into its attention only with ``apply_t5_mask``.
* context = [cat(CLIP-L, CLIP-G) on features, zero-padded to T5's width ; T5] on the sequence → [B, 77 + L, 4096];
  pooled = cat(CLIP-L, CLIP-G pooled) → [B, 2048]. The MMDiT never sees a mask, so none is returned.

:func:`drop_text_outputs` is the per-sample caption dropout of each encoder (``clip_l_dropout_rate`` ...): it zeroes
that encoder's part of context and pooled, with draws from per-sample generators, so that a resumed run draws the
same; the text-encoder cache stores the outputs without dropout and it is applied every step.

``loaded.encoders`` is ``[CLIP-L, CLIP-G, T5]`` (``engine.models.sd3.text_encoders``). Grad mode is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.models.encoded_text import EncodedText

if TYPE_CHECKING:
    import torch

    from engine.models.text_encoders import LoadedTextEncoders

__all__ = ["CLIP_TOKENS", "DEFAULT_T5_LENGTH", "SD3TextLayout", "drop_text_outputs", "encode_sd3", "text_layout"]

CLIP_TOKENS = 77
DEFAULT_T5_LENGTH = 256  # sd-scripts' t5xxl_max_token_length for SD3


@dataclass(frozen=True)
class SD3TextLayout:
    """Where each encoder's output sits in :func:`encode_sd3`'s result.

    context[:, :clip_tokens, :l_width] is CLIP-L's, [..., l_width : l_width + g_width] CLIP-G's (the rest of those
    tokens is zero padding), context[:, clip_tokens:] is T5's; pooled[:, :l_pooled] is CLIP-L's, the rest CLIP-G's.
    """

    clip_tokens: int
    l_width: int
    g_width: int
    l_pooled: int
    g_pooled: int


def text_layout(loaded: LoadedTextEncoders) -> SD3TextLayout:
    """The layout of ``loaded``'s outputs, from its CLIP encoders' sizes."""
    clip_l, clip_g = loaded.encoders[0], loaded.encoders[1]
    return SD3TextLayout(CLIP_TOKENS, clip_l.config.hidden_size, clip_g.config.hidden_size,
                         clip_l.text_projection.out_features, clip_g.text_projection.out_features)


def encode_sd3(loaded: LoadedTextEncoders, captions: list[str], *, t5_max_length: int = DEFAULT_T5_LENGTH,
               apply_lg_mask: bool = False, apply_t5_mask: bool = False) -> EncodedText:
    """Encode ``captions`` for the MMDiT.

    Args:
        loaded: the model's tokenizers and encoders, [CLIP-L, CLIP-G, T5].
        captions: one caption per image.
        t5_max_length: T5's padded length.
        apply_lg_mask: pass the CLIP padding masks to the CLIP encoders' attention.
        apply_t5_mask: pass T5's padding mask to its attention.

    Returns:
        ``hidden_states`` (the context) [B, 77 + t5_max_length, T5 width], ``pooled`` [B, l_proj + g_proj] and
        ``mask`` None, on T5's device and dtype.
    """
    import torch

    from engine.transfer import to_device  # token ids without a host wait on a GPU

    if t5_max_length < 1:
        raise ValueError(f"model.t5xxl_max_token_length must be at least 1, not {t5_max_length}; set it between 1 "
                         "and 512, or leave it empty for SD3's 256")
    states, pooled = [], []
    for tokenizer, encoder in zip(loaded.tokenizers[:2], loaded.encoders[:2], strict=True):
        tokens = tokenizer(captions, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                           return_tensors="pt")
        mask = to_device(tokens.attention_mask, encoder.device) if apply_lg_mask else None
        output = encoder(to_device(tokens.input_ids, encoder.device), attention_mask=mask, output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled.append(output.text_embeds)
    tokenizer, t5 = loaded.tokenizers[2], loaded.encoders[2]
    tokens = tokenizer(captions, padding="max_length", max_length=t5_max_length, truncation=True, return_tensors="pt")
    mask = to_device(tokens.attention_mask, t5.device) if apply_t5_mask else None
    t5_out = t5(to_device(tokens.input_ids, t5.device), attention_mask=mask).last_hidden_state
    lg = torch.cat(states, dim=-1).to(t5_out)
    lg = torch.nn.functional.pad(lg, (0, t5_out.shape[-1] - lg.shape[-1]))
    return EncodedText(hidden_states=torch.cat([lg, t5_out], dim=-2), pooled=torch.cat(pooled, dim=-1).to(t5_out),
                       mask=None)


def drop_text_outputs(encoded: EncodedText, layout: SD3TextLayout, rates: tuple[float, float, float],
                      generators: list[torch.Generator]) -> EncodedText:
    """Zero each sample's CLIP-L, CLIP-G and T5 parts with probabilities ``rates`` (spec §8.3).

    Args:
        encoded: :func:`encode_sd3`'s output (fresh or from the cache); not modified.
        layout: where each encoder's part is (:func:`text_layout`).
        rates: (``clip_l_dropout_rate``, ``clip_g_dropout_rate``, ``t5_dropout_rate``).
        generators: one CPU generator per sample; each gives three uniform draws (CLIP-L, CLIP-G, T5), in that
            order, whatever the rates, so a sample's draws do not depend on the other encoders' rates. None are drawn
            when every rate is 0.

    Returns:
        ``encoded`` itself when every rate is 0, else a new ``EncodedText`` (the zeroing is a multiplication, so
        gradients flow through the kept parts).
    """
    import torch

    if not any(rate > 0 for rate in rates):
        return encoded
    context, pooled = encoded.hidden_states, encoded.pooled
    if len(generators) != context.shape[0]:
        raise ValueError(f"drop_text_outputs: {len(generators)} generators for a batch of {context.shape[0]}")
    draws = torch.stack([torch.rand(3, generator=generator) for generator in generators])
    keep = (draws >= torch.tensor(rates, dtype=draws.dtype)).to(device=context.device, dtype=context.dtype)  # [B, 3]
    context_keep = torch.ones(context.shape[0], context.shape[1], context.shape[2], device=context.device,
                              dtype=context.dtype)
    tokens, l_end = layout.clip_tokens, layout.l_width
    context_keep[:, :tokens, :l_end] *= keep[:, 0, None, None]
    context_keep[:, :tokens, l_end:l_end + layout.g_width] *= keep[:, 1, None, None]
    context_keep[:, tokens:] *= keep[:, 2, None, None]
    new_pooled = None
    if pooled is not None:
        pooled_keep = torch.cat([keep[:, :1].expand(-1, layout.l_pooled), keep[:, 1:2].expand(-1, layout.g_pooled)],
                                dim=1).to(pooled)
        new_pooled = pooled * pooled_keep
    return EncodedText(hidden_states=context * context_keep, pooled=new_pooled, mask=encoded.mask)
