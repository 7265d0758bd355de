"""Loading a whole base model (UNet, VAE, text encoders, scheduler config) from what a user points at, offline.

Sources, told apart by what the location is:

* a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` ...);
* a single-file checkpoint (``.safetensors``/``.ckpt`` in the original LDM key layout), loaded in one read with the
  configs embedded in it or the family's shipped ones (``engine.models.single_file``): no hub, no ``config_dir``;
* a Hugging Face hub id (``owner/name``), resolved to its snapshot folder in the local Hugging Face cache; only when
  the machine is online (``HF_HUB_OFFLINE`` unset) is anything downloaded, and then only the components training
  uses.

A separate VAE (``vae_path``, the config's ``model.vae``) replaces the model's own. The VAE and the text encoders
come back as :class:`~engine.models.vae.LoadedVae` and :class:`~engine.models.text_encoders.LoadedTextEncoders`, with
the same identities the latent and text-encoder caches compute, so a cache built from the folder is valid for the
single file holding the same weights.

:func:`detect_model_family` reads only key names or config files, for the doctor and the trainer's early checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.families import FAMILY_INFO, family_info
from engine.models.loaded_model import LoadedModel
from engine.models.locations import looks_like_hub_id
from engine.models.single_file import (
    SINGLE_FILE_SUFFIXES,
    ModelLoadError,
    file_family,
    load_single_file_pipeline,
    read_header,
    resolve_single_file,
)
from engine.models.text_encoders import TEXT_COMPONENTS, load_text_encoders, ready_text_encoders
from engine.models.vae import (
    SCALING_FACTORS,
    hub_download_hint,
    is_offline,
    load_vae,
    pipeline_family,
    ready_vae,
)
from engine.startup import start_up_done

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

__all__ = ["ModelLoadError", "detect_model_family", "load_model"]

_SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
# The pipeline components training needs from a hub repository; the rest (safety checker, ...) is not downloaded.
_UNUSED_HUB_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def load_model(location: str | Path, *, family: str = "auto", vae_path: str | Path = "", dtype: Any = None,
               device: str = "cpu", clip_l: str | Path = "", t5xxl: str | Path = "", ae: str | Path = "",
               clip_g: str | Path = "", tokenizer_cache_dir: str | Path = "", fp8: bool = False) -> LoadedModel:
    """Load the base model at ``location`` (diffusers folder, single file or hub id).

    Args:
        location: ``model.pretrained_model_name_or_path``.
        family: ``model.model_family``: "sd1", "sd2", "sdxl", "flux1", "chroma", "sd3", or "auto" to detect it.
        vae_path: ``model.vae``: a separate VAE file or folder ("" = the model's own).
        dtype: torch dtype for every module (default float32). Identities are taken from the float32 weights first.
        device: where to put the modules.
        clip_l, t5xxl, ae, clip_g, tokenizer_cache_dir, fp8: FLUX.1 / Chroma / SD3 only (``model.clip_l`` ...): the
            separate component files, where the T5 tokenizer is, and whether to keep the transformer in float8.

    Returns:
        The loaded model.

    Raises:
        ModelLoadError: a missing path, a file that is a LoRA or an embedding, a layout that is no SD model, a
            family that contradicts ``family``, or a hub id that is not available; the message says what to do.
    """
    if family != "auto" and family not in FAMILY_INFO:
        raise ModelLoadError(f"unknown model family {family!r}; use one of auto, {', '.join(FAMILY_INFO)}")
    transformer_loader = _TRANSFORMER_LOADERS.get(_loader_kind(str(location), family))
    if transformer_loader is not None:
        files = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl, "ae": ae, "vae": vae_path}
        model = transformer_loader(location, family, files, tokenizer_cache_dir=tokenizer_cache_dir, dtype=dtype,
                                   device=device, fp8=fp8)
    else:
        kind, path = _locate(str(location))
        model = _LOADERS[kind](path, _Request(str(location), family, str(vae_path or ""), dtype, device))
    start_up_done()  # the imports and the model: the heavy part of an engine command's start-up is over
    return model


def _flux_model(location: str | Path, family: str, files: dict[str, Any], **options: Any) -> LoadedModel:
    from engine.models.flux.loading import load_flux_model

    return load_flux_model(location, family=family, clip_l=files["clip_l"], t5xxl=files["t5xxl"], ae=files["ae"],
                           **options)


def _sd3_model(location: str | Path, family: str, files: dict[str, Any], **options: Any) -> LoadedModel:
    from engine.models.sd3.loading import load_sd3_model

    return load_sd3_model(location, clip_l=files["clip_l"], clip_g=files["clip_g"], t5xxl=files["t5xxl"],
                          vae=files["vae"], **options)


# The transformer families' loaders, by FamilyInfo.loader: (location, family, component files, options) -> model.
# "ldm" (SD1/SD2/SDXL) goes through _locate and _LOADERS below.
_TRANSFORMER_LOADERS: dict[str, Callable[..., LoadedModel]] = {"flux": _flux_model, "sd3": _sd3_model}


# model_index.json pipeline classes of the families the "flux" and "sd3" loaders read
_TRANSFORMER_PIPELINES = {"FluxPipeline": "flux1", "ChromaPipeline": "chroma", "StableDiffusion3Pipeline": "sd3"}


def _transformer_family(location: str) -> str | None:
    """"flux1" / "chroma" / "sd3" when ``location`` holds a FLUX- or SD3-layout model (header or model_index.json)."""
    path = Path(location).expanduser()
    from engine.models.flux.files import FLUX_FILE_SUFFIXES

    if path.is_file() and path.suffix.lower() in FLUX_FILE_SUFFIXES:
        from engine.models.flux.loading import detect_flux_file
        from engine.models.sd3.files import detect_sd3_file

        return detect_flux_file(path) or ("sd3" if detect_sd3_file(path) else None)
    if not path.is_dir() and looks_like_hub_id(location):
        try:
            path = _hub_folder(location, download=False)
        except ModelLoadError:
            return None
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _TRANSFORMER_PIPELINES.get(index.get("_class_name", "")) if isinstance(index, dict) else None


def _loader_kind(location: str, family: str) -> str:
    if family != "auto":
        return family_info(family).loader
    detected = _transformer_family(location)
    return family_info(detected).loader if detected else "ldm"


def detect_model_family(location: str | Path) -> str:
    """The family of the model at ``location``, from key names or config files only (no weights are read).

    Raises:
        ModelLoadError: as :func:`load_model`, for what can be told without loading.
    """
    detected = _transformer_family(str(location))
    if detected:
        return detected
    kind, path = _locate(str(location), download=False)
    if kind == "file":
        return file_family(read_header(path))
    detected = pipeline_family(path)
    if detected is None:
        raise ModelLoadError(f"{location}: cannot tell the model family from model_index.json; set "
                             "model.model_family to sd1, sd2 or sdxl")
    return detected


# --- where the model is --------------------------------------------------------------------------------------------


def _locate(location: str, *, download: bool = True) -> tuple[str, Path]:
    """("folder" | "file", local path); a hub id becomes its local snapshot folder."""
    if not location:
        raise ModelLoadError("no model given: set model.pretrained_model_name_or_path to a .safetensors/.ckpt file, "
                             "a diffusers folder or a Hugging Face id")
    path = Path(location).expanduser()
    if path.is_dir():
        return "folder", _checked_folder(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{path}: unsupported file type {path.suffix or '(none)'}; use a .safetensors or "
                                 ".ckpt checkpoint or a diffusers folder")
        return "file", path
    if looks_like_hub_id(location):
        return "folder", _checked_folder(_hub_folder(location, download))
    raise ModelLoadError(f"model not found: {path} (no such file or folder); check "
                         "model.pretrained_model_name_or_path")


def _checked_folder(folder: Path) -> Path:
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise ModelLoadError(f"{folder}: a folder but not a diffusers pipeline (no model_index.json and unet/); "
                             "point model.pretrained_model_name_or_path at the pipeline folder or a checkpoint file")
    return folder


def _hub_folder(repo_id: str, download: bool) -> Path:
    """The repository's snapshot in the local Hugging Face cache, downloaded first only when online and allowed."""
    offline = is_offline()
    try:
        if download:
            from diffusers import DiffusionPipeline

            unused = dict.fromkeys(_UNUSED_HUB_COMPONENTS)  # components passed as None are not downloaded
            return Path(DiffusionPipeline.download(repo_id, local_files_only=offline, **unused))
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, "model_index.json", local_files_only=True)).parent
    except Exception as error:  # huggingface_hub raises many types (LocalEntryNotFoundError, HTTP errors, OSError)
        if download or offline:
            raise ModelLoadError(hub_download_hint(repo_id, offline, error)) from error
        raise ModelLoadError(f"{repo_id!r} is not in the local Hugging Face cache yet, and the family is told from "
                             "cached files only; load the model once (or set model.model_family)") from error


