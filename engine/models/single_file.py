"""Single-file checkpoints (.safetensors / .ckpt): reading them cheaply, telling what they are, and the diffusers
config folder that loads them offline.

diffusers' ``from_single_file`` needs a local diffusers folder (``config=``) with the model's configs and tokenizer
files; without one it goes to the hub (stack-notes §2, §8.5). The configs for a file come from, in order:

1. the configs our own writer embedded in the safetensors metadata (``EMBEDDED_CONFIGS_KEY``): exact, whatever the
   model's sizes;
2. the family's shipped configs (``engine/models/configs``) with the structural values read off the tensor shapes
   (``engine.models.configs.inference``).

Either way they are written, with the tokenizer files, into a cached folder (``engine.models.tokenizers``) that is
passed as ``config=`` with ``local_files_only=True``, so nothing reaches a hub.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config.choices import family_label
from engine.models.configs import component_file, shipped_configs
from engine.models.configs.inference import ConfigInferenceError, infer_configs
from engine.models.families import FAMILY_INFO, family_info
from engine.models.ldm_checkpoint import EMBEDDED_CONFIGS_KEY, FAMILIES, detect_family
from engine.models.tokenizers import cached_folder, content_key, write_tokenizer_files

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAMILY_LABELS",
    "SINGLE_FILE_SUFFIXES",
    "FileHeader",
    "ModelLoadError",
    "adapter_kind",
    "check_family",
    "config_folder",
    "diffusers_pipeline_of",
    "embedded_configs",
    "file_configs",
    "file_family",
    "load_single_file_pipeline",
    "read_header",
    "read_tensors",
    "resolve_single_file",
]

SINGLE_FILE_SUFFIXES = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin"})
FAMILY_LABELS = {name: family_label(name) for name in FAMILIES}
_DTYPE_KEYS = ("torch_dtype", "dtype")
# Pipeline components a training run never needs from a single file.
_NEVER_LOADED = ("safety_checker", "feature_extractor", "image_encoder")


class ModelLoadError(ValueError):
    """A model cannot be loaded; the message names the file, folder or id and says what to do."""


@dataclass(frozen=True)
class FileHeader:
    """What a single file says without its tensor data: tensor shapes by key, and string metadata."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def read_header(path: Path) -> FileHeader:
    """Shapes and metadata of ``path``; for .safetensors only the header is read, .ckpt files are memory-mapped.

    Raises:
        ModelLoadError: an unsupported extension or an unreadable file.
    """
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path}: unsupported file type {suffix or '(none)'}; use .safetensors or .ckpt")
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
                return FileHeader(path, shapes, dict(handle.metadata() or {}))
        state = _torch_state_dict(path)
    except ModelLoadError:
        raise
    except Exception as error:  # safetensors and torch.load signal damage with many types
        raise ModelLoadError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    return FileHeader(path, {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}, {})


def _torch_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a pickled checkpoint (weights only), unwrapping Lightning's ``{"state_dict": ...}``."""
    import torch

    try:
        # mmap: a 4-7 GB checkpoint is not read into memory to look at it.
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: not a checkpoint (it holds a {type(data).__name__}, not tensors by name)")
    return data


def read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of ``path`` (only those are read from a .safetensors file)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    state = _torch_state_dict(path)
    return {key: state[key] for key in keys}


# --- what a file is ----------------------------------------------------------------------------------------------


# Kohya/LyCORIS (lora_down, hada_w1, lokr_w1), PEFT (lora_A/B) and old diffusers (to_q_lora.down) weight names.
_LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up", "hada_w1", "lokr_w1")


def _is_lora(keys: set[str]) -> bool:
    return any(key.startswith(("lora_unet_", "lora_te")) or any(m in key for m in _LORA_MARKERS) for key in keys)


def _is_embedding(keys: set[str]) -> bool:
    # sd-scripts/A1111 .safetensors ("emb_params"), A1111 .pt ("string_to_param"), SDXL embeddings (clip_l/clip_g).
    return "emb_params" in keys or "string_to_param" in keys or (bool(keys) and keys <= {"clip_l", "clip_g"})


# Files that are not base models, with what to do instead; checked before the family is detected.
_NOT_BASE_MODELS = {
    "LoRA": (_is_lora, "this is a LoRA file, not a base model: put it in network.network_weights and set "
                       "model.pretrained_model_name_or_path to the checkpoint it was trained on"),
    "embedding": (_is_embedding, "this is a Textual Inversion embedding, not a base model: set "
                                 "model.pretrained_model_name_or_path to a whole SD checkpoint or a diffusers folder"),
}


def adapter_kind(keys: set[str]) -> str | None:
    """The kind of add-on file ``keys`` belong to ("LoRA" or "embedding"), None for a base model or component."""
    return next((kind for kind, (test, _) in _NOT_BASE_MODELS.items() if test(keys)), None)


def file_family(header: FileHeader) -> str:
    """The family of the base model in ``header``'s file, from its key names.

    Raises:
        ModelLoadError: the file is a LoRA or an embedding, or its keys fit no SD1/SD2/SDXL layout.
    """
    keys = set(header.shapes)
    for test, advice in _NOT_BASE_MODELS.values():
        if test(keys):
            raise ModelLoadError(f"{header.path}: {advice}")
    try:
        return detect_family(keys)
    except ValueError as error:
        raise ModelLoadError(f"{header.path}: {error}; if it is a diffusers component file, point at the whole "
                             "diffusers folder instead") from error


def diffusers_pipeline_of(family: str | None) -> str | None:
    """The diffusers pipeline class a family's folder holds (SD1 and SD2 share one, SDXL has its own), which is all
    a folder's layout tells for sure; a name the registry does not know stays as it is."""
    info = FAMILY_INFO.get(family) if family else None
    return info.diffusers_pipeline if info else family


