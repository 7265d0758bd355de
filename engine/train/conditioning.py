"""The denoiser's conditioning for one micro-batch: cached text-encoder outputs or fresh encodings, as keyword
arguments of the family's denoiser.

Which keywords is the family's ``FamilyInfo.text_encoding`` (``BUILDERS`` below): the UNet takes
``encoder_hidden_states`` (plus SDXL's pooled embedding and size ids in ``added_cond_kwargs``); the FLUX
transformer takes ``txt`` (T5), ``y`` (CLIP-L pooled; None for Chroma) and ``txt_mask`` (only with
``model.apply_t5_attn_mask``, spec FLUX §3.4); SD3's MMDiT takes ``context`` and ``y``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from engine.models.families import family_info
from engine.transfer import to_device

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.encoded_text import EncodedText
    from engine.train.setup import Session

__all__ = ["BUILDERS", "batch_conditioning", "check_text_options", "encoded_batch"]

# FamilyInfo.text_encoding kinds that read prompt weights in captions (sd-scripts' --weighted_captions): the CLIP-only
# families. FLUX and SD3 are refused by the config rules when their family is set, and here when it was detected.
WEIGHTED_ENCODINGS = ("sd", "sdxl")


def check_text_options(config: RunConfig, family: str) -> None:
    """Refuse, before any caching, a text option the loaded model's family does not have.

    Raises:
        RunInputError: model.weighted_captions for a FLUX or SD3 model (found by model_family = 'auto').
    """
    from engine.train.setup import RunInputError

    if config.model.weighted_captions and family_info(family).text_encoding not in WEIGHTED_ENCODINGS:
        raise RunInputError(f"the base model is {family}, whose captions are not weighted (sd-scripts weights "
                            "captions for SD1.x, SD2.x and SDXL only)", "set model.weighted_captions = false",
                            "model.weighted_captions")


def encoded_batch(session: Session, batch: dict[str, Any]) -> EncodedText:
    """The batch's text-encoder outputs: from the cache when the batch carries them, else encoded now."""
    from engine.models.encoded_text import EncodedText
    from engine.models.text_encoding import encode_captions, encoding_options

    if "hidden_states" in batch:
        return EncodedText(batch["hidden_states"], batch.get("pooled"), batch.get("text_mask"))
    prepare = getattr(session.method, "prepare_captions", None)
    captions = prepare(batch["caption"]) if prepare is not None else batch["caption"]
    options = encoding_options(session.config.model, session.model.scheduler_config.get("variant", ""))
    # Asked every step: DreamBooth stops training the text encoder part-way through a run.
    trains_text = any(session.method.trains_text_encoders)
    with torch.set_grad_enabled(trains_text), session.precision.autocast():
        return encode_captions(session.model.text, captions, **options)


def _unet(session: Session, batch: dict[str, Any], encoded: EncodedText) -> dict[str, Any]:
    return {"encoder_hidden_states": to_device(encoded.hidden_states, session.device, session.weight_dtype)}


def _unet_with_sizes(session: Session, batch: dict[str, Any], encoded: EncodedText) -> dict[str, Any]:
    """SDXL: the pooled embedding and the size ids (original size, crop top-left, target size) per image."""
    device, dtype = session.device, session.weight_dtype
    time_ids = [list(o) + list(c) + list(t) for o, c, t in
                zip(batch["original_size"], batch["crop_top_left"], batch["target_size"], strict=True)]
    conditioning = _unet(session, batch, encoded)
    conditioning["added_cond_kwargs"] = {"text_embeds": to_device(encoded.pooled, device, dtype),
                                         "time_ids": to_device(torch.tensor(time_ids, dtype=torch.float32), device,
                                                               dtype)}
    return conditioning


def _flux(session: Session, batch: dict[str, Any], encoded: EncodedText) -> dict[str, Any]:
    device, dtype = session.device, session.weight_dtype
    pooled = to_device(encoded.pooled, device, dtype) if encoded.pooled is not None else None
    mask = None
    if encoded.mask is not None and session.config.model.apply_t5_attn_mask:
        mask = to_device(encoded.mask, device, torch.bool)
    return {"txt": to_device(encoded.hidden_states, device, dtype), "y": pooled, "txt_mask": mask}


def _mmdit(session: Session, batch: dict[str, Any], encoded: EncodedText) -> dict[str, Any]:
    """SD3: ``context`` and ``y``, after the per-encoder caption dropout (engine.train.sd3_objective)."""
    from engine.train.sd3_objective import sd3_conditioning

    return sd3_conditioning(session, batch, encoded)


ConditioningBuilder = Callable[["Session", dict[str, Any], "EncodedText"], dict[str, Any]]
BUILDERS: dict[str, ConditioningBuilder] = {"sd": _unet, "sdxl": _unet_with_sizes, "flux": _flux, "sd3": _mmdit}


def batch_conditioning(session: Session, batch: dict[str, Any]) -> dict[str, Any]:
    """The denoiser's keyword arguments for ``batch``."""
    encoded = encoded_batch(session, batch)
    return BUILDERS[family_info(session.model.family).text_encoding](session, batch, encoded)
