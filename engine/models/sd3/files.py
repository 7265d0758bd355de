"""What an SD3 / SD3.5 file holds, read from its header only (spec §8.1).

Stability's single files (``sd3_medium.safetensors``, ``sd3.5_large.safetensors``, ``..._incl_clips...``) keep the
MMDiT under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` (LDM names) and, in the "incl" files,
the text encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (Hugging Face names). A transformer-only
file with bare ``joint_blocks.*`` keys is read too (sd-scripts refuses it; nothing is lost by taking it). The prefix
is stripped per key, never judged from the first key.

Everything here reads headers, so it is cheap enough for detection and the doctor; it imports no torch itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.config.choices import family_label
from engine.models.flux.files import base_model_header, check_not_adapter, read_flux_header
from engine.models.sd3.params import SAI_PREFIX
from engine.models.single_file import FAMILY_LABELS, FileHeader, ModelLoadError

__all__ = [
    "EMBEDDED_PREFIXES",
    "LOCATION",
    "SD3_BASE",
    "SD3_PIPELINES",
    "SD3File",
    "VAE_PREFIX",
    "detect_sd3_file",
    "not_sd3_message",
    "sd3_file",
]

LOCATION = "model.pretrained_model_name_or_path"
SD3_BASE = "SD3/SD3.5"  # what a base-model file should be, in messages
VAE_PREFIX = "first_stage_model."
# Where an all-in-one file keeps each text encoder (diffusers' single_file_utils reads the same keys).
EMBEDDED_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                     "t5xxl": "text_encoders.t5xxl.transformer."}
# A key each embedded component has (after its prefix): the component counts as present only when it is there.
_EMBEDDED_MARKERS = {"clip_l": "text_model.embeddings.token_embedding.weight",
                     "clip_g": "text_model.embeddings.token_embedding.weight", "t5xxl": "shared.weight"}
_VAE_MARKER = VAE_PREFIX + "encoder.down.0.block.0.conv1.weight"
# Top-level module names of a SAI MMDiT: keys outside them belong to other components.
_TRANSFORMER_ROOTS = frozenset({"x_embedder", "pos_embed", "t_embedder", "y_embedder", "context_embedder",
                                "joint_blocks", "final_layer"})
_MARKER = "joint_blocks.0."
SD3_PIPELINES = frozenset({"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                           "StableDiffusion3InpaintPipeline"})


@dataclass(frozen=True)
class SD3File:
    """A SAI single file's parts: the MMDiT's keys (prefix-free SAI name → key in the file) and which other
    components ("clip_l", "clip_g", "t5xxl", "vae") are inside."""

    header: FileHeader
    transformer: dict[str, str]
    embedded: frozenset[str]

    @property
    def path(self) -> Path:
        return self.header.path


def sd3_file(header: FileHeader) -> SD3File | None:
    """The SD3 parts of a file's header; None when it holds no MMDiT (no ``joint_blocks.0.`` keys)."""
    transformer = {}
    for key in header.shapes:
        name = key.removeprefix(SAI_PREFIX)
        if name.split(".", 1)[0] in _TRANSFORMER_ROOTS:
            transformer[name] = key
    if not any(name.startswith(_MARKER) for name in transformer):
        return None
    embedded = {part for part, prefix in EMBEDDED_PREFIXES.items() if prefix + _EMBEDDED_MARKERS[part] in header.shapes}
    if _VAE_MARKER in header.shapes:
        embedded.add("vae")
    return SD3File(header, transformer, frozenset(embedded))


def detect_sd3_file(path: str | Path) -> bool:
    """Whether ``path`` holds an SD3/SD3.5 model: a file by its header (``model.diffusion_model.joint_blocks.0.*`` or
    bare ``joint_blocks.0.*`` keys), a folder by its ``model_index.json`` (a StableDiffusion3Pipeline) or its
    ``transformer/config.json`` (SD3Transformer2DModel). No weights are read.

    Raises:
        ModelLoadError: a missing, unsupported or unreadable file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _folder_is_sd3(path)
    header = base_model_header(path, LOCATION)
    return header is not None and sd3_file(header) is not None


def _folder_is_sd3(folder: Path) -> bool:
    for config, key in ((folder / "model_index.json", SD3_PIPELINES),
                        (folder / "transformer" / "config.json", {"SD3Transformer2DModel"})):
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data.get("_class_name") in key
    return False


def checked_sd3_file(path: Path) -> SD3File:
    """The SD3 parts of ``path`` (``model.pretrained_model_name_or_path``).

    Raises:
        ModelLoadError: a LoRA/embedding, or a file that is no SD3 model (saying what it is instead).
    """
    header = read_flux_header(path, LOCATION)
    check_not_adapter(header, LOCATION, SD3_BASE)
    parts = sd3_file(header)
    if parts is None:
        raise ModelLoadError(not_sd3_message(header))
    return parts


def not_sd3_message(header: FileHeader) -> str:
    """What a file given as the SD3 model is instead, and what to do (a FLUX or SD file, a VAE, a text encoder)."""
    from engine.models.flux.loading import detect_flux_file
    from engine.models.ldm_checkpoint import detect_family

    keys = set(header.shapes)
    flux = detect_flux_file(header.path)
    if flux is not None:
        label = family_label(flux)
        return (f"{header.path}: this is a {label} model, not an {SD3_BASE} one; set model.model_family to {flux} "
                f"(or auto), or point {LOCATION} at an SD3/SD3.5 file")
    try:
        sd_family = detect_family(keys) if any(key.startswith(SAI_PREFIX) for key in keys) else None
    except ValueError:
        sd_family = None
    if sd_family is not None:
        return (f"{header.path}: this is an {FAMILY_LABELS[sd_family]} checkpoint, not an {SD3_BASE} model; set "
                f"model.model_family to {sd_family} (or auto), or point {LOCATION} at an SD3/SD3.5 file")
    if any(key.removeprefix(VAE_PREFIX).startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks."))
           for key in keys):
        return f"{header.path}: this is a VAE file; put it in model.vae and set {LOCATION} to the SD3/SD3.5 model"
    if any(key.startswith(("encoder.block.", "shared.", "text_model.", "embeddings.token_embedding")) for key in keys):
        return (f"{header.path}: this is a text encoder file; put it in model.clip_l, model.clip_g or model.t5xxl and "
                f"set {LOCATION} to the SD3/SD3.5 model")
    return (f"{header.path}: not an {SD3_BASE} model (no model.diffusion_model.joint_blocks.* keys); point {LOCATION} "
            "at Stability's single file (sd3_medium.safetensors, sd3.5_large.safetensors, ...) or a diffusers folder")
