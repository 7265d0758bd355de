"""``lora inspect``: what a LoRA (or LyCORIS, or embedding) file is, what it was trained on, and whether it is sound.

The checks a user wants before sharing or loading a file: the format, how many layers of which model part it
changes, ranks and alphas, the base model, the main training settings from the ss_* and modelspec metadata, the
size of each module's change (a module with a huge norm overpowers the others), and NaN/inf weights, which make
every image black and are named by module.

FLUX.1 / Chroma LoRAs (``lora_unet_double_blocks_N_...``, ``lora_unet_single_blocks_N_...``) and SD3 / SD3.5 LoRAs
(``lora_unet_joint_blocks_N_...``) are recognised by their module names (:mod:`.lora_family`), counted per block
kind, with the base model's variant where the family has several (FLUX.1 dev/schnell, SD3 medium / 5-medium /
5-large), and modules trained with ``split_qkv`` (saved merged: ``lora_up`` block-diagonal, spec §5.3) are reported
with the alpha convention they were saved with.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.models.families import FAMILY_INFO
from engine.networks.metadata import SPLIT_QKV_ALPHA_KEY
from engine.networks.tools.lora_family import (
    NAMING_LABELS,
    families_named,
    family_from_metadata,
    lora_family,
    naming_of,
    variant_of,
)
from engine.networks.tools.lora_file import (
    UNKNOWN_FORMAT,
    count_parts,
    count_values,
    describe_file,
    detect_format,
    module_part,
    non_finite_modules,
    parse_kohya,
    read_weights_file,
    some_names,
    summary_stats,
)

__all__ = ["InspectReport", "block_diagonal_parts", "inspect_network_file"]

# The metadata a person looks at first, in this order (present keys only).
TRAINING_KEYS = (
    "ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
    "ss_base_model_version", "ss_sd_model_name", "ss_resolution", "ss_clip_skip", "ss_num_train_images",
    "ss_num_epochs", "ss_epoch", "ss_max_train_steps", "ss_steps", "ss_learning_rate", "ss_unet_lr",
    "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler", "ss_mixed_precision", "ss_seed", "ss_noise_offset",
    "ss_min_snr_gamma", "ss_training_comment", "modelspec.title", "modelspec.architecture", "modelspec.author",
    "modelspec.description", "modelspec.date", "modelspec.trigger_phrase", "modelspec.merged_from",
    "ss_model_type", "ss_apply_t5_attn_mask", "ss_timestep_sampling", "ss_discrete_flow_shift",
    "ss_model_prediction_type", "ss_weighting_scheme", "ss_guidance_scale", "ss_apply_lg_attn_mask",
    "ss_logit_mean", "ss_logit_std", "ss_mode_scale",
)
# split_qkv merges q, k, v (double blocks) or q, k, v, mlp (single blocks' linear1) into one module (spec §5.3).
SPLIT_PART_COUNTS = (3, 4)
TOP_TAGS = 10
# Parts of a LyCORIS module's key that belong to it (anything else is listed as unknown).
_LYCORIS_PARTS = frozenset({"alpha", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
                            "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                            "lokr_t2"})
# Where a LyCORIS module's rank can be read: the first factor present, rows = rank.
_LYCORIS_RANK_KEYS = ("hada_w1_b", "lokr_w1_b", "lokr_w2_b")
# The cross-attention width (attn2.to_k input) or text-encoder width of each family's LoRA -> base model version.
_WIDTHS = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}
_WIDTH_KEYS = ("attn2_to_k.lora_down.weight", "self_attn_q_proj.lora_down.weight", "emb_params")


@dataclass
class InspectReport:
    """What :func:`inspect_network_file` found; ``ok`` is False for an unknown format or any error."""

    path: str
    format: str
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    base_model: str = ""
    family: str = ""  # a FAMILY_INFO name ("sd1", "flux1", "chroma", "sd3", ...), "flux" (FLUX.1 or Chroma) or ""
    variant: str = ""  # of the base model, where the family has several ("dev"; SD3 "5-large"); "" unknown
    # per part: unet (FLUX: double, single; SD3: joint and unet for its embedders), te, te1, te2, te3
    modules: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # rank -> number of modules
    alphas: dict[str, int] = field(default_factory=dict)
    conv_modules: int = 0  # 3x3 convolutions (LoCon)
    conv_ranks: dict[str, int] = field(default_factory=dict)
    split_qkv: dict[str, int] = field(default_factory=dict)  # parts -> modules stored merged (block-diagonal up)
    norms: dict[str, Any] = field(default_factory=dict)  # of alpha/rank * up @ down: min/median/max ...
    embedding: dict[str, list[int]] = field(default_factory=dict)  # Textual Inversion: key -> shape
    training: dict[str, str] = field(default_factory=dict)
    dataset_dirs: dict[str, Any] = field(default_factory=dict)
    top_tags: list[tuple[str, int]] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        return "\n".join(_text_lines(self))


def inspect_network_file(path: str | Path) -> InspectReport:
    """Inspect a LoRA, LoCon, LyCORIS LoHa/LoKr or Textual Inversion file.

    Raises:
        ToolError: the file is missing or unreadable.
    """
    tensors, metadata = read_weights_file(path)
    report = InspectReport(str(path), detect_format(tensors))
    if report.format == UNKNOWN_FORMAT:
        report.errors.append(f"{path} is {describe_file(tensors)}, not a LoRA, LoCon, LyCORIS LoHa/LoKr or "
                             "Textual Inversion file")
    elif report.format == "Textual Inversion":
        report.embedding = {key: list(tensor.shape) for key, tensor in tensors.items()}
    elif report.format.startswith("kohya"):
        _inspect_kohya(report, tensors)
    else:
        _inspect_lycoris(report, tensors)
    bad = non_finite_modules(tensors)
    if bad:
        report.errors.append(f"NaN or inf weights in {len(bad)} module(s): {some_names(bad, 20)}")
    _read_metadata(report, metadata, tensors)
    report.ok = not report.errors
    return report


def _inspect_kohya(report: InspectReport, tensors: dict[str, torch.Tensor]) -> None:
    modules, report.unknown_keys, problems = parse_kohya(tensors)
    report.errors.extend(problems)
    report.modules = count_parts(modules)
    report.ranks = count_values(weights.rank for weights in modules.values())
    report.alphas = count_values(f"{weights.alpha:g}" for weights in modules.values())
    conv = [weights for weights in modules.values() if weights.is_spatial_conv]
    report.conv_modules = len(conv)
    report.conv_ranks = count_values(weights.rank for weights in conv)
    norms = {name: float(torch.linalg.vector_norm(weights.delta())) for name, weights in modules.items()}
    report.norms = summary_stats({name: norm for name, norm in norms.items() if math.isfinite(norm)})
    split = (block_diagonal_parts(weights.up) for weights in modules.values() if weights.down.dim() == 2)
    report.split_qkv = count_values(parts for parts in split if parts)


def block_diagonal_parts(up: torch.Tensor) -> int | None:
    """k when ``up`` [out, k*r] is block-diagonal in k parts (a split_qkv module saved merged), else None.

    Each column group of r must write only to its own band of rows, the bands in order and not overlapping; a
    trained module of a plain LoRA writes to every row from every column, so it never passes.
    """
    for parts in SPLIT_PART_COUNTS:
        columns = up.shape[1]
        if columns % parts:
            continue
        width = columns // parts
        bands = [(up[:, index * width:(index + 1) * width] != 0).any(dim=1).nonzero().flatten()
                 for index in range(parts)]
        if all(len(rows) for rows in bands) and all(int(bands[index][0]) > int(bands[index - 1][-1])
                                                     for index in range(1, parts)):
            return parts
    return None


def _inspect_lycoris(report: InspectReport, tensors: dict[str, torch.Tensor]) -> None:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if part in _LYCORIS_PARTS:
            groups.setdefault(name, {})[part] = tensor
        else:
            report.unknown_keys.append(key)
    report.modules = count_parts(groups)
    report.ranks = count_values(_lycoris_rank(parts) for parts in groups.values())
    report.alphas = count_values(f"{float(parts['alpha']):g}" for parts in groups.values() if "alpha" in parts)
    report.warnings.append("weight norms are computed for kohya LoRA/LoCon files only")


def _lycoris_rank(parts: dict[str, torch.Tensor]) -> str:
    return next((str(parts[key].shape[0]) for key in _LYCORIS_RANK_KEYS if key in parts), "full")


# --- metadata ----------------------------------------------------------------------------------------------------


def _read_metadata(report: InspectReport, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    report.training = {key: metadata[key] for key in TRAINING_KEYS if key in metadata}
    names = {key.partition(".")[0] for key in tensors}
    report.family, how = lora_family(names, metadata)
    if how.startswith("metadata, but"):
        report.warnings.append(f"the metadata says {report.family}, but the module names are another family's "
                               f"({how.removeprefix('metadata, but the module names are ')})")
    report.base_model = _base_model(metadata, tensors)
    if not report.family:  # a guess from the widths names a base model version ("sd_v1 (guessed ...)")
        report.family = family_from_metadata({"ss_base_model_version": report.base_model.partition(" ")[0]}) or ""
    if report.family in FAMILY_INFO:
        report.variant = variant_of(report.family, names, metadata)
    if report.split_qkv:
        report.warnings.append(_split_qkv_note(report.split_qkv, metadata))
    dirs = _json_value(report, metadata, "ss_dataset_dirs")
    report.dataset_dirs = dirs if isinstance(dirs, dict) else {}
    frequency = _json_value(report, metadata, "ss_tag_frequency")
    report.top_tags = _top_tags(frequency) if isinstance(frequency, dict) else []


def _json_value(report: InspectReport, metadata: dict[str, str], key: str) -> Any:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except ValueError:
        report.warnings.append(f"the metadata {key} is not valid JSON; it is left out")
        return None


def _top_tags(frequency: dict[str, Any]) -> list[tuple[str, int]]:
    """The most frequent tags over every folder (sd-scripts counts each folder's captions separately)."""
    totals: Counter[str] = Counter()
    for counts in frequency.values():
        if isinstance(counts, dict):
            totals.update({tag: int(count) for tag, count in counts.items() if isinstance(count, int | float)})
    return sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:TOP_TAGS]


