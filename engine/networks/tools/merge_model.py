"""``lora merge --into-model``: bake LoRAs into a base model and save a new single-file checkpoint.

Each module adds ``ratio * alpha/rank * up @ down`` to its layer's weight (spec §5.2; 3x3 convs through the
flattened product, which equals kohya's conv formula). The merged model computes what the base model computes
with the LoRAs applied at those ratios, without loading them.

Families whose loader keeps the model in separate files (``FamilyInfo.loader`` in ``model_files.FILE_MODELS``:
FLUX.1, Chroma, SD3) are merged file by file, tensor by tensor, by :mod:`.merge_files`; the others are loaded whole
and saved as one LDM-layout checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.models.families import family_info
from engine.networks.tools.lora_file import (
    KohyaLoRA,
    LoRASource,
    LoRAWeights,
    ToolError,
    count_parts,
    new_output,
    read_kohya_lora,
    some_names,
)
from engine.networks.tools.merge_model_report import ModelMergeReport
from engine.networks.tools.metadata_keys import modelspec_keys
from engine.networks.tools.model_files import FILE_MODELS
from engine.networks.tools.model_layers import (
    is_v_prediction,
    layer_targets,
    load_base_model,
    model_family,
    save_checkpoint,
)

if TYPE_CHECKING:
    from engine.models.loaded_model import LoadedModel

__all__ = ["ModelMergeReport", "merge_into_model"]



def merge_into_model(base: str | Path, sources: Sequence[LoRASource], output: str | Path, *,
                     save_dtype: torch.dtype | None = None,
                     text_encoders: Mapping[str, tuple[str | Path | None, str | Path | None]] | None = None
                     ) -> ModelMergeReport:
    """Merge kohya LoRAs into the model at ``base`` and save ``output``.

    Args:
        base: a single file or diffusers folder; for FLUX.1/Chroma the BFL transformer file, for SD3 the SAI
            single file.
        sources: the LoRA files and their ratios, merged in order.
        output: a new .safetensors file.
        save_dtype: dtype of the saved weights (default: float32 for SD models, as loaded; the file's own for
            models merged file by file).
        text_encoders: for models whose text encoders are separate files (FLUX.1, Chroma, SD3), by option stem
            ("clip-l", "clip-g", "t5xxl"): (the encoder's file, the new file to write).

    Raises:
        ToolError: an existing output, an unreadable or damaged LoRA, a LoRA with layers the model lacks or of
            other sizes (another family), or a model that cannot be loaded.
    """
    if not sources:
        raise ToolError("no LoRA files given; name one or more LoRA files to merge into the model")
    family = model_family(base)
    if family is not None and family_info(family).loader in FILE_MODELS:
        from engine.networks.tools.merge_files import merge_into_model_files

        return merge_into_model_files(base, sources, output, family=family, save_dtype=save_dtype,
                                      text_encoders=text_encoders)
    given = [f"--{option}" for option, pair in (text_encoders or {}).items() if any(pair)]
    if given:
        raise ToolError(f"{', '.join(given)}: only for models whose text encoders are separate files (FLUX.1, "
                        f"Chroma, SD3); {base} holds its own text encoders, which the LoRA's text-encoder modules "
                        "change")
    out = new_output(output, [base, *(source.path for source in sources)], (".safetensors",))
    loras = [read_kohya_lora(source.path, action="merged") for source in sources]
    model = load_base_model(base, "base model")
    layers = _layers_by_name(model)
    report = ModelMergeReport(str(out), str(base), model.family)
    with torch.no_grad():
        for source, lora in zip(sources, loras, strict=True):
            _merge_one(lora, source.ratio, layers, model.family)
            modules = count_parts(lora.modules)
            report.loras.append({"file": str(source.path), "ratio": source.ratio, "modules": modules})
    v_prediction = is_v_prediction(model)
    metadata = {**modelspec_keys(model.family, v_prediction, kind="", title=out.stem),
                "modelspec.merged_from": ", ".join([Path(base).name, *(source.label for source in sources)])}
    save_checkpoint(model, out, metadata, save_dtype)
    return report


def _layers_by_name(model: LoadedModel) -> dict[str, nn.Linear | nn.Conv2d]:
    """Layers under their kohya names and, for SDXL, also the diffusers-style names other tools write."""
    layers: dict[str, nn.Linear | nn.Conv2d] = {}
    for target in layer_targets(model, include_conv_blocks=True):
        layers[target.name] = target.module
        if target.alias:
            layers.setdefault(target.alias, target.module)
    return layers


def _merge_one(lora: KohyaLoRA, ratio: float, layers: dict[str, nn.Linear | nn.Conv2d], family: str) -> None:
    unknown = [name for name in lora.modules if name not in layers]
    if unknown:
        raise ToolError(f"{lora.path}: {len(unknown)} module(s) have no layer in this {family} model: "
                        f"{some_names(unknown)}; was the LoRA trained on another model family?")
    for name, weights in lora.modules.items():
        _add_delta(layers[name].weight, weights, ratio, f"{lora.path}: module {name}")


def _add_delta(weight: torch.Tensor, weights: LoRAWeights, ratio: float, where: str) -> None:
    delta = weights.delta()
    if delta.numel() != weight.numel():  # a 1x1 conv stored as Linear (or back) only differs in shape
        raise ToolError(f"{where} changes a weight of shape {tuple(delta.shape)}, but the model's layer has "
                        f"{tuple(weight.shape)}; the LoRA was trained on a model of another size or family")
    weight.add_(delta.reshape(weight.shape).to(weight.dtype), alpha=ratio)
