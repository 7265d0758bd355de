"""Loading SD3 medium, SD3.5 medium and SD3.5 large for training, offline (spec §8.1, issue 13).

The transformer comes from (``model.pretrained_model_name_or_path``):

* Stability's single file (``sd3_medium.safetensors``, ``sd3.5_large.safetensors``, the "incl_clips" files): the
  MMDiT under ``model.diffusion_model.`` (stripped per key; a bare ``joint_blocks.*`` transformer-only file loads
  too), with the VAE and text encoders it embeds, if any;
* a diffusers folder (StableDiffusion3Pipeline: ``transformer/`` converted to SAI naming by
  ``engine.models.sd3.convert``), which also supplies the text encoders, tokenizers and VAE it holds;
* a hub id already in the local Hugging Face cache (its snapshot folder; nothing is downloaded).

``model.clip_l``, ``model.clip_g``, ``model.t5xxl`` and ``model.vae`` (files or folders) win over the model's own
components (``engine.models.sd3.text_encoders``, ``engine.models.sd3.vae``). The variant is read off the keys
(``engine.models.sd3.params``), so tiny models load like real ones. ``float8_e4m3fn`` transformer weights stay fp8
with ``fp8=True`` and are cast up to ``dtype`` otherwise; the VAE is always float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.flux.files import assemble_transformer, hub_snapshot, read_flux_header, transformer_shards
from engine.models.loaded_model import LoadedModel
from engine.models.locations import looks_like_hub_id
from engine.models.sd3.files import LOCATION, SD3_PIPELINES, checked_sd3_file
from engine.models.single_file import ModelLoadError

if TYPE_CHECKING:
    from engine.models.sd3.mmdit import MMDiT
    from engine.models.vae import LoadedVae

__all__ = ["SD3_SCHEDULER_CONFIG", "SD3Source", "load_sd3_latent_vae", "load_sd3_model", "load_sd3_transformer",
           "locate_sd3"]

# stabilityai/stable-diffusion-3(.5)-* scheduler/scheduler_config.json: every variant samples with shift 3.0.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                        "shift": 3.0}


@dataclass(frozen=True)
class SD3Source:
    """Where an SD3 model is: the transformer's tensors (prefix-free key → (file, key in the file)) in ``layout``
    naming ("sai" or "diffusers"), the single file or the diffusers folder, and what the single file embeds."""

    tensors: dict[str, tuple[Path, str]]
    layout: str
    where: Path  # the file, or the transformer folder, for messages
    model_file: Path | None
    folder: Path | None
    embedded: frozenset[str]


def load_sd3_model(location: str | Path, *, clip_l: str | Path | None = None, clip_g: str | Path | None = None,
                   t5xxl: str | Path | None = None, vae: str | Path | None = None,
                   tokenizer_cache_dir: str | Path | None = None, dtype: Any = None, device: str = "cpu",
                   fp8: bool = False) -> LoadedModel:
    """Load an SD3 / SD3.5 model for training.

    Args:
        location: ``model.pretrained_model_name_or_path``: a single file, a diffusers folder or a cached hub id.
        clip_l, clip_g, t5xxl, vae: ``model.clip_l``, ``model.clip_g``, ``model.t5xxl``, ``model.vae`` (files or
            folders; "" or None: the model's own).
        tokenizer_cache_dir: ``model.tokenizer_cache_dir`` (where T5's tokenizer is; see
            ``engine.models.flux.tokenizers``).
        dtype: torch dtype of the transformer and text encoders (default float32); the VAE is always float32.
        device: where to put the modules.
        fp8: keep a ``float8_e4m3fn`` transformer's weights as fp8 storage (``model.fp8_base``).

    Returns:
        ``LoadedModel`` of family "sd3": ``unet`` the SAI-layout ``MMDiT`` (eval mode), ``vae`` the 16-channel VAE
        (scaling 1.5305, shift 0.0609), ``text`` [CLIP-L, CLIP-G, T5] and ``scheduler_config`` with ``variant``
        ("medium", "5-medium" or "5-large") and ``shift`` 3.0.

    Raises:
        ModelLoadError: anything that keeps the model from loading; the message names the file or config key.
    """
    import torch

    from engine.models.sd3.text_encoders import load_sd3_text_encoders
    from engine.models.sd3.vae import load_sd3_vae

    dtype = dtype or torch.float32
    source = locate_sd3(str(location))
    transformer = load_sd3_transformer(source, dtype=dtype, device=device, fp8=fp8)
    text = load_sd3_text_encoders(transformer.params, model_file=source.model_file, embedded=source.embedded,
                                  folder=source.folder, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl,
                                  tokenizer_cache_dir=tokenizer_cache_dir, dtype=dtype, device=device)
    # The VAE stays float32 (84 M parameters): latents are encoded from the weights their cache key names.
    loaded_vae = load_sd3_vae(_vae_location(source, vae), dtype=torch.float32, device=device,
                              what="model.vae" if vae else LOCATION)
    scheduler = {**_scheduler_config(source.folder), "variant": transformer.params.variant}
    return LoadedModel("sd3", transformer, loaded_vae, text, scheduler, str(location), source.model_file)


def load_sd3_latent_vae(location: str | Path, vae: str | Path | None = None, *, dtype: Any = None,
                        device: str = "cpu") -> LoadedVae:
    """The VAE an SD3 run's latents come from, picked as :func:`load_sd3_model` picks it (``model.vae``, else the
    model file's ``first_stage_model.*`` or the folder's ``vae/``), without loading the transformer or text encoders:
    ``python -m engine cache-latents`` writes the entries training then reuses (same VAE file, same cache key).

    Raises:
        ModelLoadError: no model or VAE there, naming the file and the config key.
    """
    from engine.models.sd3.vae import load_sd3_vae

    return load_sd3_vae(_vae_location(locate_sd3(str(location)), vae), dtype=dtype, device=device,
                        what="model.vae" if vae else LOCATION)


def load_sd3_transformer(source: SD3Source, *, dtype: Any, device: str = "cpu", fp8: bool = False) -> MMDiT:
    """The ``MMDiT`` for ``source``, built on the meta device and filled with the file's tensors.

    Raises:
        ModelLoadError: the tensors do not form a whole MMDiT of the shape their keys describe.
    """
    from engine.models.sd3.convert import diffusers_to_sai
    from engine.models.sd3.mmdit import MMDiT
    from engine.models.sd3.params import params_from_state_dict

    convert = diffusers_to_sai if source.layout == "diffusers" else None
    return assemble_transformer(source.tensors, source.where, dtype=dtype, device=device, fp8=fp8, convert=convert,
                                params_from_shapes=params_from_state_dict, model_class=MMDiT, label="SD3 MMDiT")


# --- where the model is --------------------------------------------------------------------------------------------


def locate_sd3(location: str) -> SD3Source:
    """The transformer's tensors and the model's other sources for ``model.pretrained_model_name_or_path``.

    Raises:
        ModelLoadError: nothing there, a file that is no SD3 model (saying what it is), or a hub id not cached.
    """
    if not location:
        raise ModelLoadError(f"no model given: set {LOCATION} to an SD3/SD3.5 .safetensors file, a diffusers folder "
                             "or a Hugging Face id in the local cache")
    path = Path(location).expanduser()
    if path.is_dir():
        return _folder_source(path)
    if path.is_file():
        parts = checked_sd3_file(path)
        tensors = {name: (path, key) for name, key in parts.transformer.items()}
        return SD3Source(tensors, "sai", path, path, None, parts.embedded)
    if looks_like_hub_id(location):
        return _folder_source(hub_snapshot(location, LOCATION, "SD3", "Stability's .safetensors file"))
    raise ModelLoadError(f"model not found: {path} (no such file or folder); check {LOCATION}")


def _folder_source(folder: Path) -> SD3Source:
    from engine.models.sd3.convert import transformer_layout

    _check_pipeline(folder)
    transformer, shards = transformer_shards(folder, LOCATION, "SD3/SD3.5", "Stability's .safetensors file")
    tensors: dict[str, tuple[Path, str]] = {}
    for shard in shards:
        header = read_flux_header(shard, LOCATION)
        tensors.update({key: (shard, key) for key in header.shapes})
    layout = transformer_layout(tensors)
    if layout is None:
        raise ModelLoadError(f"{transformer}: the weights there are no SD3/SD3.5 transformer")
    return SD3Source(tensors, layout, transformer, None, folder, frozenset())


def _check_pipeline(folder: Path) -> None:
    """A folder whose model_index.json names another pipeline (FLUX, SDXL) is refused, naming it."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name and name not in SD3_PIPELINES:
        raise ModelLoadError(f"{folder}: a {name} folder, not an SD3/SD3.5 one (StableDiffusion3Pipeline); set "
                             f"model.model_family to auto or to its family, or point {LOCATION} at an SD3/SD3.5 model")


# --- the other components ---------------------------------------------------------------------------------------


def _vae_location(source: SD3Source, vae: Any) -> Path:
    if vae:
        return Path(vae).expanduser()
    if source.model_file is not None and "vae" in source.embedded:
        return source.model_file
    if source.folder is not None and (source.folder / "vae").is_dir():
        return source.folder / "vae"
    where = f"{source.model_file.name} has no VAE inside (first_stage_model.*)" if source.model_file is not None \
        else f"{source.folder} has no vae/ folder"
    raise ModelLoadError(f"model.vae is not set and {where}; set model.vae to the SD3 VAE (a file with its "
                         "encoder.*/decoder.* weights, or a diffusers vae/ folder of stable-diffusion-3)")


def _scheduler_config(folder: Path | None) -> dict[str, Any]:
    if folder is not None:
        try:
            config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
            if isinstance(config, dict):
                return config
        except (OSError, ValueError):
            pass
    return dict(SD3_SCHEDULER_CONFIG)
