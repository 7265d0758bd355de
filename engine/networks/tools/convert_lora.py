"""``lora convert``: a FLUX.1 / Chroma / SD3 LoRA from kohya's names to diffusers' (PEFT) names, or back.

diffusers has no converter for kohya SD3 LoRAs and drops the T5 modules of kohya FLUX LoRAs (spec §8.9, appendix
A.4). ``--to diffusers`` writes ``transformer.<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` (and
``text_encoder.`` / ``text_encoder_2.`` for the CLIP encoders), which ``FluxLoraLoaderMixin`` /
``SD3LoraLoaderMixin.load_lora_weights`` load as they are; ``--to kohya`` turns such files (ours, and the output of
diffusers' own training scripts) back into kohya names. Layer names: :mod:`.convert_names`.

Both directions are exact (the maths: :mod:`.convert_weights`): the converted file changes every layer as the
original does. T5 modules are left out of diffusers files (no diffusers pipeline loads a LoRA into T5) and reported.

Every file written is new: the default name is ``<stem>_diffusers.safetensors`` / ``<stem>_kohya.safetensors``
beside the input, and an existing file is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.models.families import FAMILY_INFO, family_info
from engine.networks.metadata import SPLIT_QKV_ALPHA_KEY
from engine.networks.network_file import save_network_file
from engine.networks.tools.convert_names import (
    NAMING_PAIRS,
    TRANSFORMER,
    LayerPair,
    kohya_text_pair,
    peft_text_pair,
)
from engine.networks.tools.convert_weights import (
    ADAPTER_METADATA,
    PeftModule,
    baked_dtype,
    merge_parts,
    read_peft_modules,
    split_module,
)
from engine.networks.tools.lora_family import NAMING_LABELS, families_named, family_from_metadata, lora_family
from engine.networks.tools.lora_file import (
    LoRAWeights,
    ToolError,
    count_parts,
    count_values,
    detect_format,
    non_finite_modules,
    parse_kohya,
    read_weights_file,
    some_names,
)
from engine.networks.tools.metadata_keys import shape_metadata

__all__ = ["CONVERSION_KEY", "TARGETS", "ConvertReport", "convert_lora", "convertible_families", "default_output"]

TARGETS = ("diffusers", "kohya")
CONVERSION_KEY = "atelier_lora_conversion"  # metadata: what was converted from what, and how alpha was handled
_LYCORIS = ("LyCORIS LoHa", "LyCORIS LoKr")
_SHAPE_KEYS = ("ss_network_dim", "ss_network_alpha")
_STALE_KEYS = (SPLIT_QKV_ALPHA_KEY, ADAPTER_METADATA, "sshs_model_hash", "sshs_legacy_hash", CONVERSION_KEY)
# PEFT names that only one family's transformer has (a diffusers file has no metadata that says its family)
_FLUX_ONLY = re.compile(r"(^|\.)(single_transformer_blocks|x_embedder|guidance_embedder|distilled_guidance_layer)\.")
_SD3_ONLY = re.compile(r"(^|\.)(pos_embed\.proj|attn2)(\.|$)|^text_encoder_2\.")


@dataclass
class ConvertReport:
    """What :func:`convert_lora` wrote: the family, module counts per part, and what it left out and why."""

    input: str
    output: str
    to: str
    family: str
    family_from: str
    modules_in: int
    modules_out: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    widened: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        parts = ", ".join(f"{part} {count}" for part, count in self.modules_out.items())
        lines = [f"converted {self.input} ({self.family}, from {self.family_from}) to {self.to} names",
                 f"{self.modules_in} modules in, {sum(self.modules_out.values())} out ({parts})",
                 f"ranks: {', '.join(f'{rank} ({count} modules)' for rank, count in self.ranks.items())}"]
        lines += [f"left out: {note}" for note in self.notes]
        lines += [f"note: {warning}" for warning in self.warnings]
        return "\n".join([*lines, f"wrote {self.output}"])


def convertible_families() -> list[str]:
    """The families whose transformer naming has a layer table (FLUX.1, Chroma, SD3)."""
    return [name for name, info in FAMILY_INFO.items() if info.unet_naming in NAMING_PAIRS]


def default_output(path: str | Path, to: str) -> Path:
    """``<stem>_diffusers.safetensors`` / ``<stem>_kohya.safetensors`` beside the input."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{to}.safetensors")


