"""Loading the VAE alone (for latent caching), from whatever a user points at, offline.

Sources, tried in this order:

* a diffusers pipeline folder (``vae/config.json``) or a diffusers VAE folder (``config.json`` + weights);
* a single file (``.safetensors``, ``.ckpt``, ...): a whole SD checkpoint (``first_stage_model.*`` keys), a
  standalone LDM VAE (``encoder.down.0.block.0...``, like ``vae-ft-mse-840000-ema-pruned.safetensors``) or a
  standalone diffusers VAE (``encoder.down_blocks.0.resnets.0...``). The AutoencoderKL config is the one embedded
  by our writer, else the family's shipped one with the sizes read off the tensor shapes
  (``engine.models.vae_layout``); only the VAE's tensors are read;
* a Hugging Face hub id, which only works from the local HF cache on an offline machine.

The identity returned with the model is a hash of its weights, so a latent cache can tell which VAE made it
whatever the file format: a folder and a single file holding the same weights have the same identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.families import FAMILY_INFO
from engine.models.ldm_checkpoint import FAMILIES
from engine.models.locations import looks_like_hub_id
from engine.models.vae_layout import VaeLoadError, load_single_file_vae, single_file_family

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

__all__ = [
    "SCALING_FACTORS",
    "LoadedVae",
    "VaeLoadError",
    "hub_download_hint",
    "is_offline",
    "load_vae",
    "pipeline_family",
    "ready_vae",
    "vae_dtype",
    "weights_identity",
]

# The latent scale each family's diffusion model was trained with (sd-scripts' constants). SD1 and SD2 share one VAE.
SCALING_FACTORS = {name: FAMILY_INFO[name].latent_scaling_factor for name in FAMILIES}
_FAMILY_BY_SCALING = {0.13025: "sdxl", 0.18215: "sd1"}  # a diffusers VAE folder states its scale; sd1 covers sd2

_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


@dataclass
class LoadedVae:
    """A VAE ready to encode: frozen, in eval mode, on its device and dtype.

    Attributes:
        vae: the ``diffusers.AutoencoderKL``.
        identity: sha256 (hex) of the weights as float32 (see :func:`weights_identity`).
        family: "sd1", "sd2" or "sdxl": which diffusion model the latents are for.
        scaling_factor: what training multiplies the (unscaled, cached) latents by.
        source: the file, folder or hub id the weights came from.
        shift_factor: subtracted from the latents before scaling (FLUX's AE: 0.1159; 0 for SD).
    """

    vae: AutoencoderKL
    identity: str
    family: str
    scaling_factor: float
    source: str
    shift_factor: float = 0.0

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """What the denoiser sees: (z − shift)·scale, from the AE's raw (cached) latents z."""
        return (latents - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`, before decoding."""
        return latents / self.scaling_factor + self.shift_factor


@dataclass
class _Source:
    vae: AutoencoderKL
    family: str | None  # what the source itself says, if anything
    scaling_factor: float | None  # stated by a diffusers config; None → the family's constant


def weights_identity(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted tensor names, shapes, dtypes and bytes, every tensor taken as float32.

    Hashing all of it is affordable: a real-size SD/SDXL VAE (83.7 M parameters, 335 MB in float32) hashes in
    0.23 s on a 2-core CPU, so no subsampling is needed. Tensors are cast to float32 first so that the same
    weights give the same identity whether they were stored in fp16 or fp32 files.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|float32|".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    return digest.hexdigest()


def load_vae(model_path: str | Path, vae_path: str | Path = "", *, family: str = "auto", dtype: Any = None,
             device: str = "cpu") -> LoadedVae:
    """Load the VAE to encode latents with: ``vae_path`` when given, else the one inside ``model_path``.

    Args:
        model_path: the base model (single file, diffusers folder or hub id); also tells the family when a
            separate VAE is used. May be empty when ``vae_path`` and ``family`` are given.
        vae_path: a separate VAE (file or folder), like ``model.vae`` in the config.
        family: "sd1", "sd2", "sdxl", or "auto" to detect it. A standalone VAE file cannot say whether it is an
            SDXL VAE (same shapes as SD1/SD2), so with such a file and no usable ``model_path`` it is required.
        dtype: torch dtype to encode in (default float32).
        device: where to put the model.

    Returns:
        The loaded VAE with its identity, family and scaling factor.

    Raises:
        VaeLoadError: a missing file or folder, an unrecognised layout, a hub id that is not available offline,
            or a family that cannot be decided; the message names the path and what to do.
    """
    if family != "auto" and family not in FAMILIES:
        raise VaeLoadError(f"unknown model family {family!r}; use one of auto, {', '.join(FAMILIES)}")
    vae_location = str(vae_path or model_path)
    if not vae_location:
        raise VaeLoadError("no model given: set model.pretrained_model_name_or_path (or model.vae)")
    explicit = None if family == "auto" else family
    model_family = _family_of_model(str(model_path)) if vae_path and model_path and not explicit else None
    source = _load_source(vae_location, subfolder="" if vae_path else "vae")
    resolved = explicit or model_family or source.family
    if resolved is None:
        raise VaeLoadError(
            f"{vae_location}: a standalone VAE file does not say which model family it belongs to (an SDXL VAE has "
            "the same shapes as an SD1/SD2 one); set model.model_family to sd1, sd2 or sdxl")
    scaling = source.scaling_factor if source.scaling_factor is not None else SCALING_FACTORS[resolved]
    return ready_vae(source.vae, resolved, scaling, vae_location, dtype=dtype, device=device)


def ready_vae(vae: AutoencoderKL, family: str, scaling_factor: float, source: str, *, dtype: Any = None,
              device: str = "cpu") -> LoadedVae:
    """Wrap a loaded float32 VAE: identity of its float32 weights, then cast, moved, frozen and in eval mode.

    The module's own ``scaling_factor`` is set to ``scaling_factor`` too, so that a pipeline built on it (sampling)
    decodes with the family's scale even when the file did not state one (an SDXL VAE from a single file).
    """
    import torch

    identity = weights_identity(vae.state_dict())
    if vae.config.scaling_factor != scaling_factor:
        vae.register_to_config(scaling_factor=scaling_factor)
    # nn.Module.to, not diffusers' override: that one warns about fp32-only modules on every dtype cast, and
    # AutoencoderKL has none (the list it prints is empty).
    vae = torch.nn.Module.to(vae, device=device, dtype=dtype)
    vae.eval().requires_grad_(False)
    return LoadedVae(vae=vae, identity=identity, family=family, scaling_factor=scaling_factor, source=source)


def vae_dtype(no_half_vae: bool, device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE (or FLUX's AE) encodes in, whether for the cache command or for training: float32 on a CPU
    (half-precision convolutions are slow there) or with ``model.no_half_vae``, else the run's weight dtype.

    A float32 cache satisfies a later half-precision run, so caching on a CPU never forces a rebuild on a GPU.
    """
    import torch

    return torch.float32 if device_type == "cpu" or no_half_vae else weight_dtype


# --- sources ---------------------------------------------------------------------------------------------------


def _load_source(location: str, *, subfolder: str) -> _Source:
    path = Path(location).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return _load_single_file(path)
    if looks_like_hub_id(location):
        return _load_hub(location, subfolder)
    raise VaeLoadError(f"model not found: {path} (no such file or folder)")


def _load_folder(folder: Path) -> _Source:
    from diffusers import AutoencoderKL

    if (folder / "vae" / "config.json").is_file():
        vae_folder, family = folder / "vae", pipeline_family(folder)
    elif (folder / "config.json").is_file():
        vae_folder, family = folder, None
    else:
        raise VaeLoadError(f"{folder}: a folder but not a diffusers model; expected vae/config.json (a pipeline "
                           "folder) or config.json with the weights (a VAE folder)")
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_folder), local_files_only=True).float()
    except (OSError, ValueError, KeyError) as error:
        raise VaeLoadError(f"{vae_folder}: cannot load the VAE ({error})") from error
    scaling = float(vae.config.scaling_factor)
    return _Source(vae, family or _FAMILY_BY_SCALING.get(round(scaling, 5)), scaling)


def _load_single_file(path: Path) -> _Source:
    loaded = load_single_file_vae(path)
    return _Source(loaded.vae, loaded.family, None)


def _load_hub(repo_id: str, subfolder: str) -> _Source:
    """From the local Hugging Face cache; a download only when the machine is online."""
    from diffusers import AutoencoderKL

    offline = is_offline()
    try:
        vae = AutoencoderKL.from_pretrained(repo_id, subfolder=subfolder or None, local_files_only=offline).float()
    except Exception as error:  # huggingface_hub raises many types (LocalEntryNotFoundError, HTTP errors, OSError)
        raise VaeLoadError(hub_download_hint(repo_id, offline, error)) from error
    scaling = float(vae.config.scaling_factor)
    return _Source(vae, _FAMILY_BY_SCALING.get(round(scaling, 5)), scaling)


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub (then only the local Hugging Face cache is used)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _OFFLINE_VALUES


def hub_download_hint(repo_id: str, offline: bool, error: Exception) -> str:
    """The message for a hub id that cannot be loaded: why, and how to get it onto this machine."""
    state = "this machine is offline (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache" if offline \
        else f"it could not be downloaded ({type(error).__name__}: {error})"
    folder = f"models/{repo_id.split('/')[-1]}"
    return (f"{repo_id!r} is not a local file or folder; read as a Hugging Face hub id, {state}. Download it on a "
            f"machine with network (`hf download {repo_id} --local-dir {folder}`, or with older huggingface_hub "
            f"`huggingface-cli download {repo_id} --local-dir {folder}`) and point the config at that folder, or at "
            "a local .safetensors file")


# --- family ----------------------------------------------------------------------------------------------------

# Pipeline class (model_index.json) → family; StableDiffusionPipeline is SD1 or SD2, told apart by its text encoder.
_PIPELINE_FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
                      "StableDiffusionPipeline": "sd1", "StableDiffusionImg2ImgPipeline": "sd1"}
_SD1_OR_SD2_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


def pipeline_family(folder: Path) -> str | None:
    """A diffusers folder's family from ``model_index.json`` (and its text encoder); None when it cannot tell."""
    try:
        pipeline = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
        family = _PIPELINE_FAMILIES.get(pipeline)
        if pipeline in _SD1_OR_SD2_PIPELINES:
            # SD2's OpenCLIP encoder uses gelu, SD1's OpenAI CLIP quick_gelu (true of the tiny test models too).
            text = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
            family = "sd2" if text.get("hidden_act") == "gelu" else "sd1"
        return family
    except (OSError, ValueError, AttributeError):
        return None


def _family_of_model(location: str) -> str | None:
    """The base model's family, when a separate VAE is used; None when it cannot be told cheaply."""
    path = Path(location).expanduser()
    if path.is_dir():
        return pipeline_family(path)
    if path.is_file():
        try:
            return single_file_family(path)
        except ValueError:  # VaeLoadError included: the family is then not known cheaply
            return None
    return None
