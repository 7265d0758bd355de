"""Model files seen tensor by tensor, for the tools that work on a model's own keys (families whose loader is
"flux": a FLUX.1 / Chroma transformer in BFL layout, and its separate CLIP-L and T5 files; "sd3": a SAI single file
of SD3 / SD3.5, with or without its text encoders inside, and separate CLIP-L, CLIP-G and T5 files).

Such a model's LoRA names are its own key paths: ``lora_unet_<path with . -> _>`` names ``<path>.weight`` (spec
§5.1, §5.5), ``lora_te1_text_model_...`` a CLIP-L weight, ``lora_te3_encoder_block_...`` a T5 weight. So a LoRA
module is matched against the file's keys, as ComfyUI does, instead of against a loaded model's layers: a file's
keys may carry a prefix (ComfyUI's ``model.diffusion_model.``, ``text_encoders.clip_l.transformer.``), which is
found by trying the key without its leading parts, the key with the fewest parts dropped winning. Where one file
holds two encoders of one kind (SD3's all-in-one files: CLIP-L and CLIP-G), each prefix's modules are looked up only
under that encoder's own key prefix (``text_encoders.clip_g.transformer.``).

These files are large (FLUX.1 is 12B parameters, 24 GB in bf16), so they are read one tensor at a time and written
by :func:`write_streamed` without holding the whole model in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.sd3.files import EMBEDDED_PREFIXES
from engine.networks.lora_names import TEXT_ENCODER_PATH_PREFIX
from engine.networks.tools.lora_file import ToolError

if TYPE_CHECKING:
    import torch

__all__ = ["FILE_MODELS", "FileModelKind", "ModelFile", "NameIndex", "TensorInfo", "TextEncoderFile", "open_model_file",
           "output_dtype", "torch_dtype", "write_streamed"]

# The suffixes the file tools read and write: safetensors (BFL also names it .sft).
MODEL_FILE_SUFFIXES = (".safetensors", ".sft")
# safetensors' dtype names (the header's "dtype"), for the torch dtypes a model file may hold.
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool"}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. "BF16"


@dataclass
class ModelFile:
    """The header of a safetensors model file: its tensors' shapes and dtypes, and its metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: info.shape for key, info in self.tensors.items()}

    def size(self) -> int:
        """Bytes of tensor data (what a copy of the file needs on disk, roughly)."""
        return sum(_numel(info.shape) * _element_size(info.dtype) for info in self.tensors.values())


def open_model_file(path: str | Path, role: str) -> ModelFile:
    """Read the header of ``path`` (nothing else); ``role`` ("base model", "--clip-l") names it in errors.

    Raises:
        ToolError: a missing file, another format, or an unreadable header.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ToolError(f"{role} {path} is a folder; these tools work on the model's single file (for FLUX.1/Chroma "
                        "the BFL transformer file, e.g. flux1-dev.safetensors, with --clip-l/--t5xxl files; for "
                        "SD3/SD3.5 the SAI single file, e.g. sd3.5_large.safetensors)")
    if not path.is_file():
        raise ToolError(f"{role} {path}: no such file; check the path")
    if path.suffix.lower() not in MODEL_FILE_SUFFIXES:
        raise ToolError(f"{role} {path}: the LoRA tools read these models as {' or '.join(MODEL_FILE_SUFFIXES)} "
                        "files; convert it to safetensors first")
    try:
        with path.open("rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error) as error:
        raise ToolError(f"{role} {path}: cannot be read as safetensors ({type(error).__name__}: {error})") from error
    metadata = header.pop("__metadata__", None) or {}
    tensors = {key: TensorInfo(tuple(entry["shape"]), entry["dtype"]) for key, entry in header.items()}
    return ModelFile(path, tensors, {str(key): str(value) for key, value in metadata.items()})


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _element_size(dtype: str) -> int:
    import torch

    return getattr(torch, _DTYPE_NAMES.get(dtype, "float32")).itemsize


# --- kinds of model files ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderFile:
    """A text encoder kept in its own file, which a LoRA's ``<prefix>_`` modules change."""

    label: str  # "CLIP-L"
    option: str  # the command-line stem: --clip-l FILE, --clip-l-save-to NEW_FILE
    embedded: str = ""  # its key prefix inside an all-in-one model file, where several encoders share key names