def convert_lora(path: str | Path, to: str, output: str | Path | None = None, *, family: str | None = None,
                 overwrite: bool = False) -> ConvertReport:
    """Write a LoRA under the other naming (see the module docstring).

    Args:
        to: "diffusers" (kohya file in) or "kohya" (diffusers/PEFT file in).
        output: the new file (.safetensors); None: :func:`default_output`.
        family: "flux1", "chroma" or "sd3" when the file cannot tell (a diffusers file without metadata whose
            names both families share); otherwise it must agree with the file.
        overwrite: replace an existing output (never the input).

    Raises:
        ToolError: an unknown target, an output that exists or is the input, a file of another format (LyCORIS,
            already in the target naming), a family without a layer table, or names no layer has.
    """
    if to not in TARGETS:
        raise ToolError(f"--to {to!r}: use one of {', '.join(TARGETS)}")
    source = Path(path)
    out = _new_output(source, Path(output).expanduser() if output else default_output(source, to), overwrite)
    tensors, metadata = read_weights_file(source)
    _check_format(source, tensors, to)
    convert = _to_diffusers if to == "diffusers" else _to_kohya
    report, written, new_metadata = convert(source, tensors, metadata, family)
    report.output = str(out)
    new_metadata[CONVERSION_KEY] = json.dumps({"from": source.name, "to": to, "family": report.family,
                                               "dropped": report.dropped, "alpha": _ALPHA_NOTES[to]})
    save_network_file(out, written, new_metadata, save_as="safetensors")
    return report


_ALPHA_NOTES = {"diffusers": "alpha/rank baked into lora_A and lora_B (diffusers applies scale 1)",
                "kohya": "each module's scale is alpha / lora_down rows"}


def _new_output(source: Path, out: Path, overwrite: bool) -> Path:
    if out.suffix.lower() != ".safetensors":
        raise ToolError(f"{out}: name the output .safetensors (diffusers and ComfyUI read LoRAs from safetensors)")
    if out.resolve() == source.expanduser().resolve():
        raise ToolError(f"{out} is the input; write the converted LoRA to a new file")
    if out.exists() and not overwrite:
        raise ToolError(f"{out} already exists; choose another output name, move the file away, or pass "
                        "--overwrite to replace it")
    return out


def _check_format(path: Path, tensors: Mapping[str, torch.Tensor], to: str) -> None:
    found = detect_format(tensors)
    if found in _LYCORIS:
        raise ToolError(f"{path} is a {found} file; only LoRA files convert (LoHa/LoKr factors have no "
                        "lora_A/lora_B form). Keep it in kohya's naming: ComfyUI loads it as it is")
    is_peft = any(".lora_A." in key or ".lora_B." in key for key in tensors)
    if to == "diffusers" and is_peft:
        raise ToolError(f"{path} already has diffusers/PEFT names (lora_A/lora_B); convert it --to kohya instead")
    if to == "kohya" and not is_peft:
        kind = "kohya names (lora_down/lora_up)" if found.startswith("kohya") else f"no LoRA names ({found})"
        raise ToolError(f"{path} has {kind}, not diffusers/PEFT names; " +
                        ("convert it --to diffusers instead" if found.startswith("kohya") else
                         "check it with `python -m engine lora inspect`"))
    bad = non_finite_modules(tensors)
    if bad:
        raise ToolError(f"{path}: NaN or inf weights in {some_names(bad)}; this LoRA is broken (retrain it or use an "
                        "earlier save)")


# --- family ------------------------------------------------------------------------------------------------------


def _checked_family(path: Path, found: str, how: str, given: str | None) -> tuple[str, str]:
    """The family to convert as: ``given`` (checked against what the file says), else the file's own."""
    if given:
        if given not in convertible_families():
            raise ToolError(f"--family {given!r}: convert knows {', '.join(convertible_families())}")
        if found and _naming(found) != _naming(given):
            raise ToolError(f"{path} is a {found} LoRA ({how}), not {given}; leave --family out")
        return given, "--family"
    if not found:
        raise ToolError(f"{path}: cannot tell which model this LoRA is for from its names or metadata; pass --family "
                        f"({', '.join(convertible_families())})")
    if _naming(found) not in NAMING_PAIRS:
        raise ToolError(f"{path} is a {found} LoRA; convert handles {', '.join(convertible_families())} LoRAs "
                        "(diffusers reads kohya SD1/SD2/SDXL files itself)")
    return found, how


def _naming(family: str) -> str:
    label_namings = {label: naming for naming, label in NAMING_LABELS.items()}
    return label_namings.get(family) or family_info(family).unet_naming


def _kohya_family(path: Path, names: Sequence[str], metadata: Mapping[str, str], given: str | None) -> tuple[str, str]:
    found, how = lora_family(names, metadata)
    if not found and any(name.startswith("lora_unet_joint_blocks_") for name in names):
        found, how = "sd3", "module names"  # SD3's MMDiT names (spec §8.6)
    return _checked_family(path, found, how, given)


def _peft_family(path: Path, modules: Sequence[str], metadata: Mapping[str, str], given: str | None
                 ) -> tuple[str, str]:
    found, how = family_from_metadata(metadata) or "", "metadata"
    if not found:
        flux = any(_FLUX_ONLY.search(name) for name in modules)
        sd3 = any(_SD3_ONLY.search(name) for name in modules)
        found, how = ("flux", "module names") if flux and not sd3 else ("sd3", "module names") if sd3 and not flux \
            else ("", "")
    return _checked_family(path, found, how, given)


