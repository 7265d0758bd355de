"""Encoding captions with the loaded text encoders, the way sd-scripts does, long captions included.

CLIP sees at most 77 tokens (BOS + 75 + EOS). For ``max_token_length`` 150 or 225 sd-scripts tokenizes to
``max_token_length + 2`` tokens, cuts the 75-token middle into chunks, wraps each chunk as BOS + 75 + EOS, encodes
the chunks as one batch and rebuilds one sequence: the first BOS, the 75 inner positions of every chunk, the last
EOS (``library/strategy_base.py`` ``_get_input_ids``, ``library/strategy_sd.py``/``strategy_sdxl.py``). With 75 it is
a single chunk, which is exactly the plain 77-token encoding that diffusers does.

Which layer:

* SD1/SD2: ``hidden_states[-clip_skip]`` followed by the encoder's ``final_layer_norm``; clip_skip 1 is the last
  layer, i.e. ``last_hidden_state``. diffusers' ``encode_prompt(clip_skip=k)`` takes ``hidden_states[-(k + 1)]``,
  so its k is ours minus one (ours 1 = diffusers None, ours 2 = diffusers 1).
* SDXL: the penultimate hidden states of both encoders, without the final norm, concatenated on the feature axis
  (as SDXL was trained and as sd-scripts and diffusers do); **clip_skip is ignored**. The pooled embedding is
  encoder 2's projected EOS state of the first chunk.
* FLUX.1 and Chroma (``engine.models.flux.text``): T5-XXL's last hidden states padded to ``t5xxl_max_token_length``
  with the padding mask, and CLIP-L's pooled output (FLUX.1 only); clip_skip and max_token_length do not apply.
* SD3 / SD3.5 (``engine.models.sd3.text``): CLIP-L's and CLIP-G's penultimate states side by side, zero-padded to
  T5's width, followed on the sequence by T5's states; the pooled vector is both CLIPs' projected outputs.

Which of these a family uses is its ``FamilyInfo.text_encoding`` (``_ENCODERS`` below), never its name.

``weighted=True`` (``model.weighted_captions``) reads sd-scripts' prompt weights in the captions of the CLIP families
(``engine.models.weighted_prompt``): ``(word:1.5)`` scales the outputs at that word's positions; FLUX and SD3 refuse
it, as sd-scripts does not weight their captions.

Grad mode is the caller's: caching wraps this in ``torch.no_grad()``; a trainer may backpropagate through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from engine.config.sections_model import ModelSection
    from engine.models.text_encoders import LoadedTextEncoders

from engine.models.encoded_text import EncodedText
from engine.models.families import family_info

__all__ = ["CHUNK_TOKENS", "MAX_TOKEN_LENGTHS", "encode_captions", "encoding_options", "tokenize_chunks"]

CHUNK_TOKENS = 75  # caption tokens per CLIP pass: 77 positions minus BOS and EOS
MAX_TOKEN_LENGTHS = (75, 150, 225)


_DEFAULT_T5_LENGTH = 512


def encoding_options(model_section: ModelSection, variant: str = "") -> dict[str, Any]:
    """The keyword arguments of :func:`encode_captions` for a config's ``model`` section and the loaded variant
    (the T5 length left unset is sd-scripts' per variant: 256 for schnell, else 512)."""
    from engine.config.sections_model import t5xxl_token_length

    return {"clip_skip": model_section.clip_skip, "max_token_length": model_section.max_token_length,
            "t5xxl_max_token_length": t5xxl_token_length(model_section.t5xxl_max_token_length, variant),
            "apply_t5_attn_mask": model_section.apply_t5_attn_mask,
            "apply_lg_attn_mask": model_section.apply_lg_attn_mask, "weighted": model_section.weighted_captions}


def encode_captions(loaded: LoadedTextEncoders, captions: list[str], *, clip_skip: int = 1,
                    max_token_length: int = 75, t5xxl_max_token_length: int = _DEFAULT_T5_LENGTH,
                    apply_t5_attn_mask: bool = False, apply_lg_attn_mask: bool = False,
                    weighted: bool = False) -> EncodedText:
    """Encode ``captions`` as sd-scripts does for training (see the module docstring).

    Args:
        loaded: from ``engine.models.text_encoders.load_text_encoders``.
        captions: the processed captions, one per image.
        clip_skip: 1 = the last layer, 2 = the one before, ... (SD1/SD2); ignored for SDXL and FLUX.
        max_token_length: 75, 150 or 225 caption tokens; longer captions are truncated (CLIP families).
        t5xxl_max_token_length: T5's padded length (FLUX families); see :func:`encoding_options` for the default.
        apply_t5_attn_mask: pass the padding mask to T5's attention (FLUX families, SD3).
        apply_lg_attn_mask: pass the padding mask to both CLIPs' attention (SD3).
        weighted: read prompt weights in the captions (CLIP families only; see the module docstring).

    Returns:
        Hidden states [B, max_token_length + 2, D] and, for SDXL, pooled embeddings.

    Raises:
        ValueError: an unsupported max_token_length, a clip_skip outside 1..number of layers, or weighted captions
            for a family with T5.
    """
    kind = family_info(loaded.family).text_encoding
    if kind in _T5_ENCODERS:
        if weighted:
            raise ValueError(f"weighted captions are read for SD1.x, SD2.x and SDXL only, not {loaded.family}; set "
                             "model.weighted_captions = false")
        return _T5_ENCODERS[kind](loaded, captions, t5xxl_max_token_length, apply_t5_attn_mask, apply_lg_attn_mask)
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, not {max_token_length}")
    return _ENCODERS[kind](loaded, captions, clip_skip, max_token_length, weighted)


def _encode_flux(loaded: LoadedTextEncoders, captions: list[str], t5_length: int, t5_mask: bool,
                 lg_mask: bool) -> EncodedText:
    from engine.models.flux.text import encode_flux

    return encode_flux(loaded, captions, max_length=t5_length, apply_mask=t5_mask)


def _encode_sd3(loaded: LoadedTextEncoders, captions: list[str], t5_length: int, t5_mask: bool,
                lg_mask: bool) -> EncodedText:
    from engine.models.sd3.text import encode_sd3

    return encode_sd3(loaded, captions, t5_max_length=t5_length, apply_lg_mask=lg_mask, apply_t5_mask=t5_mask)


# The families with T5 (FLUX.1/Chroma, SD3), by FamilyInfo.text_encoding: (loaded, captions, T5 length, T5 mask,
# CLIP-L/G mask); clip_skip and max_token_length do not apply to them.
_T5_ENCODERS = {"flux": _encode_flux, "sd3": _encode_sd3}


def _encode_sd(loaded: LoadedTextEncoders, captions: list[str], clip_skip: int, max_token_length: int,
               weighted: bool = False) -> EncodedText:
    tokenizer, encoder = loaded.tokenizers[0], loaded.encoders[0]
    layers = encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be between 1 and {layers} (the text encoder's layers), not {clip_skip}")
    chunks, weights = _tokenized(tokenizer, captions, max_token_length, weighted)
    output = encoder(_flat(chunks, encoder), output_hidden_states=True)
    states = _join_chunks(_final_norm(encoder)(output.hidden_states[-clip_skip]), chunks.shape[1])
    return EncodedText(_weigh(states, weights), None)


def tokenize_chunks(tokenizer: Any, captions: list[str], max_token_length: int) -> torch.Tensor:
    """Token ids [B, n, 77] of ``captions``: n = max_token_length / 75 chunks, each BOS + 75 tokens + EOS/pad."""
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=max_token_length + 2,
                    return_tensors="pt").input_ids
    return _chunked(tokenizer, ids, max_token_length)


def _tokenized(tokenizer: Any, captions: list[str], max_token_length: int,
               weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked ids [B, n, 77] and, with ``weighted``, the token weights [B, max_token_length + 2] (else None)."""
    if not weighted:
        return tokenize_chunks(tokenizer, captions, max_token_length), None
    from engine.models.weighted_prompt import tokenize_weighted

    ids, weights = tokenize_weighted(tokenizer, captions, max_token_length)
    return _chunked(tokenizer, ids, max_token_length), weights


def _weigh(states: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Joined states scaled by their token weights; unchanged without weights. The joined layout (first BOS, the
    inner positions, last EOS) lines up position for position with the unchunked ids the weights belong to."""
    if weights is None:
        return states
    from engine.models.weighted_prompt import apply_token_weights

    return apply_token_weights(states, weights)


def _chunked(tokenizer: Any, ids: torch.Tensor, max_token_length: int) -> torch.Tensor:
    """Ids [B, max_token_length + 2] → [B, n, 77]: each 75-token slice wrapped in the sequence's BOS and last token."""
    import torch

    count = max_token_length // CHUNK_TOKENS
    chunks = torch.stack([torch.cat([ids[:, :1], ids[:, 1 + k * CHUNK_TOKENS: 1 + (k + 1) * CHUNK_TOKENS],
                                     ids[:, -1:]], dim=1) for k in range(count)], dim=1)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        _fix_open_clip_chunks(chunks, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return chunks


def _fix_open_clip_chunks(chunks: torch.Tensor, eos: int, pad: int) -> None:
    """sd-scripts' EOS fix-up for tokenizers that pad with a token other than EOS (SD2's and SDXL's OpenCLIP).

    Each chunk's last position is the whole sequence's last token (EOS or pad), so a chunk cut out of the middle of a
    long caption would end in pad right after text, and a chunk past the text would be BOS + pads with no EOS.
    CLIP models were trained on BOS ... EOS pad ..., so sd-scripts puts an EOS in both places.
    """
    import torch

    last_real = chunks[..., -2]
    ends_in_text = (last_real != eos) & (last_real != pad)
    chunks[..., -1] = torch.where(ends_in_text, eos, chunks[..., -1])
    chunks[..., 1] = torch.where(chunks[..., 1] == pad, eos, chunks[..., 1])


def _flat(chunks: torch.Tensor, encoder: Any) -> torch.Tensor:
    """[B, n, 77] → [B·n, 77] on the encoder's device: every chunk of every caption in one forward pass."""
    from engine.transfer import to_device

    return to_device(chunks.reshape(-1, chunks.shape[-1]), encoder.device)


def _join_chunks(states: torch.Tensor, count: int) -> torch.Tensor:
    """[B·n, 77, D] → [B, n·75 + 2, D]: the first BOS, each chunk's 75 inner positions, the last chunk's EOS."""
    import torch

    states = states.reshape(-1, count, *states.shape[1:])
    inner = states[:, :, 1:-1].reshape(states.shape[0], count * CHUNK_TOKENS, states.shape[-1])
    return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)


def _final_norm(encoder: Any) -> Any:
    # transformers ≥ 5.6 flattened CLIPTextModel (no .text_model); CLIPTextModelWithProjection still wraps it.
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _encode_sdxl(loaded: LoadedTextEncoders, captions: list[str], clip_skip: int,
                 max_token_length: int, weighted: bool = False) -> EncodedText:
    import torch

    states, pooled = [], None
    for tokenizer, encoder in zip(loaded.tokenizers, loaded.encoders, strict=True):
        chunks, weights = _tokenized(tokenizer, captions, max_token_length, weighted)
        ids = _flat(chunks, encoder)
        output = encoder(ids, output_hidden_states=True)
        # SDXL conditions on the penultimate layer of both encoders, without the final norm; weights scale both
        # encoders' states (each with its own tokenizer's ids), never the pooled embedding (as sd-scripts).
        states.append(_weigh(_join_chunks(output.hidden_states[-2], chunks.shape[1]), weights))
        if hasattr(encoder, "text_projection"):
            # The first chunk's pooled embedding stands for the caption (sd-scripts: pool2[::n]).
            pooled = _pooled(encoder, output.last_hidden_state, ids, tokenizer.eos_token_id)[:: chunks.shape[1]]
    return EncodedText(torch.cat(states, dim=-1), pooled)


def _pooled(encoder: Any, last_hidden_state: torch.Tensor, ids: torch.Tensor, eos: int) -> torch.Tensor:
    """The projected state at each sequence's first EOS (sd-scripts' ``_pool_workaround``).

    transformers finds the EOS by the highest token id when the config has the legacy ``eos_token_id`` 2 (real
    SDXL's encoder 2 does), which picks an added token (Textual Inversion) instead of EOS; the first EOS is what
    the model was trained on, and for configs with the right EOS id it equals transformers' ``text_embeds``.
    """
    import torch

    first_eos = (ids == eos).int().argmax(dim=1)
    states = last_hidden_state[torch.arange(ids.shape[0], device=ids.device), first_eos]
    return encoder.text_projection(states.to(encoder.text_projection.weight.dtype)).to(last_hidden_state.dtype)


_ENCODERS = {"sd": _encode_sd, "sdxl": _encode_sdxl}
