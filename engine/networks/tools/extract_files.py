"""``lora extract`` for models kept as separate files (FLUX.1 / Chroma BFL transformer files, SD3 / SD3.5 SAI single
files), as sd-scripts' ``flux_extract_lora.py``: the denoiser only (FLUX's double and single blocks, SD3's joint
blocks), never the text encoders.

The layers and their kohya names are those a LoRA trains (``engine.networks.lora_names`` on the denoiser built
from the base file's shapes on the meta device, so no weights are loaded for that); each layer's weights are read
from both files as they are needed, so two 24 GB files never sit in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.models.families import family_info
from engine.networks.lora_names import LoRAOptions, unet_targets
from engine.networks.tools.extract_report import ExtractReport
from engine.networks.tools.factorize import choose_rank, clamp_factors, spectrum_of_matrix
from engine.networks.tools.lora_file import LoRAWeights, ToolError, count_parts, new_output, summary_stats, write_lora
from engine.networks.tools.metadata_keys import modelspec_keys
from engine.networks.tools.model_files import FILE_MODELS, FileModelKind, ModelFile, NameIndex, open_model_file

__all__ = ["extract_from_files"]


def extract_from_files(base: str | Path, tuned: str | Path, output: str | Path, *, family: str, rank: int,
                       conv_rank: int = 0, device: str = "cpu", save_dtype: torch.dtype | None = None,
                       clamp_quantile: float | None = None) -> ExtractReport:
    """Extract a kohya LoRA from two model files of one family whose loader is in ``FILE_MODELS``.

    Args:
        rank: rank of every module (alpha = rank); a smaller layer keeps its full rank.
        conv_rank: must be 0 (these denoisers have no 3x3 convolutions).
        clamp_quantile: clip the factors at this quantile (sd-scripts' 0.99), or None.
        Others as :func:`engine.networks.tools.extract.extract_lora`.

    Raises:
        ToolError: files that are no such models, of other layouts or sizes, or an existing output.
    """
    kind = FILE_MODELS[family_info(family).loader]
    out = new_output(output, [base, tuned])
    files = [_checked(kind, path, role) for path, role in ((base, "base model"), (tuned, "tuned model"))]
    options = LoRAOptions(dim=rank, alpha=rank)
    targets = [target for target in unet_targets(kind.denoiser(files[0]), family, include_conv_blocks=conv_rank > 0)
               if options.rank_and_alpha(target)[0] > 0]
    if conv_rank and not any(target.is_spatial_conv for target in targets):
        raise ToolError(f"--conv-rank {conv_rank}: this {family} model has no 3x3 convolutions; leave it out")
    pairs = _keys(files, [target.name for target in targets])
    modules: dict[str, LoRAWeights] = {}
    retained: dict[str, float] = {}
    from safetensors import safe_open

    with safe_open(str(files[0].path), "pt") as base_handle, safe_open(str(files[1].path), "pt") as tuned_handle:
        for name, (base_key, tuned_key) in pairs.items():
            difference = tuned_handle.get_tensor(tuned_key).float() - base_handle.get_tensor(base_key).float()
            spectrum = spectrum_of_matrix(difference.to(device))
            module_rank = choose_rank(spectrum, "rank", rank)
            weights = spectrum.to_lora(module_rank)
            modules[name] = clamp_factors(weights, clamp_quantile) if clamp_quantile is not None else weights
            retained[name] = spectrum.retained(module_rank)
    variant = kind.variant(files[1])
    write_lora(out, modules, _metadata(family, variant, rank, files, out), save_dtype)
    return ExtractReport(str(base), str(tuned), str(out), family, rank, conv_rank, count_parts(modules),
                         {"text encoders": "kept in their own files; as sd-scripts, only the transformer is extracted"},
                         summary_stats(retained))


def _checked(kind: FileModelKind, path: str | Path, role: str) -> ModelFile:
    model = open_model_file(path, role)
    problem = kind.layout_problem(model)
    if problem:
        raise ToolError(f"{role} {model.path} {problem}")
    return model


def _keys(files: list[ModelFile], names: list[str]) -> dict[str, tuple[str, str]]:
    """{module name: (base key, tuned key)}; both files must have the layer, in one shape."""
    base_index, tuned_index = (NameIndex(model, "lora_unet") for model in files)
    pairs = {}
    for name in names:
        base_key, tuned_key = base_index.key(name), tuned_index.key(name)
        if base_key is None or tuned_key is None:
            where = files[0].path if base_key is None else files[1].path
            raise ToolError(f"{where} has no weight for the LoRA module {name}; the two models differ in layout")
        base_shape, tuned_shape = files[0].tensors[base_key].shape, files[1].tensors[tuned_key].shape
        if base_shape != tuned_shape:
            raise ToolError(f"layer {name} has shape {tuned_shape} in the tuned model but {base_shape} in the base "
                            "model; the models have different sizes")
        pairs[name] = (base_key, tuned_key)
    return pairs


def _metadata(family: str, variant: str, rank: int, files: list[ModelFile], out: Path) -> dict[str, str]:
    info = family_info(family)
    base, tuned = files[0].path, files[1].path
    metadata = {
        "ss_network_module": info.kohya_network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": info.base_model_version(False, variant),
        "ss_sd_model_name": base.name,
        "ss_output_name": out.stem,
        "ss_training_comment": f"extracted from {tuned.name} minus {base.name}",
        **modelspec_keys(family, False, kind="lora", title=out.stem, variant=variant),
    }
    if info.model_type:
        metadata["ss_model_type"] = info.model_type
    return metadata