# --- kohya -> diffusers ------------------------------------------------------------------------------------------


def _to_diffusers(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], given: str | None
                  ) -> tuple[ConvertReport, dict[str, torch.Tensor], dict[str, str]]:
    modules, unknown, problems = parse_kohya(tensors)
    if problems:
        raise ToolError(f"{path}: {problems[0]}; the file is damaged, re-save it from its source")
    if unknown:  # DoRA's dora_scale, LyCORIS' lora_mid: leaving them out would change what the LoRA does
        raise ToolError(f"{path} has keys that are not plain kohya LoRA weights: {some_names(unknown)}; it cannot be "
                        "converted without changing what it does")
    family, how = _kohya_family(path, list(modules), metadata, given)
    pairs = {pair.kohya: pair for pair in NAMING_PAIRS[_naming(family)](list(modules))}
    written: dict[str, torch.Tensor] = {}
    dropped: Counter[str] = Counter()
    missing, widened = [], []
    for name, weights in modules.items():
        pair = pairs.get(name) or kohya_text_pair(family, name)
        if isinstance(pair, str):
            dropped[pair] += 1
        elif pair is None:
            missing.append(name)
        else:
            widened += [name] if baked_dtype(weights) != weights.down.dtype else []
            for module, (down, up) in split_module(pair, weights).items():
                written[f"{module}.lora_A.weight"], written[f"{module}.lora_B.weight"] = down, up
    if missing:
        raise ToolError(f"{path}: {some_names(missing)} match no {family} layer; is the file for another model?")
    report = ConvertReport(str(path), "", "diffusers", family, how, len(modules), _component_counts(written),
                           count_values(weights.rank for weights in modules.values()), dict(dropped),
                           [_dropped_note(prefix, count) for prefix, count in dropped.items()])
    if widened:
        report.widened = len(widened)
        report.warnings.append(f"{len(widened)} module(s) written in float32, not {_dtype_name(modules[widened[0]])}: "
                               "their alpha/rank is no power of two, so baking it into half-precision weights would "
                               "round them")
    kept = {key: value for key, value in metadata.items() if key not in _STALE_KEYS}
    return report, written, kept


def _dtype_name(weights: LoRAWeights) -> str:
    return str(weights.down.dtype).removeprefix("torch.")


def _dropped_note(prefix: str, count: int) -> str:
    return (f"{count} T5 module(s) ({prefix}_...): diffusers loads no LoRA into T5, so they are not written "
            "(the kohya file keeps them for ComfyUI)")


def _component_counts(written: Mapping[str, Any]) -> dict[str, int]:
    """diffusers modules per pipeline component, the transformer first."""
    modules = {key.rsplit(".lora_", 1)[0] for key in written}
    counts = Counter(module.partition(".")[0] for module in modules)
    return dict(sorted(counts.items(), key=lambda item: (item[0] != TRANSFORMER, item[0])))


# --- diffusers -> kohya ------------------------------------------------------------------------------------------


def _to_kohya(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], given: str | None
              ) -> tuple[ConvertReport, dict[str, torch.Tensor], dict[str, str]]:
    modules = read_peft_modules(path, tensors, metadata)
    family, how = _peft_family(path, list(modules), metadata, given)
    pairs = NAMING_PAIRS[_naming(family)](list(modules))
    by_part = {name: pair for pair in pairs for name in pair.diffusers}
    groups: dict[str, tuple[LayerPair, dict[str, PeftModule]]] = {}
    missing = []
    for name, module in modules.items():
        pair = by_part.get(name) or peft_text_pair(family, name)
        if pair is None:
            missing.append(name)
            continue
        groups.setdefault(pair.kohya, (pair, {}))[1][name] = module
    if missing:
        raise ToolError(f"{path}: {some_names(missing)} match no {family} layer (or no text encoder diffusers loads a "
                        "LoRA into); is the file for another model?")
    converted = {name: merge_parts(pair, parts) for name, (pair, parts) in groups.items()}
    written: dict[str, torch.Tensor] = {}
    for name, weights in converted.items():
        written.update(weights.tensors(name))
    report = ConvertReport(str(path), "", "kohya", family, how, len(modules), count_parts(converted),
                           count_values(weights.rank for weights in converted.values()))
    kept = {key: value for key, value in metadata.items() if key not in _STALE_KEYS}
    # only dim and alpha: shape_metadata would also call SD3's 2x2 patch conv (emb_dims) a LoCon conv_dim
    shape = {key: value for key, value in shape_metadata(converted).items() if key in _SHAPE_KEYS}
    new_metadata = {**kept, **shape}
    new_metadata.setdefault("ss_network_module", family_info(_module_family(family)).kohya_network_module)
    return report, written, new_metadata


def _module_family(family: str) -> str:
    """A FAMILY_INFO name for a family label ("flux" -> "flux1": FLUX.1 and Chroma load with networks.lora_flux)."""
    return family if family in FAMILY_INFO else families_named(_naming(family))[0]
