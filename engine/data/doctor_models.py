"""The doctor's model-file checks: before any GPU time, the files a model family needs exist and fit together.

FLUX.1 and Chroma come as separate files (`model.pretrained_model_name_or_path` the transformer, `model.clip_l`,
`model.t5xxl`, `model.ae`), SD3 / SD3.5 as a single file with or without its text encoders (engine.data.doctor_sd3);
a wrong or missing one otherwise shows up minutes into a run, after the text encoders have loaded. Only file headers
are read, in plain Python (the 8-byte length and the JSON after it): the doctor runs in the GUI process, which never
imports torch or safetensors. Each finding names the config field and says what to do. Which check runs is chosen
by the family's loader (`FamilyInfo.loader`), never by its name, in engine.data.model_findings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.base import field_families
from engine.config.choices import family_label
from engine.config.io import resolve_path
from engine.config.schema import RunConfig
from engine.data.model_kinds import flux_family_of, model_kind
from engine.data.records import Finding
from engine.models.families import family_info
from engine.models.flux.files import TRANSFORMER_PREFIX, check_not_adapter
from engine.models.single_file import FileHeader, ModelLoadError, adapter_kind

__all__ = ["HEADER_FILES", "LOCATION", "ModelChecker", "file_header", "flux_family_of", "flux_model_findings",
           "read_safetensors_header", "safetensors_header_json", "suffixed"]

HEADER_FILES = (".safetensors", ".sft")  # files whose header can be read without torch
_MODEL_FILES = (*HEADER_FILES, ".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # a real header is a few MB at most; more means it is no safetensors file
LOCATION = "model.pretrained_model_name_or_path"
_FAMILY = "model.model_family"
# Widths the text encoders must match: the transformer's text input (T5) and pooled-vector input (CLIP-L), in BFL
# and in diffusers naming (prefix-free), as [out, in] weights.
_T5_INPUT = ("txt_in.weight", "context_embedder.weight")
_CLIP_INPUT = ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight")


def safetensors_header_json(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors/.sft file (each tensor's dtype, shape and offsets, and ``__metadata__``),
    read in plain Python: no safetensors, no torch, so the GUI process can call it.

    Raises:
        OSError, ValueError: the file cannot be read or is no safetensors file.
    """
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= _MAX_HEADER:
            raise ValueError(f"a header length of {size} bytes: not a safetensors file")
        header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError("a header that is not a JSON object: not a safetensors file")
    return header


