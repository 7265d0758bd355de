"""``lora merge`` without a base model: several LoRAs (with ratios) into one LoRA file.

Concatenating ranks is exact: stacking ``ratio_i * scale_i * up_i`` side by side and ``down_i`` on top of each other
gives ``sum_i ratio_i * scale_i * up_i @ down_i`` as one product, so with alpha = the new rank (scale 1) the merged
module changes the layer exactly as all the LoRAs together. Its rank is the sum of theirs; ``--svd RANK`` cuts that
to a fixed rank with the best approximation (kohya's svd_merge_lora), and reports how much of each change is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.networks.tools.factorize import choose_rank, spectrum_of_factors
from engine.networks.tools.lora_family import NAMING_LABELS, naming_of, network_module
from engine.networks.tools.lora_file import (
    KohyaLoRA,
    LoRASource,
    LoRAWeights,
    ToolError,
    count_parts,
    count_values,
    module_part,
    new_output,
    read_kohya_lora,
    summary_stats,
    write_lora,
)
from engine.networks.tools.metadata_keys import modelspec_date, shape_metadata

__all__ = ["LoRAMergeReport", "merge_loras"]

# Metadata carried over from the inputs when they all agree (they describe the base model, not the training).
SHARED_KEYS = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_clip_skip", "ss_model_type",
               "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
               "modelspec.prediction_type", "modelspec.encoder_layer")
_UNSET = (None, "", "None")


@dataclass
class LoRAMergeReport:
    """What :func:`merge_loras` wrote; ``retained`` (``--svd`` only) summarises the per-module kept fraction."""

    output: str
    method: str  # "concatenate" or "svd"
    inputs: list[str]
    modules: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    retained: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        parts = ", ".join(f"{part} {count}" for part, count in self.modules.items())
        ranks = ", ".join(f"{rank} ({count} modules)" for rank, count in self.ranks.items())
        lines = [f"merged ({self.method}): {', '.join(self.inputs)}",
                 f"modules: {sum(self.modules.values())} ({parts})", f"ranks: {ranks}"]
        if self.retained:
            lines.append(f"kept of each change (Frobenius): min {self.retained['min']:.4f} "
                         f"({self.retained['min_module']}), mean {self.retained['mean']:.4f}")
        lines.append(f"wrote {self.output}")
        return "\n".join(lines)


def merge_loras(sources: Sequence[LoRASource], output: str | Path, *, svd_rank: int | None = None,
                conv_rank: int | None = None, save_dtype: torch.dtype | None = None) -> LoRAMergeReport:
    """Merge kohya LoRAs into one LoRA file.

    Args:
        sources: the files and their ratios.
        output: a new .safetensors (or .ckpt/.pt) file.
        svd_rank: re-factor every module to this rank (None: concatenate the ranks, exact).
        conv_rank: with ``svd_rank``, the rank of 3x3 conv modules (default: ``svd_rank``).
        save_dtype: dtype of the saved up/down weights (default float32).

    Raises:
        ToolError: an existing output, unreadable or non-kohya inputs, LoRAs for different base models, or a
            module whose shape differs between the files.
    """
    if not sources:
        raise ToolError("no LoRA files given; name the LoRA files to merge")
    for option, value in (("--svd", svd_rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise ToolError(f"{option} must be at least 1, got {value}")
    out = new_output(output, [source.path for source in sources])
    loras = [read_kohya_lora(source.path, action="merged") for source in sources]
    _check_naming(loras)
    shared = _shared_metadata(loras)
    modules = {name: _concatenate(name, items) for name, items in _group(sources, loras).items()}
    method, retained = "concatenate", {}
    if svd_rank is not None:
        method = "svd"
        for name, weights in modules.items():
            spectrum = spectrum_of_factors(weights)
            rank = choose_rank(spectrum, "rank", (conv_rank or svd_rank) if weights.is_spatial_conv else svd_rank)
            retained[name] = spectrum.retained(rank)
            modules[name] = spectrum.to_lora(rank)
    labels = [source.label for source in sources]
    metadata = {**shared, "ss_network_module": network_module(modules, shared), **shape_metadata(modules),
                "ss_output_name": out.stem, "ss_training_comment": f"merged ({method}) from {', '.join(labels)}",
                "modelspec.title": out.stem, "modelspec.date": modelspec_date(),
                "modelspec.merged_from": ", ".join(labels)}
    write_lora(out, modules, metadata, save_dtype)
    return LoRAMergeReport(str(out), method, labels, count_parts(modules),
                           count_values(weights.rank for weights in modules.values()), summary_stats(retained))


def _shared_metadata(loras: Sequence[KohyaLoRA]) -> dict[str, str]:
    """The :data:`SHARED_KEYS` every input that has them agrees on; different base models are an error."""
    shared = {}
    for key in SHARED_KEYS:
        values = {lora.path: lora.metadata[key] for lora in loras if lora.metadata.get(key) not in _UNSET}
        if len(set(values.values())) > 1:
            if key == "ss_base_model_version":
                listed = ", ".join(f"{path.name} is {value}" for path, value in values.items())
                raise ToolError(f"these LoRAs were trained on different base models ({listed}); merge only LoRAs "
                                "of one model family")
            continue
        if values:
            shared[key] = next(iter(values.values()))
    return shared


def _check_naming(loras: Sequence[KohyaLoRA]) -> None:
    """LoRAs whose module names are of different namings (FLUX's blocks and an SD UNet) change different models; a
    LoRA of text-encoder modules only says nothing about the denoiser and is not compared."""
    namings = {lora.path: naming_of(lora.modules) for lora in loras
               if any(module_part(name) == "unet" for name in lora.modules)}
    if len(set(namings.values())) > 1:
        listed = ", ".join(f"{path.name}: {NAMING_LABELS[naming] if naming else 'SD'}" for path, naming in
                           namings.items())
        raise ToolError(f"these LoRAs are for different model families by their module names ({listed}); merge "
                        "only LoRAs of one model family")


def _group(sources: Sequence[LoRASource], loras: Sequence[KohyaLoRA]
           ) -> dict[str, list[tuple[float, LoRAWeights, Path]]]:
    """{module name: [(ratio, weights, file)]} in the order the modules first appear."""
    grouped: dict[str, list[tuple[float, LoRAWeights, Path]]] = {}
    for source, lora in zip(sources, loras, strict=True):
        for name, weights in lora.modules.items():
            grouped.setdefault(name, []).append((source.ratio, weights, lora.path))
    return grouped


def _concatenate(name: str, items: Sequence[tuple[float, LoRAWeights, Path]]) -> LoRAWeights:
    """One module from several: up = cat(ratio_i * scale_i * up_i), down = cat(down_i), alpha = the new rank."""
    first_shape, first_path = items[0][1].weight_shape, items[0][2]
    for _, weights, path in items[1:]:
        if weights.weight_shape != first_shape:
            raise ToolError(f"module {name} changes a {first_shape} weight in {first_path} but a "
                            f"{weights.weight_shape} one in {path}; these LoRAs are for different models")
    up = torch.cat([weights.up.float() * (ratio * weights.scale) for ratio, weights, _ in items], dim=1)
    down = torch.cat([weights.down.float() for _, weights, _ in items], dim=0)
    return LoRAWeights(down, up, float(down.shape[0]))
