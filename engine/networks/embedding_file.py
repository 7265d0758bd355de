"""Textual Inversion files: written the way sd-scripts writes them, read in every form A1111 and diffusers accept.

The tensors are the new token rows, one [num_vectors, dim] matrix per text encoder (spec §5.3 "TI files"):

* SD1/SD2: ``{"emb_params": [n, dim]}``, the key A1111 and diffusers' ``load_textual_inversion`` read;
* SDXL: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (first and second text encoder), A1111's SDXL form.

A ``.safetensors`` file carries only the ModelSpec metadata (sd-scripts writes no ``ss_*`` keys into embeddings).
A ``.pt``/``.ckpt`` file of a one-encoder embedding uses A1111's own ``string_to_param`` layout, which A1111,
ComfyUI and diffusers all read; an SDXL one is the plain ``{"clip_l", "clip_g"}`` dict, as sd-scripts saves it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from engine.files import atomic_write_bytes

EMBEDDING_FORMATS = ("safetensors", "ckpt", "pt")
SINGLE_KEY = "emb_params"
# The tensor names of an embedding file, one per text encoder, in the encoders' order.
EMBEDDING_KEYS: dict[str, tuple[str, ...]] = {"sd1": (SINGLE_KEY,), "sd2": (SINGLE_KEY,), "sdxl": ("clip_l", "clip_g")}
A1111_PLACEHOLDER = "*"
A1111_PLACEHOLDER_ID = 265  # the id of "*" in CLIP's vocabulary, which A1111 records in string_to_token


def embedding_keys(family: str) -> tuple[str, ...]:
    """The file's tensor names for a model family, one per text encoder."""
    try:
        return EMBEDDING_KEYS[family]
    except KeyError:
        raise ValueError(f"no embedding format for model family {family!r}; expected one of "
                         f"{', '.join(EMBEDDING_KEYS)}") from None


def _safetensors_file(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], name: str,
                      step: int | None) -> bytes:
    modelspec = {key: value for key, value in metadata.items() if key.startswith("modelspec.")}
    return safetensors_bytes(tensors, modelspec)


def _torch_file(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], name: str, step: int | None) -> bytes:
    # A1111's layout needs one tensor; an SDXL embedding has two and is saved as its plain dict (sd-scripts).
    content: dict = tensors if set(tensors) != {SINGLE_KEY} else {
        "string_to_token": {A1111_PLACEHOLDER: A1111_PLACEHOLDER_ID},
        "string_to_param": {A1111_PLACEHOLDER: tensors[SINGLE_KEY]},
        "name": name, "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None,
    }
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


_WRITERS: dict[str, Callable[[dict[str, torch.Tensor], Mapping[str, str], str, int | None], bytes]] = {
    "safetensors": _safetensors_file, "ckpt": _torch_file, "pt": _torch_file,
}


def save_embedding_file(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                        save_as: str, name: str, step: int | None = None) -> Path:
    """Write an embedding atomically and return its path (``path`` with the extension of ``save_as``).

    Args:
        tensors: ``{"emb_params"}`` or ``{"clip_l", "clip_g"}``, each [num_vectors, dim], already in the dtype to
            save (the target is overwritten: never pass a file the user gave as an input).
        metadata: the run's metadata; only its ``modelspec.*`` keys are written, and only into .safetensors.
        save_as: "safetensors", "ckpt" or "pt".
        name: the token, recorded as A1111's ``name`` in .pt/.ckpt files.
        step: the training step, recorded as A1111's ``step`` in .pt/.ckpt files.
    """
    if save_as not in _WRITERS:
        raise ValueError(f"embeddings are saved as {', '.join(EMBEDDING_FORMATS)}, not {save_as!r}")
    if set(tensors) not in ({SINGLE_KEY}, {"clip_l", "clip_g"}):
        raise ValueError(f"an embedding holds 'emb_params' or 'clip_l' and 'clip_g', not {sorted(tensors)}")
    prepared = {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
    target = Path(path)
    if target.suffix.lower().lstrip(".") in EMBEDDING_FORMATS:
        target = target.with_suffix("")
    target = target.with_name(f"{target.name}.{save_as}")
    atomic_write_bytes(target, _WRITERS[save_as](prepared, metadata, name, step))
    return target


def read_embedding_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The embedding's tensors as ``{"emb_params"}`` or ``{"clip_l", "clip_g"}``, each [num_vectors, dim].

    Reads what :func:`save_embedding_file` writes and A1111's ``string_to_param`` .pt files.

    Raises:
        ValueError: the file holds neither layout (e.g. a LoRA).
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        content: dict = load_file(str(path))
    else:
        content = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(content, dict) and isinstance(content.get("string_to_param"), dict):
        params = content["string_to_param"]
        if len(params) != 1:
            raise ValueError(f"{path}: an A1111 embedding with {len(params)} strings; expected one")
        content = {SINGLE_KEY: next(iter(params.values()))}
    for keys in ((SINGLE_KEY,), ("clip_l", "clip_g")):
        if isinstance(content, dict) and all(isinstance(content.get(key), torch.Tensor) for key in keys):
            return {key: _as_rows(content[key]) for key in keys}
    found = sorted(content)[:5] if isinstance(content, dict) else type(content).__name__
    raise ValueError(f"{path} is not a Textual Inversion embedding (expected 'emb_params', 'string_to_param' or "
                     f"'clip_l' and 'clip_g'; found {found})")


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A single vector saved as [dim] reads as [1, dim], so every embedding is [num_vectors, dim]."""
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