def file_header(path: Path, header: Mapping[str, Any]) -> FileHeader:
    """Tensor shapes and metadata from a :func:`safetensors_header_json` result."""
    shapes = {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
    return FileHeader(path, shapes, dict(header.get("__metadata__") or {}))


def read_safetensors_header(path: Path) -> FileHeader:
    """Tensor shapes and metadata of a .safetensors/.sft file, from its header only, without safetensors or torch.

    Raises:
        ModelLoadError: the file cannot be read or is no safetensors file (the message names it).
    """
    try:
        return file_header(path, safetensors_header_json(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from error


@dataclass
class ModelChecker:
    """The findings of one config's model files, and the widths read so far (to check that the files fit)."""

    config: RunConfig
    base_dir: Path
    family: str
    findings: list[Finding]

    def error(self, path: Path | str, message: str, hint: str, code: str = "model-file") -> None:
        self.findings.append(Finding("error", code, str(path), message, hint))

    def header(self, field: str, what: str, *, component: bool = False) -> FileHeader | None:
        """The header of the file `field` names; None when it is unset, a folder or a hub id (the loader reads
        those), not a header file, or missing, a LoRA, or (for a `component`) a whole model (then a finding says
        so)."""
        value = getattr(self.config.model, field.split(".")[-1]).strip()
        if not value:
            return None
        path = resolve_path(value, self.base_dir)
        looks_local = path.suffix.lower() in _MODEL_FILES or value.startswith((".", "/", "~")) or path.exists()
        if not looks_local or path.is_dir():
            return None
        if not path.is_file():
            self.error(path, f"{field}: no such file", f"point {field} at {what}", "model-file-missing")
            return None
        if path.suffix.lower() not in HEADER_FILES:
            return None  # a pickled checkpoint needs torch to look inside; the loader checks it
        try:
            header = read_safetensors_header(path)
        except ModelLoadError as error:
            self.error(path, f"{field}: {error}", f"point {field} at {what}")
            return None
        problem = _not_a_model_file(header, field, what, component)
        if problem is not None:
            self.error(path, f"{field}: {problem}", f"point {field} at {what}")
            return None
        return header


def _not_a_model_file(header: FileHeader, field: str, what: str, component: bool) -> str | None:
    """Why a readable file cannot be `what`: a LoRA or an embedding, a scaled-fp8 file, or (for a component field)
    a whole model; None when none of these."""
    kind = adapter_kind(set(header.shapes))
    if kind is not None:
        name = "a LoRA file" if kind == "LoRA" else "a Textual Inversion embedding"
        return f"this is {name}, not {what} (a LoRA goes in network.network_weights)"
    try:
        check_not_adapter(header, field)  # what it still refuses: scaled-fp8 files
    except ModelLoadError as error:
        return str(error)
    whole = model_kind(header) if component else None
    return f"this is {whole}, not {what}" if whole else None


def _width(shapes: dict[str, tuple[int, ...]], names: tuple[str, ...], index: int) -> int | None:
    for name in names:
        if name in shapes and len(shapes[name]) > index:
            return shapes[name][index]
    return None


def suffixed(header: FileHeader, suffix: str) -> tuple[int, ...] | None:
    """The shape of the tensor whose key ends with `suffix` (components come with several key prefixes)."""
    return next((shape for key, shape in header.shapes.items() if key == suffix or key.endswith("." + suffix)), None)


def _flux_transformer(checker: ModelChecker) -> dict[str, tuple[int, ...]] | None:
    what = "the FLUX.1/Chroma transformer file (e.g. flux1-dev.safetensors)"
    header = checker.header(LOCATION, what)
    if header is None:
        return None
    found = flux_family_of(header)
    if found is None:
        other = model_kind(header)
        said = f"this is {other}, not" if other else "not"
        checker.error(header.path, f"{LOCATION}: {said} a FLUX.1/Chroma transformer (no double_blocks.* or "
                      f"transformer_blocks.* keys)", f"point {LOCATION} at {what}, or set {_FAMILY} to the "
                      "family of this file (or auto)")
        return None
    if found != checker.family:
        checker.error(header.path, f"{LOCATION}: this is a {family_label(found)} model, but {_FAMILY} is "
                      f"'{checker.family}'", f"set {_FAMILY} to {found} (or auto)")
        return None
    return {key.removeprefix(TRANSFORMER_PREFIX): shape for key, shape in header.shapes.items()}


def _check_clip_l(checker: ModelChecker, transformer: dict[str, tuple[int, ...]] | None) -> None:
    what = "CLIP-L's file (clip_l.safetensors)"
    header = checker.header("model.clip_l", what, component=True)
    if header is None:
        return
    embedding = suffixed(header, "embeddings.token_embedding.weight")
    if embedding is None or len(embedding) != 2:
        checker.error(header.path, "model.clip_l: not a CLIP text encoder (no embeddings.token_embedding)",
                      f"point model.clip_l at {what}")
        return
    wanted = _width(transformer or {}, _CLIP_INPUT, 1)
    if wanted is not None and embedding[1] != wanted:
        checker.error(header.path, f"model.clip_l: a text encoder {embedding[1]} wide, but the transformer takes a "
                      f"{wanted}-wide CLIP-L vector", "point model.clip_l at the CLIP-L file of this model "
                      "(clip_l.safetensors; not CLIP-G or another model's encoder)", "model-files-mismatch")


def _check_t5xxl(checker: ModelChecker, transformer: dict[str, tuple[int, ...]] | None) -> None:
    what = "T5-XXL's file (t5xxl_fp16.safetensors)"
    header = checker.header("model.t5xxl", what, component=True)
    if header is None:
        return
    shared = suffixed(header, "shared.weight")
    if shared is None or len(shared) != 2 or suffixed(header, "encoder.final_layer_norm.weight") is None:
        checker.error(header.path, "model.t5xxl: not a T5 encoder (no shared.weight / encoder.final_layer_norm)",
                      f"point model.t5xxl at {what}")
        return
    wanted = _width(transformer or {}, _T5_INPUT, 1)
    if wanted is not None and shared[1] != wanted:
        checker.error(header.path, f"model.t5xxl: a T5 {shared[1]} wide, but the transformer takes {wanted}-wide "
                      "text features (T5-XXL: 4096)", f"point model.t5xxl at {what}, not T5-base/large or "
                      "another model's encoder", "model-files-mismatch")


def _check_ae(checker: ModelChecker, transformer: dict[str, tuple[int, ...]] | None) -> None:
    what = "the FLUX autoencoder (ae.safetensors)"
    header = checker.header("model.ae", what, component=True)
    if header is None:
        return
    conv_out = suffixed(header, "encoder.conv_out.weight")
    if conv_out is None:
        checker.error(header.path, "model.ae: no autoencoder weights (no encoder.conv_out)",
                      f"point model.ae at {what}")
        return
    channels, wanted = conv_out[0] // 2, family_info(checker.family).latent_channels  # mean and log-variance
    if channels != wanted:
        checker.error(header.path, f"model.ae: an autoencoder with {channels} latent channels (an SD VAE?), but "
                      f"{family_label(checker.family)} needs its {wanted}-channel AE", f"point model.ae at {what}",
                      "model-files-mismatch")


# The component files by model field; each is checked for the families the field applies to (Chroma has no CLIP-L).
_FLUX_COMPONENTS: dict[str, Callable[[ModelChecker, dict[str, tuple[int, ...]] | None], None]] = {
    "clip_l": _check_clip_l, "t5xxl": _check_t5xxl, "ae": _check_ae}


def flux_model_findings(config: RunConfig, base_dir: Path, family: str) -> list[Finding]:
    """The transformer, CLIP-L, T5-XXL and AE files: each exists, is what its field says, and fits the transformer
    (text widths, latent channels). Unset fields are the config rules' business."""
    checker = ModelChecker(config, base_dir, family, [])
    transformer = _flux_transformer(checker)
    fields = type(config.model).model_fields
    for name, check in _FLUX_COMPONENTS.items():
        families = field_families(fields[name])
        if families is None or family in families:
            check(checker, transformer)
    return checker.findings
