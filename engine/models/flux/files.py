"""Reading FLUX.1 / Chroma component files: headers, prefixes, fp8 storage and what a file is not.

Every loader of this package reads through here, so that the same rules hold for the transformer, the AE and the
text encoders (spec §1.7, §1.8):

* ``.safetensors`` and BFL's ``.sft`` (the same format) are read tensor by tensor, each cast as it is read, so a
  24 GB transformer never sits in memory twice; pickled ``.ckpt``/``.pt`` files load through
  ``engine.models.single_file``.
* ``float8_e4m3fn`` tensors stay as they are when the caller keeps fp8 storage, else they are cast up to the load
  dtype; every other fp8 kind (``e5m2``, ``...fnuz``) and "scaled fp8" files are refused, naming the file.
* LoRA files and Textual Inversion embeddings are refused as base models with the same advice as for SD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.single_file import SINGLE_FILE_SUFFIXES, FileHeader, ModelLoadError, adapter_kind, read_header

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLUX_FILE_SUFFIXES",
    "TRANSFORMER_PREFIX",
    "assemble_transformer",
    "base_model_header",
    "check_not_adapter",
    "hub_snapshot",
    "read_flux_header",
    "read_state",
    "stripped_keys",
    "transformer_shards",
]

FLUX_FILE_SUFFIXES = frozenset({".sft", *SINGLE_FILE_SUFFIXES})
TRANSFORMER_PREFIX = "model.diffusion_model."  # ComfyUI's whole-checkpoint prefix, stripped per key (spec §1.8.1)
_SAFETENSORS = {".safetensors", ".sft"}
# The fp8 kinds safetensors names in a header; only e4m3fn is supported (sd-scripts raises on the others).
_FP8_HEADER_KINDS = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
                     "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu"}
_SUPPORTED_FP8 = "float8_e4m3fn"


def read_flux_header(path: Path, what: str) -> FileHeader:
    """Shapes and metadata of ``path`` (only the header of a safetensors file is read).

    Args:
        path: the file.
        what: the config key it came from ("model.ae", ...), for messages.

    Raises:
        ModelLoadError: a missing file, an unsupported type, an unreadable file, or an fp8 kind other than e4m3fn.
    """
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (from {what}); check the path")
    suffix = path.suffix.lower()
    if suffix not in FLUX_FILE_SUFFIXES:
        raise ModelLoadError(f"{path}: unsupported file type {suffix or '(none)'} for {what}; use a .safetensors or "
                             ".sft file")
    if suffix not in _SAFETENSORS:
        return read_header(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            shapes = {key: tuple(piece.get_shape()) for key, piece in slices.items()}
            dtypes = {key: piece.get_dtype() for key, piece in slices.items()}
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # safetensors signals damage with several types
        raise ModelLoadError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    for key, kind in dtypes.items():
        name = _FP8_HEADER_KINDS.get(kind.upper())
        if name is not None and name != _SUPPORTED_FP8:
            raise _fp8_error(path, key, name)
    return FileHeader(path, shapes, metadata)


def base_model_header(path: Path, what: str) -> FileHeader | None:
    """The header of a file that may be a base model, for detection; None for a LoRA or an embedding (the loaders
    say what to do with those).

    Raises:
        ModelLoadError: as :func:`read_flux_header`.
    """
    header = read_flux_header(path, what)
    return None if adapter_kind(set(header.shapes)) is not None else header


def transformer_shards(folder: Path, what: str, label: str, single_file: str) -> tuple[Path, list[Path]]:
    """(the transformer folder, its .safetensors shards) of a diffusers folder (``transformer/``, or the folder itself).

    Raises:
        ModelLoadError: no shards there, naming ``label`` (the model kind) and ``single_file`` (the other choice).
    """
    transformer = folder / "transformer" if (folder / "transformer").is_dir() else folder
    shards = sorted(transformer.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{folder}: no transformer weights (expected transformer/*.safetensors of a diffusers "
                             f"{label} folder); point {what} at the folder or at {single_file}")
    return transformer, shards


def stripped_keys(keys: Iterable[str], prefix: str = TRANSFORMER_PREFIX) -> dict[str, str]:
    """Key without ``prefix`` → key in the file; the prefix is stripped per key, not judged from the first key."""
    return {key.removeprefix(prefix): key for key in keys}


def check_not_adapter(header: FileHeader, what: str, base: str = "FLUX.1/Chroma") -> None:
    """Refuse LoRA / LyCORIS files and Textual Inversion embeddings given as a base model or component.

    Args:
        header: the file's header.
        what: the config key it came from, for messages.
        base: what the file should have been ("SD3/SD3.5" for the SD3 loaders), for messages.

    Raises:
        ModelLoadError: naming the file and the config key to use instead.
    """
    keys = set(header.shapes)
    kind = adapter_kind(keys)
    if kind == "LoRA":
        raise ModelLoadError(f"{header.path}: this is a LoRA file, not a base model: put it in "
                             f"network.network_weights and set {what} to the {base} file it was trained on")
    if kind is not None:
        raise ModelLoadError(f"{header.path}: this is a Textual Inversion embedding, not a model file ({what})")
    if "scaled_fp8" in keys or any(key.endswith(".scale_weight") for key in keys):
        raise ModelLoadError(f"{header.path}: a 'scaled fp8' file ({what}); these store per-tensor scales that "
                             "sd-scripts does not support either. Use the plain fp16/bf16 or float8_e4m3fn file")


def read_state(path: Path, keys: Mapping[str, str], *, dtype: Any, keep_fp8: bool = False) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (name wanted → key in the file) of ``path``, each cast to ``dtype`` as it is read.

    Args:
        path: a .safetensors/.sft file (read tensor by tensor) or a pickled checkpoint.
        keys: which tensors to read and what to call them.
        dtype: the floating dtype to load in (a torch dtype; None keeps the file's); integer tensors keep theirs.
        keep_fp8: keep ``float8_e4m3fn`` tensors as they are (fp8 storage) instead of casting them up.

    Raises:
        ModelLoadError: an unreadable file or an unsupported fp8 kind (naming the tensor).
    """
    import torch

    def cast(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.float8_e4m3fn and keep_fp8:
            return tensor
        if tensor.dtype.is_floating_point and tensor.element_size() == 1 and tensor.dtype != torch.float8_e4m3fn:
            raise _fp8_error(path, key, str(tensor.dtype).removeprefix("torch."))
        return tensor.to(dtype) if dtype is not None and tensor.dtype.is_floating_point else tensor

    try:
        if path.suffix.lower() in _SAFETENSORS:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return {name: cast(key, handle.get_tensor(key)) for name, key in keys.items()}
        from engine.models.single_file import read_tensors

        state = read_tensors(path, list(keys.values()))
        return {name: cast(key, state[key]) for name, key in keys.items()}
    except ModelLoadError:
        raise
    except Exception as error:  # safetensors and torch.load signal damage with many types
        raise ModelLoadError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error


def assemble_transformer(tensors: Mapping[str, tuple[Path, str]], where: Path, *, dtype: Any, device: str, fp8: bool,
                         convert: Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], list[str]]] | None,
                         params_from_shapes: Callable[[dict[str, tuple[int, ...]]], Any], model_class: Any,
                         label: str) -> Any:
    """A transformer module built on the meta device and filled with its files' tensors (FLUX's and SD3's loaders).

    Args:
        tensors: prefix-free key → (file, key in the file).
        where: the file or transformer folder, for messages.
        dtype, device, fp8: load dtype, target device, keep ``float8_e4m3fn`` weights as fp8 storage.
        convert: diffusers → training-naming converter returning (state, left-over keys); None when the tensors are
            already in training naming.
        params_from_shapes: the model's sizes from its state dict's shapes (raises ValueError when they are no model).
        model_class: the module class, built from those params.
        label: what the model is ("FLUX transformer", "SD3 MMDiT"), for messages.

    Raises:
        ModelLoadError: the tensors do not form a whole model of the shape their keys describe.
    """
    import torch

    by_file: dict[Path, dict[str, str]] = {}
    for name, (path, key) in tensors.items():
        by_file.setdefault(path, {})[name] = key
    state: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        state.update(read_state(path, keys, dtype=dtype, keep_fp8=fp8))
    if convert is not None:
        state, leftover = convert(state)
        if leftover:
            shown = ", ".join(leftover[:5]) + (" ..." if len(leftover) > 5 else "")
            raise ModelLoadError(f"{where}: diffusers transformer keys with no {label} equivalent: {shown}")
    try:
        params = params_from_shapes({key: tuple(tensor.shape) for key, tensor in state.items()})
    except ValueError as error:
        raise ModelLoadError(f"{where}: {error}") from error
    with torch.device("meta"):
        model = model_class(params)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ModelLoadError(f"{where}: the weights do not form a whole {label} ({error})") from error
    return model.to(device).eval()


def hub_snapshot(repo_id: str, what: str, label: str, single_file: str) -> Path:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache; never a download.

    Args:
        repo_id: the hub id given as ``what``.
        what: the config key, for messages.
        label: the model kind ("FLUX", "SD3"), for messages.
        single_file: what else ``what`` may point at ("its BFL .safetensors file"), for messages.

    Raises:
        ModelLoadError: not cached, saying how to download it on a machine with network.
    """
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:  # huggingface_hub raises several types (LocalEntryNotFoundError, OSError, ...)
        raise ModelLoadError(
            f"{repo_id!r} is not a local file or folder and, read as a Hugging Face id, it is not in the local "
            f"Hugging Face cache ({type(error).__name__}). {label} models are large and gated: download it on a "
            f"machine with network (`hf download {repo_id} --local-dir models/{repo_id.split('/')[-1]}`) and point "
            f"{what} at that folder or at {single_file}") from error


def _fp8_error(path: Path, key: str, kind: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: tensor {key!r} is stored as {kind}; only float8_e4m3fn fp8 files are supported "
                          "(as in sd-scripts). Use the fp16/bf16 file or a float8_e4m3fn one")
