"""Caption encoding for FLUX.1 and Chroma, as sd-scripts' ``FluxTextEncodingStrategy`` does (spec §3.1-3.4).

* CLIP-L (FLUX.1 only): tokens padded/truncated to 77, **no attention mask**; the pooled vector is
  ``pooler_output`` (final layer norm at the EOS), without the text projection.
* T5-XXL: tokens padded/truncated to ``max_length`` (``t5xxl_max_token_length``: 512 dev/Chroma, 256 schnell);
  ``last_hidden_state``. The padding mask is passed to T5's attention only with ``apply_mask``
  (``apply_t5_attn_mask``), and returned either way: the transformer may mask its attention with it and the
  text-encoder cache stores it.

``loaded.encoders`` is ``[CLIPTextModel, T5EncoderModel]`` for FLUX.1 and ``[T5EncoderModel]`` for Chroma (the
order of ``LoadedTextEncoders``), so the CLIP part runs when there are two encoders. Grad mode is the caller's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.models.encoded_text import EncodedText

if TYPE_CHECKING:
    from engine.models.text_encoders import LoadedTextEncoders

__all__ = ["CLIP_LENGTH", "encode_flux"]

CLIP_LENGTH = 77


def encode_flux(loaded: LoadedTextEncoders, captions: list[str], *, max_length: int,
                apply_mask: bool) -> EncodedText:
    """Encode ``captions`` for the FLUX transformer.

    Args:
        loaded: the model's tokenizers and encoders (FLUX.1: CLIP-L and T5; Chroma: T5).
        captions: one caption per image.
        max_length: T5's padded length.
        apply_mask: pass T5's padding mask to its attention.

    Returns:
        ``hidden_states`` T5 [B, max_length, d_model], ``pooled`` CLIP-L [B, 768] (None for Chroma), ``mask``
        [B, max_length] bool, True at real tokens (the EOS included), on T5's device.
    """
    from engine.transfer import to_device  # token ids without a host wait on a GPU

    if max_length < 1:
        raise ValueError(f"t5xxl_max_token_length must be at least 1, not {max_length}")
    pooled = None
    if len(loaded.encoders) == 2:
        tokenizer, clip = loaded.tokenizers[0], loaded.encoders[0]
        ids = tokenizer(captions, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        pooled = clip(to_device(ids, clip.device)).pooler_output
    tokenizer, t5 = loaded.tokenizers[-1], loaded.encoders[-1]
    tokens = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = to_device(tokens.input_ids, t5.device), to_device(tokens.attention_mask, t5.device)
    hidden = t5(ids, attention_mask=mask if apply_mask else None).last_hidden_state
    return EncodedText(hidden_states=hidden, pooled=pooled, mask=mask.bool())
