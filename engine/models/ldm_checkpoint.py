"""Whole-checkpoint assembly (diffusers pipeline → one LDM state dict), saving, and model-family detection.

Our own single files also carry the diffusers configs of their components, as JSON in the safetensors metadata
(:data:`EMBEDDED_CONFIGS_KEY`): loading them back then needs no guess about the model's shape (a fine-tuned model
with other sizes, or the tiny test models), and the scheduler's ``prediction_type`` survives the trip.
"""

from __future__ import annotations

import json
import struct
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

__all__ = [
    "EMBEDDED_CONFIGS_KEY",
    "FAMILIES",
    "TEXT_ENCODER_LAYOUTS",
    "detect_family",
    "pipeline_configs",
    "pipeline_to_ldm",
    "save_ldm_checkpoint",
]

FAMILIES = ("sd1", "sd2", "sdxl")

# The safetensors metadata key under which save_ldm_checkpoint stores the components' diffusers configs (JSON).
EMBEDDED_CONFIGS_KEY = "atelier.diffusers_configs"

# SDXL's second text encoder; any layout of it (OpenCLIP or HF) lives under this prefix.
_SDXL_MARKER = "conditioner.embedders.1."
# SDXL's size/crop micro-conditioning MLP: lets a UNet-only SDXL file be recognised too.
_SDXL_UNET_MARKER = "model.diffusion_model.label_emb.0.0.weight"

# The text encoders of each family and how the single file lays them out: (component, layout, key prefix).
# "clip" is a Hugging Face CLIPTextModel under a prefix; "open_clip" is OpenCLIP's naming with fused q/k/v.
TEXT_ENCODER_LAYOUTS: dict[str, list[tuple[str, str, str]]] = {
    "sd1": [("text_encoder", "clip", SD1_TEXT_PREFIX)],
    "sd2": [("text_encoder", "open_clip", SD2_TEXT_PREFIX)],
    "sdxl": [("text_encoder", "clip", SDXL_TEXT1_PREFIX), ("text_encoder_2", "open_clip", SDXL_TEXT2_PREFIX)],
}
_TEXT_CONVERTERS = {"clip": clip_to_ldm, "open_clip": open_clip_to_ldm}
# Components whose configs save_ldm_checkpoint embeds, when present.
_CONFIG_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")


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
    for name, layout, prefix in TEXT_ENCODER_LAYOUTS[family]:
        checkpoint.update(_TEXT_CONVERTERS[layout](_require(components, name, family).state_dict(), prefix))
    return checkpoint


def pipeline_configs(pipe_or_components: Any) -> dict[str, dict[str, Any]]:
    """The diffusers/transformers configs of a pipeline's UNet, VAE, text encoders and scheduler, as JSON-able dicts.

    This is what :func:`save_ldm_checkpoint` embeds (``configs=``). Local paths (``_name_or_path``) are left out.
    """
    components = _components(pipe_or_components)
    return {name: _config_json(components[name]) for name in _CONFIG_COMPONENTS if components.get(name) is not None}


def _config_json(module: Any) -> dict[str, Any]:
    # diffusers models and schedulers serialise themselves; transformers models through their config.
    if hasattr(module, "to_json_string"):
        text = module.to_json_string()
    else:
        text = module.config.to_json_string(use_diff=False)
    return {key: value for key, value in json.loads(text).items() if key != "_name_or_path"}


def save_ldm_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    *,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint as safetensors with ``{"format": "pt"}`` metadata (what SD tools look for).

    safetensors refuses non-contiguous tensors and tensors sharing storage (tied weights, views made by the
    converter), so such tensors are copied; everything else is written as-is.

    Args:
        state_dict: the tensors to write.
        path: destination ``.safetensors`` file; parent folders are created.
        metadata: extra string metadata merged over ``{"format": "pt"}``.
        configs: the components' diffusers configs (:func:`pipeline_configs`), stored as JSON under
            :data:`EMBEDDED_CONFIGS_KEY` so that loading the file uses them instead of inferring them.

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
    embedded = {EMBEDDED_CONFIGS_KEY: json.dumps(dict(configs), sort_keys=True)} if configs else {}
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {}), **embedded})
    _sort_header_metadata(path)
    return path


def _sort_header_metadata(path: Path) -> None:
    """Put the header's metadata in key order, so that the same tensors and metadata always give the same bytes.

    safetensors writes metadata from a Rust HashMap, whose order changes from one process to the next. The header is
    rewritten in place at the same length (padded with spaces, as safetensors pads it), so no tensor data moves.
    """
    with path.open("r+b") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:
            handle.seek(8)
            handle.write(text.ljust(size, b" "))


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


def cpu_cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU tensor, floats in `dtype` (None keeps it; integer buffers such as position ids keep theirs).

    A tensor that must move or change type becomes a new one, so a module's own weights are never touched.
    """
    tensor = tensor.detach()
    if dtype is None or not tensor.is_floating_point():
        return tensor.to("cpu")
    return tensor.to("cpu", dtype)


def ldm_state(components: Any, family: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the LDM layout, on the CPU, floats in `dtype` (see :func:`cpu_cast`)."""
    return {key: cpu_cast(tensor, dtype) for key, tensor in pipeline_to_ldm(components, family).items()}


def write_pipeline_checkpoint(components: Any, family: str, path: str | Path, metadata: Mapping[str, str],
                              *, dtype: torch.dtype | None = None,
                              configs: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """A pipeline as one LDM-layout .safetensors file with its configs embedded, written atomically.

    `configs` defaults to :func:`pipeline_configs` of the components; what load_model needs to read the file back
    exactly (non-standard sizes, a v-prediction scheduler) travels with it.
    """
    from engine.files import atomic_output

    state = ldm_state(components, family, dtype)
    with atomic_output(path) as temporary:
        save_ldm_checkpoint(state, temporary, metadata,
                            configs=pipeline_configs(components) if configs is None else configs)
    return Path(path)