def _split_qkv_note(split: dict[str, int], metadata: dict[str, str]) -> str:
    """What the alpha of split_qkv modules means (spec appendix A.2): Atelier stores parts x alpha, sd-scripts the
    training alpha, which every loader dividing by lora_down's rows applies at 1/parts of the trained strength."""
    count = sum(split.values())
    if metadata.get(SPLIT_QKV_ALPHA_KEY):
        return (f"{count} module(s) were trained with split_qkv and saved merged with alpha x parts (Atelier's "
                "convention): ComfyUI, diffusers and sd-scripts apply them at their trained strength")
    parts = " or ".join(f"1/{parts}" for parts in split)
    return (f"{count} module(s) were trained with split_qkv and saved merged (block-diagonal lora_up); sd-scripts "
            f"keeps the training alpha there, so ComfyUI, diffusers and sd-scripts without split_qkv apply them at "
            f"{parts} of the trained strength (sd-scripts issue #2204)")


def _base_model(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """ss_base_model_version, else modelspec.architecture, else a guess from the module names and widths."""
    for key in ("ss_base_model_version", "modelspec.architecture"):
        if metadata.get(key) not in (None, "", "None"):
            return f"{metadata[key]} (metadata {key})"
    names = {key.partition(".")[0] for key in tensors}
    naming = naming_of(names)
    if naming is not None:
        families = families_named(naming)
        if len(families) == 1:
            return f"{families[0]} (guessed from the module names)"
        return f"{NAMING_LABELS[naming]} ({' or '.join(families)}; guessed from the module names)"
    sdxl_names = (module_part(name) in ("te1", "te2") or name.startswith("lora_unet_input_blocks") for name in names)
    if "clip_g" in names or any(sdxl_names):
        return "sdxl_base_v1-0 (guessed from the module names)"
    for key, tensor in tensors.items():
        if key.endswith(_WIDTH_KEYS) and tensor.dim() == 2:
            width = int(tensor.shape[1])
            if width in _WIDTHS:
                return f"{_WIDTHS[width]} (guessed from a layer width of {width})"
    return "unknown"


# --- text --------------------------------------------------------------------------------------------------------


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{value} ({count} modules)" for value, count in counts.items()) or "none"


def _text_lines(report: InspectReport) -> list[str]:
    lines = [f"file: {report.path}", f"format: {report.format}", f"base model: {report.base_model}"]
    if report.family:
        lines.append(f"family: {report.family}" + (f" ({report.variant})" if report.variant else ""))
    if report.modules:
        parts = ", ".join(f"{part} {count}" for part, count in report.modules.items())
        lines += [f"modules: {sum(report.modules.values())} ({parts})", f"ranks: {_counts_text(report.ranks)}",
                  f"alphas: {_counts_text(report.alphas)} (0 means alpha = rank)"]
    if report.conv_modules:
        lines.append(f"3x3 conv modules (LoCon): {report.conv_modules}, ranks {_counts_text(report.conv_ranks)}")
    if report.split_qkv:
        parts = ", ".join(f"{count} in {parts} parts" for parts, count in report.split_qkv.items())
        lines.append(f"split_qkv modules saved merged (block-diagonal lora_up): {parts}")
    if report.norms:
        norms = report.norms
        lines.append(f"change norms |alpha/rank * up @ down|: min {norms['min']:.4g} ({norms['min_module']}), "
                     f"median {norms['median']:.4g}, max {norms['max']:.4g} ({norms['max_module']})")
    lines += [f"embedding {key}: {shape[0]} vector(s) of {shape[-1]}" for key, shape in report.embedding.items()]
    if report.training:
        lines += ["metadata:", *(f"  {key}: {value}" for key, value in report.training.items())]
    lines += [f"dataset folder {name}: {info}" for name, info in report.dataset_dirs.items()]
    if report.top_tags:
        lines.append("top tags: " + ", ".join(f"{tag} ({count})" for tag, count in report.top_tags))
    if report.unknown_keys:
        lines.append(f"unknown keys ({len(report.unknown_keys)}): {some_names(report.unknown_keys, 10)}")
    lines += [f"warning: {warning}" for warning in report.warnings]
    lines += [f"error: {error}" for error in report.errors]
    return lines

