"""What every LoRA tool shares: reading kohya files into per-module weights, telling formats apart, and writing
results to new files only.

A kohya module is three tensors (spec §5.1): ``<name>.lora_down.weight`` ([r, in] or [r, in, kh, kw]),
``<name>.lora_up.weight`` ([out, r] or [out, r, 1, 1]) and ``<name>.alpha``; its change to the layer's weight is
``alpha/r * up @ down`` (spec §5.2). Flattening ``down`` to [r, in*kh*kw] makes that one matrix product for Linear,
1x1 and 3x3 convolutions alike: it equals kohya's ``conv2d(down.permute(1, 0, 2, 3), up)`` for 3x3 kernels.

The tools never overwrite: an output that exists, or that is one of the inputs, is refused before any work starts.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.models.ldm_checkpoint import detect_family
from engine.models.single_file import FAMILY_LABELS
from engine.networks.lora_flux import block_of
from engine.networks.lora_sd3 import joint_block_of
from engine.networks.network_file import NETWORK_FORMATS, read_network_file, save_network_file

__all__ = [
    "KohyaLoRA",
    "LoRASource",
    "LoRAWeights",
    "ToolError",
    "count_parts",
    "count_values",
    "describe_file",
    "detect_format",
    "module_group",
    "module_part",
    "new_output",
    "non_finite_modules",
    "parse_kohya",
    "parse_lora_source",
    "read_kohya_lora",
    "read_weights_file",
    "some_names",
    "summary_stats",
    "write_lora",
]

LORA_SUFFIXES = tuple(f".{name}" for name in NETWORK_FORMATS)
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PART_PATTERN = re.compile(r"^lora_(unet|te\d*)_")


class ToolError(ValueError):
    """A LoRA tool cannot do what was asked; the message names the file and says what to do."""


@dataclass
class LoRAWeights:
    """One kohya module: ``down``, ``up`` and ``alpha`` (0 means alpha = rank, kohya's rule for old files)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    @property
    def is_spatial_conv(self) -> bool:
        """A conv with a kernel larger than 1x1 (kohya gives those conv_dim/conv_alpha)."""
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the layer weight this module changes: [out, in] or [out, in, kh, kw]."""
        return (int(self.up.shape[0]), *(int(size) for size in self.down.shape[1:]))

    def delta(self) -> torch.Tensor:
        """``alpha/rank * up @ down`` in float32, shaped like the layer's weight (spec §5.2)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down * self.scale).reshape(self.weight_shape)

    def tensors(self, name: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The module's file tensors; alpha stays float32 so that alpha/rank is exact whatever the save dtype."""
        return {f"{name}.lora_down.weight": self.down.to(dtype or self.down.dtype).contiguous(),
                f"{name}.lora_up.weight": self.up.to(dtype or self.up.dtype).contiguous(),
                f"{name}.alpha": torch.tensor(float(self.alpha), dtype=torch.float32)}


@dataclass
class KohyaLoRA:
    """A kohya LoRA/LoCon file: its modules by name and its metadata."""

    path: Path
    modules: dict[str, LoRAWeights]
    metadata: dict[str, str]


@dataclass(frozen=True)
class LoRASource:
    """A LoRA file given on the command line as ``PATH[:RATIO]``."""

    path: Path
    ratio: float = 1.0

    @property
    def label(self) -> str:
        """``name.safetensors:0.5`` for metadata and reports (the file name, not the local folder)."""
        return f"{self.path.name}:{self.ratio:g}"


def parse_lora_source(text: str) -> LoRASource:
    """``PATH`` or ``PATH:RATIO``; a colon not followed by a number belongs to the path (``C:\\loras\\x``)."""
    path, colon, ratio = text.rpartition(":")
    if colon:
        try:
            return LoRASource(Path(path).expanduser(), float(ratio))
        except ValueError:
            pass
    return LoRASource(Path(text).expanduser())


# --- reading -----------------------------------------------------------------------------------------------------


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors/.ckpt/.pt file; a missing or unreadable file is a ToolError."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"{path}: no such file; check the path")
    try:
        return read_network_file(path)
    except Exception as error:  # safetensors and torch.load report damage with many types
        raise ToolError(f"{path}: cannot be read as safetensors or a torch state dict ({type(error).__name__}: "
                        f"{error}); is it a LoRA file?") from error


def parse_kohya(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, LoRAWeights], list[str], list[str]]:
    """(modules by name, unknown keys, problems) of a kohya state dict; problems are damaged modules."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if part in _KOHYA_PARTS:
            groups.setdefault(name, {})[_KOHYA_PARTS[part]] = tensor
        else:
            unknown.append(key)
    modules, problems = {}, []
    for name, parts in groups.items():
        problem = _module_problem(name, parts)
        if problem:
            problems.append(problem)
            continue
        alpha = parts.get("alpha")
        modules[name] = LoRAWeights(parts["down"], parts["up"], float(alpha) if alpha is not None else 0.0)
    return modules, unknown, problems


def _module_problem(name: str, parts: Mapping[str, torch.Tensor]) -> str | None:
    missing = [f"lora_{part}.weight" for part in ("down", "up") if part not in parts]
    if missing:
        return f"module {name} has no {' or '.join(missing)}"
    down, up = parts["down"], parts["up"]
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.flatten(1).shape[1] != down.shape[0]:
        return (f"module {name}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} do not fit together "
                "(expected [out, r] and [r, in], or [out, r, 1, 1] and [r, in, kh, kw])")
    return None


def read_kohya_lora(path: str | Path, *, action: str) -> KohyaLoRA:
    """Read a kohya LoRA/LoCon file for a tool that changes it.

    Args:
        action: what the tool does ("merged", "resized"), for the message when the file is something else.

    Raises:
        ToolError: unreadable, another format (LyCORIS, an embedding, a model), a damaged module, NaN/inf weights
            or keys beyond down/up/alpha.
    """
    path = Path(path)
    tensors, metadata = read_weights_file(path)
    modules, unknown, problems = parse_kohya(tensors)
    if not modules:
        raise ToolError(f"{path} is {describe_file(tensors)}, not a kohya LoRA/LoCon; only those can be {action} "
                        "(check it with `python -m engine lora inspect`)")
    if problems:
        raise ToolError(f"{path}: {problems[0]}; the file is damaged, re-save it from its source")
    bad = non_finite_modules(tensors)
    if bad:
        raise ToolError(f"{path}: NaN or inf weights in {some_names(bad)}; this LoRA is broken (retrain it or use an "
                        "earlier save)")
    if unknown:
        # e.g. LyCORIS' lora_mid (Tucker) or DoRA's dora_scale: leaving them out would change what the LoRA does.
        raise ToolError(f"{path} has keys that are not plain kohya LoRA weights: {some_names(unknown)}; it cannot be "
                        f"{action} without changing what it does")
    return KohyaLoRA(path, modules, metadata)


def non_finite_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names (the key before the first dot) whose tensors hold NaN or inf, in file order."""
    names: dict[str, None] = {}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            names[key.partition(".")[0]] = None
    return list(names)


def module_part(name: str) -> str:
    """The model part a kohya module name belongs to: "unet", "te", "te1", "te2", ... or "other"."""
    match = _PART_PATTERN.match(name)
    return match.group(1) if match else "other"


def module_group(name: str) -> str:
    """What a module is counted under in reports: a FLUX transformer block kind ("double", "single"), SD3's joint
    blocks ("joint"), else its :func:`module_part` (SD3's embedders and final layer: "unet")."""
    block = block_of(name)
    if block:
        return block[0]
    return "joint" if joint_block_of(name) is not None else module_part(name)


# Report order of the denoiser's groups (text encoders follow in order, "other" last).
_DENOISER_GROUPS = ("double", "single", "joint", "unet")


def count_parts(names: Iterable[str]) -> dict[str, int]:
    """Modules per model part: the denoiser first (FLUX's double and single blocks apart, SD3's joint blocks), then
    the text encoders in order ("other" last)."""
    counts = Counter(module_group(name) for name in names)

    def order(part: str) -> tuple[int, int, str]:
        denoiser = _DENOISER_GROUPS.index(part) if part in _DENOISER_GROUPS else len(_DENOISER_GROUPS)
        return denoiser, part == "other", part

    return dict(sorted(counts.items(), key=lambda item: order(item[0])))


# --- formats -----------------------------------------------------------------------------------------------------


def _has_part(tensors: Mapping[str, torch.Tensor], *parts: str) -> bool:
    return any(key.partition(".")[2] in parts for key in tensors)


def _is_locon(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(key.endswith(".lora_down.weight") and tensor.dim() == 4 and tuple(tensor.shape[2:]) != (1, 1)
               for key, tensor in tensors.items())


def _is_embedding(tensors: Mapping[str, torch.Tensor]) -> bool:
    keys = set(tensors)
    return "emb_params" in keys or (bool(keys) and keys <= {"clip_l", "clip_g"})


# Format name -> test on the state dict, most specific first (a LoCon is also a LoRA).
FORMATS: dict[str, Callable[[Mapping[str, torch.Tensor]], bool]] = {
    "LyCORIS LoHa": lambda tensors: _has_part(tensors, "hada_w1_a"),
    "LyCORIS LoKr": lambda tensors: _has_part(tensors, "lokr_w1", "lokr_w1_a"),
    "kohya LoCon": _is_locon,
    "kohya LoRA": lambda tensors: _has_part(tensors, "lora_down.weight"),
    "Textual Inversion": _is_embedding,
}
UNKNOWN_FORMAT = "unknown"


def detect_format(tensors: Mapping[str, torch.Tensor]) -> str:
    """The first :data:`FORMATS` entry that fits, else :data:`UNKNOWN_FORMAT`."""
    return next((name for name, test in FORMATS.items() if test(tensors)), UNKNOWN_FORMAT)


def describe_file(tensors: Mapping[str, torch.Tensor]) -> str:
    """What a file is, as a noun phrase for messages: its format, or for an unknown one the nearest guess (a whole
    model, a diffusers/PEFT LoRA), so the user knows which tool or option it belongs to."""
    found = detect_format(tensors)
    if found != UNKNOWN_FORMAT:
        return f"a {found} file"
    try:
        return f"a whole {FAMILY_LABELS[detect_family(tensors)]} model checkpoint"
    except ValueError:
        pass
    from engine.models.flux.convert import transformer_layout
    from engine.models.flux.files import stripped_keys

    if transformer_layout(stripped_keys(tensors)) is not None:
        return "a whole FLUX.1/Chroma transformer (a base model, not a LoRA)"
    if any(key.startswith(("joint_blocks.0.", "model.diffusion_model.joint_blocks.0.")) for key in tensors):
        return "a whole SD3/SD3.5 model (a base model, not a LoRA)"
    if any(".lora_A." in key or ".lora_B." in key for key in tensors):
        return "a diffusers/PEFT LoRA (lora_A/lora_B keys; these tools read kohya's lora_down/lora_up format)"
    return f"a file of {len(tensors)} tensors of no known kind (e.g. {some_names(list(tensors), 3) or 'none'})"


# --- writing -----------------------------------------------------------------------------------------------------


def new_output(path: str | Path, inputs: Iterable[str | Path], suffixes: Sequence[str] = LORA_SUFFIXES) -> Path:
    """The output path, checked before any work: a suffix the tool writes, not an input, not an existing file.

    Raises:
        ToolError: the message names the file and says what to do.
    """
    out = Path(path).expanduser()
    if out.suffix.lower() not in suffixes:
        raise ToolError(f"{out}: name the output with {' or '.join(suffixes)} (the suffix decides the format)")
    for source in inputs:
        if out.resolve() == Path(source).expanduser().resolve():
            raise ToolError(f"{out} is one of the inputs; write the result to a new file")
    if out.exists():
        raise ToolError(f"{out} already exists; choose another output name or move the existing file away "
                        "(the LoRA tools never overwrite files)")
    return out


def write_lora(path: Path, modules: Mapping[str, LoRAWeights], metadata: Mapping[str, str],
               dtype: torch.dtype | None = None) -> Path:
    """Save modules in kohya's format (with sd-scripts' hashes for safetensors); ``path`` from :func:`new_output`."""
    tensors: dict[str, torch.Tensor] = {}
    for name, weights in modules.items():
        tensors.update(weights.tensors(name, dtype))
    return save_network_file(path, tensors, dict(metadata), save_as=path.suffix.lower().lstrip("."))


# --- reports -----------------------------------------------------------------------------------------------------


def count_values(values: Iterable[Any]) -> dict[str, int]:
    """{value as text: how many}, most frequent first: the ranks or alphas of hundreds of modules at a glance."""
    counts = Counter(str(value) for value in values)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def summary_stats(values: Mapping[str, float]) -> dict[str, float | str]:
    """min (with its module), mean, median and max (with its module) of per-module values; {} when there are none."""
    if not values:
        return {}
    low, high = min(values, key=values.__getitem__), max(values, key=values.__getitem__)
    numbers = list(values.values())
    return {"min": values[low], "min_module": low, "mean": statistics.fmean(numbers),
            "median": statistics.median(numbers), "max": values[high], "max_module": high}


def some_names(names: Sequence[str], limit: int = 5) -> str:
    """The first few names, then "and N more": messages stay readable for files with hundreds of modules."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
