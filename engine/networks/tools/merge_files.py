"""``lora merge --into-model`` for models kept as separate files (FLUX.1 / Chroma: the BFL transformer file, and
CLIP-L / T5 files; SD3 / SD3.5: the SAI single file, and CLIP-L / CLIP-G / T5 files unless it holds them), as
sd-scripts' ``flux_merge_lora.py`` (``--clip_l``, ``--t5xxl``, ``--clip_l_save_to``, ``--t5xxl_save_to``).

Each LoRA module is matched to the file key it changes (:class:`~engine.networks.tools.model_files.NameIndex`,
ComfyUI's rule, spec §5.5) and adds ``ratio * alpha/rank * up @ down`` to it, summed over the LoRAs in float32 and
cast once to the saved dtype. Transformer modules go into the base file; text-encoder modules into the separate file
given for them (written anew), else into the base file when it holds that encoder (an all-in-one file); a LoRA with
text-encoder modules and no file for them is refused with the options to give. Every output is checked before
any work, and the files are streamed tensor by tensor (a FLUX.1 transformer is 24 GB in bf16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.models.families import family_info
from engine.networks.tools.lora_file import (
    KohyaLoRA,
    LoRASource,
    LoRAWeights,
    ToolError,
    count_parts,
    module_part,
    new_output,
    read_kohya_lora,
    some_names,
)
from engine.networks.tools.merge_model_report import ModelMergeReport
from engine.networks.tools.metadata_keys import modelspec_keys
from engine.networks.tools.model_files import (
    FILE_MODELS,
    MODEL_FILE_SUFFIXES,
    FileModelKind,
    ModelFile,
    NameIndex,
    TensorInfo,
    open_model_file,
    output_dtype,
    torch_dtype,
    write_streamed,
)

if TYPE_CHECKING:
    import torch

__all__ = ["merge_into_model_files"]

# (ratio, weights, where) of every module that changes one key
Changes = dict[str, list[tuple[float, LoRAWeights, str]]]


@dataclass
class _Target:
    """One file the merge reads (``source``) and writes (``output``), with the changes to its keys."""

    role: str  # "base model", "--clip-l", ...
    source: ModelFile
    output: Path
    changes: Changes = field(default_factory=dict)
    indexes: dict[str, NameIndex] = field(default_factory=dict)
    scopes: Mapping[str, str] = field(default_factory=dict)  # LoRA prefix -> its encoder's key prefix in this file

    def key_for(self, name: str) -> str | None:
        prefix = f"lora_{module_part(name)}"
        if prefix not in self.indexes:
            self.indexes[prefix] = NameIndex(self.source, prefix, self.scopes.get(prefix, ""))
        index = self.indexes[prefix]
        if index.is_ambiguous(name):
            raise ToolError(f"{self.source.path}: the LoRA module {name} fits more than one weight of this file; "
                            "it holds several models under different prefixes")
        return index.key(name)


def merge_into_model_files(base: str | Path, sources: Sequence[LoRASource], output: str | Path, *, family: str,
                           save_dtype: torch.dtype | None = None,
                           text_encoders: Mapping[str, tuple[str | Path | None, str | Path | None]] | None = None
                           ) -> ModelMergeReport:
    """Merge kohya LoRAs into a model's files (``FamilyInfo.loader`` listed in ``FILE_MODELS``).

    Args:
        base: the denoiser's file (BFL layout for FLUX.1/Chroma, a SAI single file for SD3).
        sources: the LoRA files and their ratios.
        output: the new denoiser file (.safetensors or .sft).
        family: the base model's family.
        save_dtype: dtype of the saved floating tensors (None: each keeps the file's own).
        text_encoders: by option stem ("clip-l", "clip-g", "t5xxl"): (the encoder's file, the new file), for LoRAs
            that change it.

    Raises:
        ToolError: an existing output or one that is an input, a missing half of a text-encoder pair, an option the
            family has no encoder for, LoRA modules with no weight in the files (another family), shapes that do
            not fit, or text-encoder modules without a file to merge them into.
    """
    kind = FILE_MODELS[family_info(family).loader]
    encoders = _encoder_files(kind, family, text_encoders or {})
    inputs = [Path(base), *(source.path for source in sources), *(Path(pair[0]) for pair in encoders.values())]
    out = new_output(output, inputs, MODEL_FILE_SUFFIXES)
    outputs = {option: new_output(pair[1], [*inputs, out], MODEL_FILE_SUFFIXES) for option, pair in encoders.items()}
    _check_distinct([out, *outputs.values()])
    loras = [read_kohya_lora(source.path, action="merged") for source in sources]
    base_file = open_model_file(base, "base model")
    problem = kind.layout_problem(base_file)
    if problem:
        raise ToolError(f"base model {base_file.path} {problem}")
    main = _Target("base model", base_file, out, scopes={prefix: encoder.embedded for prefix, encoder
                                                         in kind.text_encoder_files.items() if encoder.embedded})
    by_prefix = {prefix: _Target(f"--{encoder.option}", open_model_file(encoders[encoder.option][0],
                                                                        f"--{encoder.option}"), outputs[encoder.option])
                 for prefix, encoder in kind.text_encoder_files.items() if encoder.option in encoders}
    for source, lora in zip(sources, loras, strict=True):
        _plan(lora, source.ratio, main, by_prefix, kind, family)
    _check_used(by_prefix, kind)
    variant = kind.variant(base_file)
    metadata = {**base_file.metadata, **modelspec_keys(family, False, kind="", title=out.stem, variant=variant),
                "modelspec.merged_from": ", ".join([base_file.path.name, *(source.label for source in sources)])}
    _write(main, save_dtype, metadata)
    for target in by_prefix.values():
        _write(target, save_dtype, target.source.metadata)
    report = ModelMergeReport(str(out), str(base), family)
    report.components = {target.role.removeprefix("--"): str(target.output) for target in by_prefix.values()}
    for source, lora in zip(sources, loras, strict=True):
        report.loras.append({"file": str(source.path), "ratio": source.ratio, "modules": count_parts(lora.modules)})
    return report


def _encoder_files(kind: FileModelKind, family: str,
                   given: Mapping[str, tuple[str | Path | None, str | Path | None]]) -> dict[str, tuple[Path, Path]]:
    """The text-encoder pairs given, each whole, each for an encoder of this family."""
    options = {encoder.option: (prefix, encoder) for prefix, encoder in kind.text_encoder_files.items()}
    prefixes = family_info(family).text_encoder_lora_prefixes
    pairs = {}
    for option, (source, target) in given.items():
        if not source and not target:
            continue
        if option not in options or options[option][0] not in prefixes:
            raise ToolError(f"--{option}: a {family} model has no such text encoder; leave --{option} and "
                            f"--{option}-save-to out")
        if not source or not target:
            missing = f"--{option}" if not source else f"--{option}-save-to"
            raise ToolError(f"--{option} and --{option}-save-to go together: give {missing} too (the "
                            f"{options[option][1].label} file to merge into, and the new file to write)")
        pairs[option] = (Path(source).expanduser(), Path(target).expanduser())
    return pairs


def _check_distinct(outputs: Sequence[Path]) -> None:
    seen: set[Path] = set()
    for path in outputs:
        if path.resolve() in seen:
            raise ToolError(f"{path} is named for two outputs; give each output its own file")
        seen.add(path.resolve())


def _plan(lora: KohyaLoRA, ratio: float, main: _Target, by_prefix: dict[str, _Target], kind: FileModelKind,
          family: str) -> None:
    """Assign each module of ``lora`` to the key it changes; refuse what has nowhere to go."""
    unknown: list[str] = []
    without_file: dict[str, list[str]] = {}
    for name, weights in lora.modules.items():
        prefix = f"lora_{module_part(name)}"
        target = by_prefix.get(prefix, main)  # the encoder's own file when given, as the loaders prefer it
        key = target.key_for(name)
        if key is None:
            encoder = kind.text_encoder_files.get(prefix)
            if encoder is not None and prefix in family_info(family).text_encoder_lora_prefixes \
                    and prefix not in by_prefix:
                without_file.setdefault(prefix, []).append(name)
            else:
                unknown.append(name)
            continue
        _check_shape(target, key, weights, f"{lora.path}: module {name}")
        target.changes.setdefault(key, []).append((ratio, weights, f"{lora.path}: module {name}"))
    for prefix, names in without_file.items():
        encoder = kind.text_encoder_files[prefix]
        raise ToolError(f"{lora.path} has {len(names)} {encoder.label} module(s) ({prefix}_...) and the base model "
                        f"has no {encoder.label}: give --{encoder.option} (the {encoder.label} file to merge them "
                        f"into) and --{encoder.option}-save-to (the new file), or merge a LoRA without them")
    if unknown:
        raise ToolError(f"{lora.path}: {len(unknown)} module(s) have no weight in this {family} model: "
                        f"{some_names(unknown)}; was the LoRA trained on another model family or variant?")


def _check_shape(target: _Target, key: str, weights: LoRAWeights, where: str) -> None:
    shape = target.source.tensors[key].shape
    if math.prod(weights.weight_shape) != math.prod(shape):  # a 1x1 conv stored as Linear only differs in shape
        raise ToolError(f"{where} changes a weight of shape {weights.weight_shape}, but {key} in "
                        f"{target.source.path} has {shape}; the LoRA was trained on a model of another size or family")


def _check_used(by_prefix: Mapping[str, _Target], kind: FileModelKind) -> None:
    for prefix, target in by_prefix.items():
        if not target.changes:
            encoder = kind.text_encoder_files[prefix]
            raise ToolError(f"the LoRAs have no {encoder.label} modules ({prefix}_...) to merge into "
                            f"{target.source.path}; leave {target.role} and {target.role}-save-to out")


def _write(target: _Target, save_dtype: torch.dtype | None, metadata: Mapping[str, str]) -> None:
    from safetensors import safe_open

    layout = {key: TensorInfo(info.shape, output_dtype(info, save_dtype))
              for key, info in target.source.tensors.items()}
    with safe_open(str(target.source.path), "pt") as handle:

        def tensor(key: str) -> torch.Tensor:
            value = handle.get_tensor(key)
            changes = target.changes.get(key)
            if changes:
                merged = value.float()
                for ratio, weights, _ in changes:
                    merged.add_(weights.delta().reshape(merged.shape), alpha=ratio)
                value = merged
            return value.to(torch_dtype(layout[key].dtype))

        write_streamed(target.output, layout, tensor, metadata)