@dataclass(frozen=True)
class FileModelKind:
    """How the file tools handle one ``FamilyInfo.loader`` kind's model files.

    Attributes:
        layout_problem: why a file cannot be used as this kind's denoiser (another layout, no such model), or None.
        denoiser: the denoiser built from the file's shapes on the meta device (no weights), whose layers and kohya
            names (``engine.networks.lora_names``) are the ones a LoRA trains.
        variant: the file's variant ("dev", "schnell", ...; modelspec architectures differ by it).
        text_encoder_files: the text encoders kept in separate files, by kohya LoRA prefix.
    """

    layout_problem: Callable[[ModelFile], str | None]
    denoiser: Callable[[ModelFile], Any]
    variant: Callable[[ModelFile], str]
    text_encoder_files: Mapping[str, TextEncoderFile]


def _flux_keys(model: ModelFile) -> dict[str, tuple[int, ...]]:
    from engine.models.flux.files import stripped_keys

    return {name: model.tensors[key].shape for name, key in stripped_keys(model.tensors).items()}


def _flux_layout_problem(model: ModelFile) -> str | None:
    from engine.models.flux.convert import transformer_layout

    layout = transformer_layout(_flux_keys(model))
    if layout == "bfl":
        return None
    if layout == "diffusers":
        return ("holds a FLUX transformer in diffusers naming; the LoRA tools work on the BFL single file (as "
                "published: flux1-dev.safetensors, Chroma.safetensors), whose keys the LoRA names follow")
    return "holds no FLUX.1/Chroma transformer (no double_blocks.* keys)"


def _flux_params(model: ModelFile) -> Any:
    from engine.models.flux.params import params_from_state_dict

    try:
        return params_from_state_dict(_flux_keys(model))
    except ValueError as error:
        raise ToolError(f"{model.path}: {error}") from error


def _flux_denoiser(model: ModelFile) -> Any:
    import torch

    from engine.models.flux.transformer import Flux

    with torch.device("meta"):
        return Flux(_flux_params(model))


def _flux_variant(model: ModelFile) -> str:
    params = _flux_params(model)
    if params.chroma:
        return "chroma"
    return "dev" if params.guidance_embed else "schnell"


def _sd3_keys(model: ModelFile) -> dict[str, tuple[int, ...]]:
    """The MMDiT's keys without the SAI prefix (an all-in-one file's text encoders and VAE left out)."""
    from engine.models.sd3.params import SAI_PREFIX

    prefixed = any(key.startswith(SAI_PREFIX) for key in model.tensors)
    return {key.removeprefix(SAI_PREFIX): info.shape for key, info in model.tensors.items()
            if key.startswith(SAI_PREFIX) or not prefixed}


def _sd3_layout_problem(model: ModelFile) -> str | None:
    from engine.models.sd3.convert import transformer_layout

    layout = transformer_layout(_sd3_keys(model))
    if layout == "sai":
        return None
    if layout == "diffusers":
        return ("holds an SD3 transformer in diffusers naming; the LoRA tools work on the SAI single file (as "
                "published: sd3.5_large.safetensors, sd3_medium.safetensors), whose keys the LoRA names follow")
    return "holds no SD3/SD3.5 MMDiT (no joint_blocks.* keys)"


def _sd3_params(model: ModelFile) -> Any:
    from engine.models.sd3.params import params_from_state_dict

    try:
        return params_from_state_dict(_sd3_keys(model))
    except ValueError as error:
        raise ToolError(f"{model.path}: {error}") from error


def _sd3_denoiser(model: ModelFile) -> Any:
    import torch

    from engine.models.sd3.mmdit import MMDiT

    with torch.device("meta"):
        return MMDiT(_sd3_params(model))


def _sd3_variant(model: ModelFile) -> str:
    return _sd3_params(model).variant


# FamilyInfo.loader -> how its files are handled; a loader not listed ("ldm") goes through load_model instead.
FILE_MODELS: dict[str, FileModelKind] = {
    "flux": FileModelKind(_flux_layout_problem, _flux_denoiser, _flux_variant,
                          {"lora_te1": TextEncoderFile("CLIP-L", "clip-l"),
                           "lora_te3": TextEncoderFile("T5-XXL", "t5xxl")}),
    "sd3": FileModelKind(_sd3_layout_problem, _sd3_denoiser, _sd3_variant,
                         {"lora_te1": TextEncoderFile("CLIP-L", "clip-l", EMBEDDED_PREFIXES["clip_l"]),
                          "lora_te2": TextEncoderFile("CLIP-G", "clip-g", EMBEDDED_PREFIXES["clip_g"]),
                          "lora_te3": TextEncoderFile("T5-XXL", "t5xxl", EMBEDDED_PREFIXES["t5xxl"])}),
}


