"""Loading FLUX.1 (dev, schnell) and Chroma for training, offline (spec §1, issue 12).

The transformer comes from (``model.pretrained_model_name_or_path``):

* a BFL single file (``flux1-dev.safetensors``, ``.sft``, ``Chroma.safetensors``); a ``model.diffusion_model.``
  prefix (ComfyUI) is stripped per key, and keys of other components in an all-in-one file are ignored;
* a diffusers folder (``transformer/`` shards, converted to BFL naming by ``engine.models.flux.convert``), which
  also supplies the text encoders, tokenizers and AE it holds;
* a hub id already in the local Hugging Face cache (its snapshot folder; nothing is downloaded).

``model.clip_l``, ``model.t5xxl`` and ``model.ae`` (files or folders) override or supply the other components;
a single transformer file needs them. Chroma has no CLIP-L. ``float8_e4m3fn`` weights stay fp8 with ``fp8=True``
and are cast up to ``dtype`` otherwise; other fp8 kinds are refused (spec §1.7). The text encoders and the AE are
always loaded in ``dtype``.

Family, variant and sizes are read off key names and shapes, so pruned and tiny models load like real ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config.choices import FLUX_FAMILIES, family_label
from engine.models.families import family_info
from engine.models.flux.convert import BFL_CHROMA_KEY, diffusers_to_bfl, transformer_layout
from engine.models.flux.files import (
    TRANSFORMER_PREFIX,
    assemble_transformer,
    base_model_header,
    check_not_adapter,
    hub_snapshot,
    read_flux_header,
    transformer_shards,
)
from engine.models.loaded_model import LoadedModel
from engine.models.locations import looks_like_hub_id
from engine.models.single_file import FAMILY_LABELS, FileHeader, ModelLoadError

if TYPE_CHECKING:
    from engine.models.flux.params import FluxParams
    from engine.models.flux.transformer import Flux
    from engine.models.text_encoders import LoadedTextEncoders

__all__ = ["FLUX_FAMILIES", "FluxTransformerSource", "detect_flux_file", "load_flux_model", "load_flux_transformer"]

_LOCATION = "model.pretrained_model_name_or_path"
# Top-level module names of a transformer in either naming: keys outside them belong to other components.
_TRANSFORMER_ROOTS = frozenset({
    "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "double_blocks", "single_blocks", "final_layer",
    "distilled_guidance_layer", "x_embedder", "context_embedder", "time_text_embed", "transformer_blocks",
    "single_transformer_blocks", "norm_out", "proj_out",
})
_PIPELINES = {"FluxPipeline": "flux1", "FluxImg2ImgPipeline": "flux1", "ChromaPipeline": "chroma"}
# Published FlowMatchEulerDiscreteScheduler configs (spec §1.5; third-party copies, not checked against the hub),
# used when the model is a single file; a diffusers folder's own scheduler config wins.
_SCHEDULERS: dict[str, dict[str, Any]] = {
    "dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096},
    "schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                "use_dynamic_shifting": False},
}
_SCHEDULERS["chroma"] = dict(_SCHEDULERS["dev"])


@dataclass(frozen=True)
class FluxTransformerSource:
    """Where a transformer's tensors are: (file, key in the file) by prefix-free key, in ``layout`` naming."""

    tensors: dict[str, tuple[Path, str]]
    shapes: dict[str, tuple[int, ...]]
    layout: str  # "bfl" or "diffusers"
    where: Path  # the file or the transformer folder, for messages

    @property
    def family(self) -> str:
        return "chroma" if BFL_CHROMA_KEY in self.shapes else "flux1"


# --- entry points ------------------------------------------------------------------------------------------------


