"""Writing and reading trained network files (LoRA, LyCORIS, embeddings) the way sd-scripts does (spec §5.3, §8).

safetensors files carry the metadata plus sd-webui-additional-networks' precomputed hashes; ckpt and pt files
are a plain `torch.save(state_dict)` without metadata, exactly as sd-scripts writes them.

Files are written atomically (a temporary file in the same folder, then a rename), so a crash or a reader never
sees half a file. This module overwrites whatever is at the target path: callers must make sure it is an output
of this run and never a file the user gave as input (e.g. the network_weights a run starts from).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from engine.files import atomic_write_bytes
from engine.networks.metadata import legacy_hash_of_bytes

NETWORK_FORMATS = ("safetensors", "ckpt", "pt")

# save_precision -> dtype of the saved tensors (sd-scripts' `match args.save_precision`).
SAVE_DTYPES: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_dtype(name: str | None) -> torch.dtype | None:
    """The dtype for save_precision "float", "fp16" or "bf16"; None (sd-scripts' default) keeps each tensor's own."""
    if name is None:
        return None
    try:
        return SAVE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown save_precision {name!r}; expected one of {', '.join(SAVE_DTYPES)}") from None


def additional_networks_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """sshs_model_hash and sshs_legacy_hash, as sd-scripts' `precalculate_safetensors_hashes` computes them.

    The tensors are serialised with only the ss_* metadata, so that user-editable keys (modelspec title,
    description, ...) can change without changing the hashes; then the model hash is the sha256 of the bytes after
    the safetensors header, and the legacy hash the first 8 hex digits of sha256 over 64 KiB at offset 1 MiB.
    """
    training_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = safetensors_bytes(dict(tensors), training_only)
    header_length = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header_length:]).hexdigest(),
            "sshs_legacy_hash": legacy_hash_of_bytes(data)}


def _safetensors_file(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    complete = {**metadata, **additional_networks_hashes(tensors, metadata)}
    return safetensors_bytes(tensors, complete)


def _torch_file(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)  # sd-scripts writes no metadata into ckpt/pt network files
    return buffer.getvalue()


_WRITERS: dict[str, Callable[[dict[str, torch.Tensor], Mapping[str, str]], bytes]] = {
    "safetensors": _safetensors_file, "ckpt": _torch_file, "pt": _torch_file,
}


def network_file_path(path: str | Path, save_as: str) -> Path:
    """`path` with the extension of `save_as`; a network extension already on it is replaced, other dots kept."""
    path = Path(path)
    if path.suffix.lower().lstrip(".") in NETWORK_FORMATS:
        path = path.with_suffix("")
    return path.with_name(f"{path.name}.{save_as}")


def save_network_file(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                      save_as: str) -> Path:
    """Write a network file atomically and return its path (the extension follows `save_as`).

    Tensors are written as given: convert them with `save_dtype` first. The target is overwritten; never pass
    a path the user gave as an input (see the module docstring).

    Args:
        metadata: str -> str only (safetensors' rule); ignored for ckpt and pt, as in sd-scripts.
        save_as: "safetensors", "ckpt" or "pt".
    """
    if save_as not in _WRITERS:
        raise ValueError(f"network files are saved as {', '.join(NETWORK_FORMATS)}, not {save_as!r}")
    wrong = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if wrong:
        raise TypeError(f"metadata values must be strings; not for {', '.join(map(str, wrong[:5]))}")
    prepared = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    target = network_file_path(path, save_as)
    atomic_write_bytes(target, _WRITERS[save_as](prepared, metadata))
    return target


def read_network_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a network file; ckpt/pt files have no metadata and give an empty dict."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), dict(metadata)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} is not a plain state dict of tensors (name -> tensor)")
    return state, {}
