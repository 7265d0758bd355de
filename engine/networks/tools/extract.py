"""``lora extract``: a LoRA from the difference between a fine-tuned model and its base (kohya's
extract_lora_from_models).

For each layer ``create_lora_network`` would wrap (the same names, so the file loads wherever our LoRAs load), the
difference of the weights is cut to the given rank by SVD, the best approximation of that rank. Text encoders
whose weights barely changed (max |difference| at most ``min_diff``, kohya's 0.01) are left out, as kohya does:
fine-tunes often leave them untouched, and their tiny differences are noise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.models.families import family_info
from engine.models.single_file import FAMILY_LABELS
from engine.networks.lora_names import LoRAOptions
from engine.networks.tools.extract_report import ExtractReport
from engine.networks.tools.factorize import choose_rank, clamp_factors, spectrum_of_matrix
from engine.networks.tools.lora_file import ToolError, count_parts, module_part, new_output, summary_stats, write_lora
from engine.networks.tools.metadata_keys import modelspec_keys
from engine.networks.tools.model_files import FILE_MODELS
from engine.networks.tools.model_layers import is_v_prediction, layer_targets, load_base_model, model_family

if TYPE_CHECKING:
    from engine.models.loaded_model import LoadedModel

__all__ = ["DEFAULT_MIN_DIFF", "ExtractReport", "extract_lora"]

DEFAULT_MIN_DIFF = 0.01  # kohya's --min_diff



def extract_lora(base: str | Path, tuned: str | Path, output: str | Path, *, rank: int, conv_rank: int = 0,
                 min_diff: float = DEFAULT_MIN_DIFF, device: str = "cpu", save_dtype: torch.dtype | None = None,
                 clamp_quantile: float | None = None) -> ExtractReport:
    """Extract a kohya LoRA (LoCon with ``conv_rank``) from two models of one family.

    Args:
        base, tuned: single files or diffusers folders; for FLUX.1/Chroma BFL transformer files (extracted file by
            file, the transformer only: :mod:`.extract_files`).
        rank: rank of Linear and 1x1 conv modules (alpha = rank, so scale 1); a smaller layer keeps its full rank.
        conv_rank: rank of 3x3 convs in the ResNet blocks (0: none, as kohya without conv_dim).
        min_diff: a text encoder whose max |difference| is at most this is left out.
        device: where the SVDs run ("cuda" is much faster on SDXL).
        save_dtype: dtype of the saved up/down weights (default float32).
        clamp_quantile: clip each module's factors at this quantile of their values (sd-scripts' --clamp_quantile,
            0.99 there); None keeps the best rank-r approximation as it is.

    Raises:
        ToolError: bad ranks, an existing output, models that cannot be loaded, of different families or sizes.
    """
    if rank < 1 or conv_rank < 0:
        raise ToolError(f"--rank must be at least 1 and --conv-rank at least 0, got {rank} and {conv_rank}")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise ToolError(f"--clamp-quantile must be above 0 and at most 1 (sd-scripts uses 0.99), got {clamp_quantile}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ToolError(f"--device {device}: no CUDA device is available here; leave --device out to use the CPU")
    family = _files_family(base, tuned)
    if family is not None:
        from engine.networks.tools.extract_files import extract_from_files

        return extract_from_files(base, tuned, output, family=family, rank=rank, conv_rank=conv_rank, device=device,
                                  save_dtype=save_dtype, clamp_quantile=clamp_quantile)
    out = new_output(output, [base, tuned])
    base_model, tuned_model = load_base_model(base, "base model"), load_base_model(tuned, "tuned model")
    if base_model.family != tuned_model.family:
        raise ToolError(f"{tuned}: the tuned model is {FAMILY_LABELS[tuned_model.family]} but the base model {base} "
                        f"is {FAMILY_LABELS[base_model.family]}; extract needs two models of one family")
    options = LoRAOptions(dim=rank, alpha=rank, conv_dim=conv_rank, conv_alpha=conv_rank)
    pairs = list(_layer_pairs(base_model, tuned_model, options))
    skipped = _unchanged_text_encoders(pairs, min_diff)
    modules, retained = {}, {}
    for name, base_weight, tuned_weight, target_rank in pairs:
        if module_part(name) in skipped:
            continue
        spectrum = spectrum_of_matrix((tuned_weight - base_weight).to(device))
        module_rank = choose_rank(spectrum, "rank", target_rank)
        weights = spectrum.to_lora(module_rank)
        modules[name] = clamp_factors(weights, clamp_quantile) if clamp_quantile is not None else weights
        retained[name] = spectrum.retained(module_rank)
    family, v_prediction = tuned_model.family, is_v_prediction(tuned_model)
    write_lora(out, modules, _metadata(family, v_prediction, options, Path(base), Path(tuned), out), save_dtype)
    return ExtractReport(str(base), str(tuned), str(out), family, rank, conv_rank,
                         count_parts(modules), skipped, summary_stats(retained))


def _files_family(base: str | Path, tuned: str | Path) -> str | None:
    """The family when the models are extracted file by file (its loader in ``FILE_MODELS``), else None; then
    both models must be of it."""
    families = (model_family(base), model_family(tuned))
    if not any(family is not None and family_info(family).loader in FILE_MODELS for family in families):
        return None
    if families[0] != families[1]:
        base_label, tuned_label = (FAMILY_LABELS.get(family, family) if family else "not a model of a known family"
                                   for family in families)
        raise ToolError(f"{tuned}: the tuned model is {tuned_label} but the base model {base} is {base_label}; "
                        "extract needs two models of one family")
    return families[0]


def _layer_pairs(base: LoadedModel, tuned: LoadedModel, options: LoRAOptions
                 ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, int]]:
    """(name, base weight, tuned weight, rank) for each layer a LoRA with ``options`` wraps."""
    include_conv = options.conv_dim > 0
    tuned_layers = {target.name: target.module for target in layer_targets(tuned, include_conv_blocks=include_conv)}
    for target in layer_targets(base, include_conv_blocks=include_conv):
        rank, _ = options.rank_and_alpha(target)
        if rank == 0:
            continue
        base_weight, tuned_weight = target.module.weight.detach(), tuned_layers[target.name].weight.detach()
        if base_weight.shape != tuned_weight.shape:
            raise ToolError(f"layer {target.name} has shape {tuple(tuned_weight.shape)} in the tuned model but "
                            f"{tuple(base_weight.shape)} in the base model; the models have different sizes")
        yield target.name, base_weight, tuned_weight, rank


def _unchanged_text_encoders(pairs: list[tuple[str, torch.Tensor, torch.Tensor, int]], min_diff: float
                             ) -> dict[str, str]:
    """{part: reason} for each text encoder whose largest |difference| is at most ``min_diff``."""
    largest: dict[str, float] = {}
    for name, base_weight, tuned_weight, _ in pairs:
        part = module_part(name)
        if part != "unet":
            difference = float((tuned_weight - base_weight).abs().max())
            largest[part] = max(largest.get(part, 0.0), difference)
    return {part: f"max |difference| {value:.3g} <= min_diff {min_diff:g}"
            for part, value in largest.items() if value <= min_diff}


def _metadata(family: str, v_prediction: bool, options: LoRAOptions, base: Path, tuned: Path,
              out: Path) -> dict[str, str]:
    metadata = {
        "ss_network_module": family_info(family).kohya_network_module,
        "ss_network_dim": str(options.dim),
        "ss_network_alpha": str(options.dim),
        "ss_base_model_version": family_info(family).base_model_version(v_prediction),
        "ss_v2": str(family_info(family).kohya_v2),
        "ss_sd_model_name": base.name,
        "ss_output_name": out.stem,
        "ss_training_comment": f"extracted from {tuned.name} minus {base.name}",
        **modelspec_keys(family, v_prediction, kind="lora", title=out.stem),
    }
    if options.conv_dim:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(options.conv_dim),
                                                  "conv_alpha": str(options.conv_dim)})
    return metadata