def detect_flux_file(path: str | Path) -> str | None:
    """The family of a FLUX model file, "flux1" or "chroma", from its header only; None when it holds no FLUX.1 or
    Chroma transformer. A folder is judged by its ``model_index.json`` or its ``transformer/`` shard headers.

    Raises:
        ModelLoadError: a missing, unsupported or unreadable file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _folder_family(path)
    header = base_model_header(path, _LOCATION)
    source = _file_source(header) if header is not None else None
    return source.family if source is not None else None


def load_flux_model(location: str | Path, *, family: str = "auto", clip_l: str | Path | None = None,
                    t5xxl: str | Path | None = None, ae: str | Path | None = None,
                    tokenizer_cache_dir: str | Path | None = None, dtype: Any = None, device: str = "cpu",
                    fp8: bool = False) -> LoadedModel:
    """Load a FLUX.1 or Chroma model for training.

    Args:
        location: ``model.pretrained_model_name_or_path``: a transformer file, a diffusers folder or a cached hub id.
        family: ``model.model_family``: "flux1", "chroma" or "auto".
        clip_l, t5xxl, ae: ``model.clip_l``, ``model.t5xxl``, ``model.ae`` (files or folders; "" or None: the
            diffusers folder's own).
        tokenizer_cache_dir: ``model.tokenizer_cache_dir`` (see ``engine.models.flux.tokenizers``).
        dtype: torch dtype of the transformer and text encoders (default float32); the AE is always float32; fp8
            transformer weights stay fp8 with ``fp8``.
        device: where to put the modules.
        fp8: keep a ``float8_e4m3fn`` transformer's weights as fp8 storage (``model.fp8_base``).

    Returns:
        ``LoadedModel`` with ``unet`` the BFL-layout ``Flux`` transformer (eval mode), ``vae`` the AE,
        ``text`` [CLIP-L, T5] (Chroma: [T5]) and ``scheduler_config["variant"]`` "dev", "schnell" or "chroma".

    Raises:
        ModelLoadError: anything that keeps the model from loading; the message names the file or config key.
    """
    import torch

    from engine.models.flux.ae import load_flux_ae

    dtype = dtype or torch.float32
    folder, source = _locate(str(location))
    resolved = _checked_family(source, family)
    transformer = load_flux_transformer(source, dtype=dtype, device=device, fp8=fp8)
    variant = _variant(transformer.params)
    text = _load_text(resolved, folder, transformer.params, clip_l, t5xxl, tokenizer_cache_dir, dtype, device)
    ae_location = ae or _component(folder, "vae", "model.ae", "the AE (ae.safetensors)")
    # The AE stays float32 (84 M parameters): latents are encoded from the weights their cache key names.
    vae = load_flux_ae(ae_location, family=resolved, dtype=torch.float32, device=device)
    scheduler = {**_scheduler_config(folder, variant), "variant": variant}
    model_file = source.where if source.where.is_file() else None
    return LoadedModel(resolved, transformer, vae, text, scheduler, str(location), model_file)


def load_flux_transformer(source: FluxTransformerSource, *, dtype: Any, device: str = "cpu",
                          fp8: bool = False) -> Flux:
    """The ``Flux`` module for ``source``, built on the meta device and filled with the file's tensors.

    Raises:
        ModelLoadError: the tensors do not form a whole transformer of the shape their keys describe.
    """
    from engine.models.flux.params import params_from_state_dict
    from engine.models.flux.transformer import Flux

    convert = diffusers_to_bfl if source.layout == "diffusers" else None
    return assemble_transformer(source.tensors, source.where, dtype=dtype, device=device, fp8=fp8, convert=convert,
                                params_from_shapes=params_from_state_dict, model_class=Flux, label="FLUX transformer")


# --- where the transformer is ---------------------------------------------------------------------------------------


def _locate(location: str) -> tuple[Path | None, FluxTransformerSource]:
    """(the diffusers folder or None, the transformer's tensors)."""
    if not location:
        raise ModelLoadError(f"no model given: set {_LOCATION} to a FLUX.1/Chroma .safetensors file, a diffusers "
                             "folder or a Hugging Face id in the local cache")
    path = Path(location).expanduser()
    if path.is_dir():
        return path, _folder_source(path)
    if path.is_file():
        header = read_flux_header(path, _LOCATION)
        source = _file_source(header)
        if source is None:
            raise ModelLoadError(_not_flux_message(header))
        return None, source
    if looks_like_hub_id(location):
        folder = hub_snapshot(location, _LOCATION, "FLUX", "its BFL .safetensors file")
        return folder, _folder_source(folder)
    raise ModelLoadError(f"model not found: {path} (no such file or folder); check {_LOCATION}")


def _transformer_keys(keys: Any) -> dict[str, str]:
    """Prefix-free transformer key → key in the file; the prefix is stripped per key, other components dropped."""
    found = {}
    for key in keys:
        name = key.removeprefix(TRANSFORMER_PREFIX)
        if name.split(".", 1)[0] in _TRANSFORMER_ROOTS:
            found[name] = key
    return found


def _file_source(header: FileHeader) -> FluxTransformerSource | None:
    check_not_adapter(header, _LOCATION)
    keys = _transformer_keys(header.shapes)
    # judged on every key: what tells an SD3 diffusers transformer from FLUX's is outside FLUX's roots
    layout = transformer_layout(key.removeprefix(TRANSFORMER_PREFIX) for key in header.shapes)
    if layout is None:
        return None
    tensors = {name: (header.path, key) for name, key in keys.items()}
    shapes = {name: header.shapes[key] for name, key in keys.items()}
    return FluxTransformerSource(tensors, shapes, layout, header.path)


def _folder_source(folder: Path) -> FluxTransformerSource:
    transformer, shards = transformer_shards(folder, _LOCATION, "FLUX.1/Chroma", "the BFL .safetensors file")
    tensors: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        header = read_flux_header(shard, _LOCATION)
        check_not_adapter(header, _LOCATION)
        for name, key in _transformer_keys(header.shapes).items():
            tensors[name], shapes[name] = (shard, key), header.shapes[key]
    layout = transformer_layout(shapes)
    if layout is None:
        raise ModelLoadError(f"{transformer}: the weights there are no FLUX.1/Chroma transformer")
    return FluxTransformerSource(tensors, shapes, layout, transformer)


def _folder_family(folder: Path) -> str | None:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        return _PIPELINES.get(index.get("_class_name"))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return _folder_source(folder).family
    except ModelLoadError:
        return None


def _not_flux_message(header: FileHeader) -> str:
    from engine.models.ldm_checkpoint import detect_family

    keys = set(header.shapes)
    try:
        sd_family = detect_family(keys)
    except ValueError:
        sd_family = None
    if sd_family is not None:
        return (f"{header.path}: this is an {FAMILY_LABELS[sd_family]} checkpoint, not a FLUX.1/Chroma model; set "
                f"model.model_family to {sd_family} (or auto), or point {_LOCATION} at a FLUX.1/Chroma file")
    if any(key.removeprefix(TRANSFORMER_PREFIX).startswith("joint_blocks.") for key in keys):
        return (f"{header.path}: this is an SD3/SD3.5 model, not a FLUX.1/Chroma one; set model.model_family to sd3 "
                f"(or auto), or point {_LOCATION} at a FLUX.1/Chroma file")
    if any(key.startswith(("encoder.down.", "decoder.up.")) for key in keys):
        return f"{header.path}: this is an AE/VAE file; put it in model.ae and set {_LOCATION} to the transformer"
    if any(key.startswith(("encoder.block.", "text_model.", "embeddings.token_embedding")) for key in keys):
        return (f"{header.path}: this is a text encoder file; put it in model.clip_l or model.t5xxl and set "
                f"{_LOCATION} to the transformer")
    return f"{header.path}: not a FLUX.1/Chroma transformer (no double_blocks.* or transformer_blocks.* keys)"


def _checked_family(source: FluxTransformerSource, wanted: str) -> str:
    detected = source.family
    if wanted in ("auto", "", None) or wanted == detected:
        return detected
    if wanted in FLUX_FAMILIES:
        raise ModelLoadError(f"{source.where}: this is a {family_label(detected)} model but model.model_family is "
                             f"{wanted}; set model.model_family to {detected} or auto")
    raise ModelLoadError(f"{source.where}: this is a FLUX.1/Chroma model but model.model_family is {wanted}; set "
                         f"model.model_family to {detected} or auto")


def _variant(params: FluxParams) -> str:
    if params.chroma:
        return "chroma"
    return "dev" if params.guidance_embed else "schnell"


# --- the other components ---------------------------------------------------------------------------------------


def _model_index(folder: Path | None) -> dict[str, Any]:
    if folder is None:
        return {}
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}


def _encoder_folders(folder: Path | None) -> dict[str, tuple[str, str]]:
    """{"clip": (encoder subfolder, tokenizer subfolder), "t5": (...)} as far as the diffusers folder has them.

    FLUX pipelines put CLIP-L in ``text_encoder/`` and T5 in ``text_encoder_2/``; Chroma's has T5 in
    ``text_encoder/``. ``model_index.json`` (or each subfolder's config) says which is which.
    """
    from engine.models.flux.text_encoders import read_config_class

    if folder is None:
        return {}
    index = _model_index(folder)
    found: dict[str, tuple[str, str]] = {}
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if not (folder / encoder).is_dir():
            continue
        entry = index.get(encoder)
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 else read_config_class(folder / encoder)
        if name and name.startswith("CLIPText"):
            found["clip"] = (encoder, tokenizer)
        elif name and name.startswith("T5"):
            found["t5"] = (encoder, tokenizer)
    return found


def _component(folder: Path | None, subfolder: str, key: str, label: str) -> Path:
    if folder is not None and (folder / subfolder).is_dir():
        return folder / subfolder
    where = f"{folder} has no {subfolder}/ folder" if folder is not None else "the model is a single file"
    raise ModelLoadError(f"{key} is not set and {where}: set {key} to {label}")


def _load_text(family: str, folder: Path | None, params: FluxParams, clip_l: Any, t5xxl: Any,
               tokenizer_cache_dir: Any, dtype: Any, device: str) -> LoadedTextEncoders:
    from engine.models.flux.text_encoders import load_clip_l, load_t5xxl
    from engine.models.flux.tokenizers import load_clip_tokenizer, load_t5_tokenizer
    from engine.models.text_encoders import ready_text_encoders

    subfolders = _encoder_folders(folder)
    t5_folder, t5_tokenizer = subfolders.get("t5", ("text_encoder_2", "tokenizer_2"))
    t5 = load_t5xxl(t5xxl or _component(folder, t5_folder, "model.t5xxl", "T5-XXL's file (t5xxl_fp16.safetensors)"))
    _check_width(t5.config.d_model, params.context_in_dim, t5xxl or folder, "model.t5xxl", "T5 width")
    tokenizers, encoders = [load_t5_tokenizer(folder, tokenizer_cache_dir, t5_tokenizer)], [t5]
    if "clip_l" in family_info(family).text_encoder_files:  # Chroma has no CLIP-L
        clip_folder, _ = subfolders.get("clip", ("text_encoder", "tokenizer"))
        clip = load_clip_l(clip_l or _component(folder, clip_folder, "model.clip_l",
                                                "CLIP-L's file (clip_l.safetensors); FLUX.1 needs it"))
        _check_width(clip.config.hidden_size, params.vec_in_dim, clip_l or folder, "model.clip_l", "CLIP-L width")
        tokenizers.insert(0, load_clip_tokenizer(folder if "clip" in subfolders else None))
        encoders.insert(0, clip)
    source = str(t5xxl or folder)
    return ready_text_encoders(family, tokenizers, encoders, source, dtype=dtype, device=device)


def _check_width(found: int, expected: int, where: Any, key: str, label: str) -> None:
    if found != expected:
        raise ModelLoadError(f"{where}: {label} {found} does not fit the transformer, which expects {expected}; "
                             f"check {key} (it must belong to the same model)")


def _scheduler_config(folder: Path | None, variant: str) -> dict[str, Any]:
    if folder is not None:
        try:
            return json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    return dict(_SCHEDULERS[variant])