# --- LoRA names -> keys ---------------------------------------------------------------------------------------------


class NameIndex:
    """kohya module name -> the file key (``<path>.weight``) it changes, for one LoRA prefix (``lora_unet``, ...).

    A key with leading parts (``model.diffusion_model.double_blocks.0...``) is also tried without them; a CLIP key
    without the ``text_model.`` wrapper also under it (kohya's CLIP names always have it). The candidate with the
    fewest changes wins; two keys that give one name equally well make that name ambiguous (no key). With ``under``,
    only keys that start with it are indexed, from after it.
    """

    def __init__(self, model: ModelFile, prefix: str, under: str = "") -> None:
        best: dict[str, tuple[int, str | None]] = {}
        for key, info in model.tensors.items():
            if not key.endswith(".weight") or len(info.shape) < 2 or not key.startswith(under):
                continue  # LoRA changes Linear and conv weights only
            for cost, path in _candidate_paths(key.removeprefix(under).removesuffix(".weight")):
                name = f"{prefix}.{path}".replace(".", "_")
                known = best.get(name)
                if known is None or cost < known[0]:
                    best[name] = (cost, key)
                elif cost == known[0] and known[1] != key:
                    best[name] = (cost, None)
        self.model = model
        self.prefix = prefix
        self._keys = {name: key for name, (_, key) in best.items()}

    def key(self, name: str) -> str | None:
        return self._keys.get(name)

    def is_ambiguous(self, name: str) -> bool:
        return name in self._keys and self._keys[name] is None


def _candidate_paths(path: str) -> Iterator[tuple[int, str]]:
    """(cost, path): the path, then without 1, 2, ... leading parts; each also inside CLIP's ``text_model.``."""
    parts = path.split(".")
    for dropped in range(len(parts)):
        rest = ".".join(parts[dropped:])
        yield 2 * dropped, rest
        if not rest.startswith(TEXT_ENCODER_PATH_PREFIX):
            yield 2 * dropped + 1, TEXT_ENCODER_PATH_PREFIX + rest


# --- writing ----------------------------------------------------------------------------------------------------------


def output_dtype(info: TensorInfo, save_dtype: torch.dtype | None) -> str:
    """The safetensors dtype a tensor is written in: ``save_dtype`` for floating tensors, else its own."""
    if save_dtype is None or not info.dtype.startswith(("F", "BF")):
        return info.dtype
    return next(name for name, torch_name in _DTYPE_NAMES.items() if torch_name == str(save_dtype).split(".")[-1])


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPE_NAMES[name])


def write_streamed(path: Path, layout: Mapping[str, TensorInfo], tensors: Callable[[str], torch.Tensor],
                   metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file whose tensors are made one at a time, so the model is never whole in memory.

    Args:
        path: the new file (written under a temporary name and renamed: never half a file).
        layout: every tensor's shape and safetensors dtype, in file order.
        tensors: key -> the tensor, called once per key in order; it must have the layout's shape and dtype.
        metadata: the header's ``__metadata__`` (strings).

    Raises:
        ToolError: the disk cannot hold the file.
    """
    from engine.files import DiskFullError, atomic_output, disk_full_named, ensure_free_space

    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key, info in layout.items():
        size = _numel(info.shape) * _element_size(info.dtype)
        header[key] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes with spaces
    try:
        ensure_free_space(path.parent, offset + len(text))
        with disk_full_named(path.parent), atomic_output(path) as temporary, temporary.open("wb") as stream:
            stream.write(struct.pack("<Q", len(text)))
            stream.write(text)
            for key, info in layout.items():
                stream.write(_raw_bytes(key, tensors(key), info))
    except DiskFullError as error:
        raise ToolError(f"{path}: {error}; free some space or write the output to another disk") from error
    return path


def _raw_bytes(key: str, tensor: torch.Tensor, info: TensorInfo) -> memoryview:
    import torch

    if tuple(tensor.shape) != info.shape or tensor.dtype != torch_dtype(info.dtype):
        raise RuntimeError(f"{key}: made a {tuple(tensor.shape)} {tensor.dtype} tensor, planned {info}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
