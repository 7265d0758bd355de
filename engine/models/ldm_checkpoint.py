"""Whole-checkpoint assembly (diffusers pipeline → one LDM state dict), saving, and model-family detection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from engine.models.ldm_keys import unet_to_ldm, vae_to_ldm
from engine.models.ldm_text import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_TEXT1_PREFIX,
    SDXL_TEXT2_PREFIX,
    clip_to_ldm,
    open_clip_to_ldm,
)

__all__ = ["FAMILIES", "detect_family", "pipeline_to_ldm", "save_ldm_checkpoint"]

FAMILIES = ("sd1", "sd2", "sdxl")

# SDXL's second text encoder; any layout of it (OpenCLIP or HF) lives under this prefix.
_SDXL_MARKER = "conditioner.embedders.1."
# SDXL's size/crop micro-conditioning MLP: lets a UNet-only SDXL file be recognised too.
_SDXL_UNET_MARKER = "model.diffusion_model.label_emb.0.0.weight"

# Which components each family needs, and how its text encoders are laid out in the single file.
_TEXT_ENCODERS = {
    "sd1": [("text_encoder", clip_to_ldm, SD1_TEXT_PREFIX)],
    "sd2": [("text_encoder", open_clip_to_ldm, SD2_TEXT_PREFIX)],
    "sdxl": [
        ("text_encoder", clip_to_ldm, SDXL_TEXT1_PREFIX),
        ("text_encoder_2", open_clip_to_ldm, SDXL_TEXT2_PREFIX),
    ],
}


def _components(pipe_or_components: Any) -> Mapping[str, Any]:
    """Accept a diffusers pipeline (``.components``) or a plain ``{"unet": …, "vae": …}`` mapping."""
    components = getattr(pipe_or_components, "components", pipe_or_components)
    if not isinstance(components, Mapping):
        raise TypeError(f"expected a diffusers pipeline or a mapping of components, got {type(pipe_or_components)}")
    return components


def _require(components: Mapping[str, Any], name: str, family: str) -> Any:
    module = components.get(name)
    if module is None:
        raise ValueError(f"pipeline_to_ldm: family {family!r} needs a {name!r} component")
    return module


def pipeline_to_ldm(pipe_or_components: Any, family: str) -> dict[str, torch.Tensor]:
    """Assemble an original-layout ("single-file") checkpoint from diffusers components.

    Args:
        pipe_or_components: a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` or a mapping with
            ``unet``, ``vae``, ``text_encoder`` (and ``text_encoder_2`` for SDXL) modules.
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``; it decides the text-encoder layout.

    Returns:
        A state dict with ``model.diffusion_model.*``, ``first_stage_model.*`` and the family's text-encoder keys.
        Tensors are shared with the modules; :func:`save_ldm_checkpoint` makes them safe to write.

    Raises:
        ValueError: unknown family or missing component.
    """
    if family not in FAMILIES:
        raise ValueError(f"pipeline_to_ldm: unknown family {family!r}; expected one of {FAMILIES}")
    components = _components(pipe_or_components)
    unet = _require(components, "unet", family)
    checkpoint = unet_to_ldm(unet.state_dict(), unet.config)
    checkpoint.update(vae_to_ldm(_require(components, "vae", family).state_dict()))
    for name, convert, prefix in _TEXT_ENCODERS[family]:
        checkpoint.update(convert(_require(components, name, family).state_dict(), prefix))
    return checkpoint


def save_ldm_checkpoint(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a checkpoint as safetensors with ``{"format": "pt"}`` metadata (what SD tools look for).

    safetensors refuses non-contiguous tensors and tensors sharing storage (tied weights, views made by the
    converter), so such tensors are copied; everything else is written as-is.

    Args:
        state_dict: the tensors to write.
        path: destination ``.safetensors`` file; parent folders are created.
        metadata: extra string metadata merged over ``{"format": "pt"}``.

    Returns:
        The path written.
    """
    import torch  # Deferred, as in ldm_text: importing engine.models must stay cheap.
    from safetensors.torch import save_file

    seen_storages: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def detect_family(state_dict_keys: Iterable[str]) -> str:
    """Tell SD1.x, SD2.x and SDXL checkpoints apart by their key names alone (no tensor needs to be read).

    SDXL has a second text encoder under ``conditioner.embedders.1.`` (or, for a UNet-only file, the
    ``label_emb`` micro-conditioning MLP); SD2 stores its OpenCLIP encoder under ``cond_stage_model.model.``;
    SD1 stores a Hugging Face CLIP model under ``cond_stage_model.transformer.``.

    Args:
        state_dict_keys: the keys of an LDM-layout checkpoint (e.g. ``safe_open(...).keys()``).

    Returns:
        ``"sd1"``, ``"sd2"`` or ``"sdxl"``.

    Raises:
        ValueError: none of the markers is present; the message lists the top-level prefixes that were seen.
    """
    keys = list(state_dict_keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has(_SDXL_MARKER) or _SDXL_UNET_MARKER in keys:
        return "sdxl"
    if has(SD2_TEXT_PREFIX):
        return "sd2"
    if has(SD1_TEXT_PREFIX):
        return "sd1"
    seen = sorted({".".join(key.split(".")[:2]) for key in keys})
    raise ValueError(
        "detect_family: not an SD1/SD2/SDXL checkpoint (expected keys under 'conditioner.embedders.1.', "
        f"'cond_stage_model.model.' or 'cond_stage_model.transformer.'); saw {len(keys)} keys with prefixes "
        f"{seen[:12]}{' …' if len(seen) > 12 else ''}"
    )