def check_family(where: Path | str, detected: str | None, wanted: str, *, exact: bool, what: str = "checkpoint",
                 error: type[ModelLoadError] = ModelLoadError) -> str:
    """The family to use: ``detected`` when ``wanted`` is "auto", else ``wanted`` if it fits what was detected.

    Args:
        where: the file or folder, for the message.
        detected: the family the source shows (None: it cannot tell).
        wanted: ``model.model_family`` ("auto", "sd1", "sd2" or "sdxl").
        exact: whether ``detected`` is certain (a single file's keys) or only tells SDXL from the others (a folder,
            where SD1 and SD2 are told apart by a heuristic, so an explicit choice between them wins).
        what: "checkpoint" or "model folder", for the message.
        error: the exception type to raise (a ModelLoadError subclass of the calling loader).

    Raises:
        error: the family cannot be told, or it contradicts ``wanted``.
    """
    if wanted == "auto":
        if detected is None:
            raise error(f"{where}: cannot tell the model family; set model.model_family to sd1, sd2 or sdxl")
        return detected
    contradicts = detected != wanted if exact else diffusers_pipeline_of(detected) != diffusers_pipeline_of(wanted)
    if detected is not None and contradicts:
        raise error(f"{where}: this {what} is {FAMILY_LABELS[detected]} but model.model_family is {wanted}; set "
                    f"model.model_family to {detected} or auto")
    return wanted


# --- configs -----------------------------------------------------------------------------------------------------


def file_configs(header: FileHeader, family: str) -> dict[str, dict[str, Any]]:
    """The diffusers configs to load ``header``'s file as ``family``: embedded ones, else shipped + inferred.

    Raises:
        ModelLoadError: the embedded configs are damaged, or the shapes do not fit the family's layout.
    """
    stored = embedded_configs(header)
    if stored is None:
        try:
            return infer_configs(family, header.shapes)
        except ConfigInferenceError as error:
            raise ModelLoadError(f"{header.path}: {error}") from error
    configs = shipped_configs(family)
    configs.update({name: config for name, config in stored.items() if name in configs})
    return configs


def embedded_configs(header: FileHeader) -> dict[str, dict[str, Any]] | None:
    """The configs :func:`engine.models.ldm_checkpoint.save_ldm_checkpoint` stored in the file, by component.

    Raises:
        ModelLoadError: the metadata entry is there but damaged.
    """
    embedded = header.metadata.get(EMBEDDED_CONFIGS_KEY)
    if embedded is None:
        return None
    try:
        stored = json.loads(embedded)
    except ValueError as error:
        raise ModelLoadError(f"{header.path}: the metadata {EMBEDDED_CONFIGS_KEY!r} is not valid JSON ({error}); "
                             "re-save the checkpoint") from error
    if not isinstance(stored, dict):
        raise ModelLoadError(f"{header.path}: the metadata {EMBEDDED_CONFIGS_KEY!r} is not a JSON object")
    return stored


def config_folder(family: str, configs: dict[str, dict[str, Any]]) -> Path:
    """A cached diffusers folder holding ``configs`` (by component) and the tokenizer files: the ``config=`` of
    ``from_single_file``. The same configs give the same folder, written once."""

    # The weights keep the file's dtype: a dtype in a config (the published text-encoder configs say float16)
    # would make transformers round float32 weights while loading them.
    kept = {name: {key: value for key, value in config.items() if key not in _DTYPE_KEYS}
            for name, config in configs.items()}

    def write(folder: Path) -> None:
        for name, config in kept.items():
            target = folder / component_file(name)
            if name.startswith("tokenizer"):
                write_tokenizer_files(target.parent, config)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return cached_folder("model-configs", content_key(family, kept), write)


def resolve_single_file(path: Path, wanted: str) -> tuple[str, Path]:
    """The family of the base model in ``path`` (checked against ``wanted``, "auto" accepted) and the config folder
    to load it with (:func:`config_folder` of :func:`file_configs`). Only the file's header is read.

    Raises:
        ModelLoadError: an unreadable file, not a base model, a family that contradicts ``wanted``, or shapes that
            do not fit the family.
    """
    header = read_header(path)
    family = check_family(path, file_family(header), wanted, exact=True)
    return family, config_folder(family, file_configs(header, family))


def load_single_file_pipeline(path: Path, family: str, config: Path, skip: tuple[str, ...] = (),
                              error: type[ModelLoadError] = ModelLoadError) -> Any:
    """Load ``path`` as a diffusers pipeline of ``family`` with ``config`` (a local folder), offline.

    The file is read once for every component. Components named in ``skip`` (and the safety checker, feature
    extractor and image encoder) are not built.

    Raises:
        error: diffusers cannot load the file with these configs.
    """
    import diffusers

    pipeline = getattr(diffusers, family_info(family).diffusers_pipeline)  # SD1/SD2 or SDXL's pipeline
    signature = inspect.signature(pipeline.__init__).parameters
    options: dict[str, Any] = {name: None for name in (*_NEVER_LOADED, *skip) if name in signature}
    options.update({flag: False for flag in ("requires_safety_checker", "add_watermarker") if flag in signature})
    try:
        return pipeline.from_single_file(str(path), config=str(config), local_files_only=True, **options)
    except Exception as exc:  # diffusers raises ValueError, OSError, SingleFileComponentError, ...
        raise error(f"{path}: cannot be loaded as an {FAMILY_LABELS[family]} checkpoint ({type(exc).__name__}: "
                    f"{exc})") from exc