# --- loaders ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    location: str
    family: str
    vae_path: str
    dtype: Any
    device: str


def _load_folder(folder: Path, request: _Request) -> LoadedModel:
    from diffusers import UNet2DConditionModel

    text = load_text_encoders(folder, family=request.family, dtype=request.dtype, device=request.device)
    vae = load_vae(folder, request.vae_path, family=text.family, dtype=request.dtype, device=request.device)
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{folder}: cannot load the UNet ({error})") from error
    return LoadedModel(text.family, _ready_unet(unet, request), vae, text, _scheduler_config(folder),
                       request.location, None)


def _load_file(path: Path, request: _Request) -> LoadedModel:
    """One read of the file for every component; the separate VAE, if any, is loaded on its own."""
    family, config = resolve_single_file(path, request.family)
    skip = ("vae",) if request.vae_path else ()
    pipe = load_single_file_pipeline(path, family, config, skip=skip)
    names = TEXT_COMPONENTS[family]
    tokenizers, encoders = [getattr(pipe, t) for t, _ in names], [getattr(pipe, e).float() for _, e in names]
    text = ready_text_encoders(family, tokenizers, encoders, str(path), dtype=request.dtype, device=request.device)
    if request.vae_path:
        vae = load_vae(path, request.vae_path, family=family, dtype=request.dtype, device=request.device)
    else:
        vae = ready_vae(pipe.vae.float(), family, SCALING_FACTORS[family], str(path), dtype=request.dtype,
                        device=request.device)
    return LoadedModel(family, _ready_unet(pipe.unet, request), vae, text, _scheduler_config(config),
                       request.location, path)


_LOADERS: dict[str, Callable[[Path, _Request], LoadedModel]] = {"folder": _load_folder, "file": _load_file}


def _ready_unet(unet: UNet2DConditionModel, request: _Request) -> UNet2DConditionModel:
    import torch

    # nn.Module.to, not diffusers' override, as for the VAE: no warning per cast.
    return torch.nn.Module.to(unet, device=request.device, dtype=request.dtype or torch.float32).eval()


def _scheduler_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / _SCHEDULER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder}: cannot read {_SCHEDULER_CONFIG} ({error})") from error
