"""The Tools tab's command lines: `python -m engine lora inspect|merge|resize|extract|convert ...` and
`cache-latents`, built from the page's fields as argument lists (never a shell string). The flags are not typed
here: each command line is written by engine.cli.options.to_argv from the engine's declaration of the tool's options
(engine.cli.lora_cmd's *Options, engine.cli.cache_cmd.CacheLatentsOptions), the one its parser is built from.

The engine checks the inputs and refuses to overwrite a file; this module only checks what the engine cannot know:
which fields the user left empty and whether a path is inside the folders this app may use (gui.browse.FileRoots.check,
the rule of every GUI path field). Running the commands and reading their reports is gui.views.tools'; what the page
shows of the reports, gui.tools_render's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from engine.cli.cache_cmd import TASK as CACHE_TASK
from engine.cli.cache_cmd import CacheLatentsOptions
from engine.cli.lora_cmd import TASK as LORA_TASK
from engine.cli.lora_cmd import (
    TEXT_ENCODER_OPTIONS,
    ConvertOptions,
    ExtractOptions,
    InspectOptions,
    MergeOptions,
    ReportOptions,
    ResizeOptions,
)
from engine.cli.options import cli_option, to_argv, value_text
from gui.browse import FileRoots, PathNotAllowed

LORA_SUFFIX = ".safetensors"
PRECISIONS: tuple[str, ...] = cli_option(ResizeOptions, "save_precision").choices or ()
# `lora merge` without --save-precision keeps a FLUX.1/Chroma file's own dtype (a bf16 12B transformer written as
# float32 would be 48 GB) and writes LoRAs and SD checkpoints in float32; "keep" leaves the option out.
KEEP_PRECISION = "keep"
MERGE_PRECISIONS: tuple[str, ...] = (KEEP_PRECISION, *(name for name in PRECISIONS if name != KEEP_PRECISION))
# resize rule (the engine's option: ResizeOptions' field) -> (its flag, what the value means to a user)
_RULE_MEANINGS = {
    "rank": "a fixed rank for every module",
    "sv_ratio": "keep singular values at least the largest / X",
    "sv_fro": "keep this fraction (0-1) of each module's Frobenius norm",
}
RESIZE_RULES: dict[str, tuple[str, str]] = {rule: (cli_option(ResizeOptions, rule).flag, meaning)
                                            for rule, meaning in _RULE_MEANINGS.items()}
# `lora convert` targets (the engine's, in its order) -> what the choice means to a user
_CONVERT_MEANINGS = {
    "diffusers": "diffusers names (from a kohya file: FluxPipeline / StableDiffusion3Pipeline load the new file)",
    "kohya": "kohya names (from a diffusers/PEFT file: ComfyUI and Atelier load the new file)",
}
CONVERT_CHOICES: dict[str, str] = {target: _CONVERT_MEANINGS[target]
                                   for target in cli_option(ConvertOptions, "to").choices or ()}
CONVERT_AUTO = "auto"  # no --family: the engine reads it from the file
CONVERT_FAMILY_CHOICES: tuple[str, ...] = (CONVERT_AUTO, *(cli_option(ConvertOptions, "family").choices or ()))
INTO_MODEL_FLAG = cli_option(MergeOptions, "into_model").flag  # a merge that writes a checkpoint, not a LoRA
DEVICE_AUTO = "auto"  # no --device: the engine's choice
CACHE_DEVICES: tuple[str, ...] = (DEVICE_AUTO, *(cli_option(CacheLatentsOptions, "device").choices or ()))


class ToolInputError(ValueError):
    """A field the user must fill or change before the engine is asked; the message names the field."""



# --- checking fields ---------------------------------------------------------------------------------------------


def checked_path(value: str | None, label: str, roots: FileRoots, *, required: bool = True) -> str:
    """The path typed into a field, stripped; '' for an empty optional field.

    Raises:
        ToolInputError: an empty required field, or a path the app may not use (the message of every path field).
    """
    text = (value or "").strip()
    if not text:
        if required:
            raise ToolInputError(f"{label}: enter a path")
        return ""
    try:
        return str(roots.check(text, label))
    except PathNotAllowed as error:
        raise ToolInputError(str(error)) from None


def _positive(value: float | None, label: str) -> float:
    if value is None:
        raise ToolInputError(f"{label}: enter a number")
    if value <= 0:
        raise ToolInputError(f"{label}: must be more than 0")
    return value


def _optional(value: float | None, label: str) -> float | None:
    """A number field where 0 (or blank) means 'not given': a Gradio Number sends 0 for an empty box."""
    if not value:
        return None
    return _positive(value, label)


def default_output(source: str, tag: str) -> str:
    """'<folder>/<stem>_<tag>.safetensors' next to `source`, with -2, -3... when that file exists (the tools never
    overwrite, so a default must be free)."""
    path = Path(source)
    stem = path.stem if path.suffix else path.name  # a diffusers folder has no suffix
    candidate = path.with_name(f"{stem}_{tag}{LORA_SUFFIX}")
    number = 2
    while candidate.exists():
        candidate = path.with_name(f"{stem}_{tag}-{number}{LORA_SUFFIX}")
        number += 1
    return str(candidate)


def _output(value: str | None, roots: FileRoots, source: str, tag: str) -> str:
    return checked_path(value, "Output file", roots, required=False) or default_output(source, tag)


# --- command lines -----------------------------------------------------------------------------------------------


def _lora_args(tool: str, options_type: type, values: Mapping[str, Any]) -> list[str]:
    """`lora TOOL ... --json`, written from the engine's declaration of the tool's options (None leaves one out)."""
    return [LORA_TASK, tool, *to_argv(options_type, values), *to_argv(ReportOptions, {"json": True})]


def inspect_command(path: str) -> list[str]:
    """`lora inspect FILE --json` of a path already checked, e.g. the file a tool just wrote."""
    return _lora_args("inspect", InspectOptions, {"file": path})


def inspect_args(path: str | None, roots: FileRoots) -> list[str]:
    """`lora inspect FILE --json`. Raises ToolInputError for an empty or disallowed path (as do the others)."""
    return inspect_command(checked_path(path, "LoRA file", roots))


def merge_sources(text: str | None) -> list[str]:
    """The lines of the merge list: 'PATH' or 'PATH:RATIO' each, as the engine reads them."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def add_merge_source(text: str | None, path: str | None, ratio: float | None) -> str:
    """The merge list with one more line, 'PATH:RATIO' (no ratio: the engine's default of 1)."""
    line = (path or "").strip()
    if not line:
        return text or ""
    if ratio is not None:
        line += f":{ratio:g}"
    return "\n".join([*merge_sources(text), line])


def split_source(source: str) -> tuple[str, float | None]:
    """'PATH:RATIO' -> (PATH, RATIO); a colon not followed by a number belongs to the path, as the engine reads it."""
    path, colon, ratio = source.rpartition(":")
    try:
        return (path, float(ratio)) if colon else (source, None)
    except ValueError:
        return source, None


def _precision(precision: str | None) -> str | None:
    """The --save-precision value, or None (left out) for "keep", the engine's default (see KEEP_PRECISION)."""
    return None if not precision or precision == KEEP_PRECISION else precision


def _text_encoder_values(text_encoders: Mapping[str, tuple[str | None, str | None]] | None,
                         roots: FileRoots) -> dict[str, str | None]:
    """MergeOptions' text encoder files and new files (clip_l, clip_l_save_to ...) for the pairs given by option stem
    (TEXT_ENCODER_OPTIONS); None for a blank field."""
    values: dict[str, str | None] = {}
    for option, (source, target) in (text_encoders or {}).items():
        label = TEXT_ENCODER_OPTIONS[option]
        source_path = checked_path(source, f"{label} file", roots, required=False)
        target_path = checked_path(target, f"New {label} file", roots, required=False)
        if source_path and not target_path:
            target_path = default_output(source_path, "merged")
        name = option.replace("-", "_")  # the option's field: --clip-l is MergeOptions.clip_l
        values |= {name: source_path or None, f"{name}_save_to": target_path or None}
    return values


def text_encoder_args(text_encoders: Mapping[str, tuple[str | None, str | None]] | None,
                      roots: FileRoots) -> list[str]:
    """--clip-l/--t5xxl FILE and --*-save-to NEW_FILE for the pairs given, by option stem (TEXT_ENCODER_OPTIONS).

    A blank new file with an input given becomes '<input stem>_merged.safetensors' next to it (as every output
    field); a new file without its input is passed on as it is, so that the engine says what is missing.
    """
    return to_argv(MergeOptions, _text_encoder_values(text_encoders, roots))


def merge_args(sources_text: str | None, output: str | None, roots: FileRoots, *, into_model: str | None = None,
               svd_rank: float | None = None, conv_rank: float | None = None, precision: str = KEEP_PRECISION,
               text_encoders: Mapping[str, tuple[str | None, str | None]] | None = None) -> list[str]:
    """`lora merge` of the listed LoRAs into one LoRA, or into `into_model` when given; 0 ranks mean not given.
    `text_encoders`: for a FLUX.1/Chroma model, each encoder's (file, new file) by option stem."""
    sources = merge_sources(sources_text)
    if not sources:
        raise ToolInputError("LoRAs to merge: add one or more LoRA files")
    paths = [checked_path(split_source(source)[0], "LoRAs to merge", roots) for source in sources]
    model = checked_path(into_model, "Merge into model", roots, required=False)
    values = {"loras": sources, "output": _output(output, roots, model or paths[0], "merged"),
              "into_model": model or None, **_text_encoder_values(text_encoders, roots),
              "svd": _optional(svd_rank, "SVD rank"), "conv_rank": _optional(conv_rank, "Conv rank"),
              "save_precision": _precision(precision)}
    return _lora_args("merge", MergeOptions, values)


def resize_args(path: str | None, output: str | None, roots: FileRoots, *, rule: str, value: float | None,
                conv_rank: float | None = None, precision: str = "float") -> list[str]:
    """`lora resize` by one of RESIZE_RULES; the default output name says the rule and value (style_rank8)."""
    source = checked_path(path, "LoRA file", roots)
    if rule not in RESIZE_RULES:
        raise ToolInputError(f"New size by: choose one of {', '.join(RESIZE_RULES)}")
    amount = _positive(value, "New size")
    values = {"file": source, "output": _output(output, roots, source, f"{rule}{value_text(amount)}"),
              rule: amount, "conv_rank": _optional(conv_rank, "Conv rank"), "save_precision": precision}
    return _lora_args("resize", ResizeOptions, values)


def extract_args(base: str | None, tuned: str | None, output: str | None, roots: FileRoots, *, rank: float | None,
                 conv_rank: float | None = None, min_diff: float | None = None, device: str = "cpu",
                 precision: str = "float", clamp_quantile: float | None = None) -> list[str]:
    """`lora extract` of tuned minus base; conv rank 0 means no 3x3 convs, min_diff None the engine's default,
    clamp quantile 0 or None no clipping (the engine checks it is at most 1)."""
    base_path = checked_path(base, "Base model", roots)
    tuned_path = checked_path(tuned, "Fine-tuned model", roots)
    size = _positive(rank, "Rank")
    values = {"base": base_path, "tuned": tuned_path,
              "output": _output(output, roots, tuned_path, f"lora_r{value_text(size)}"), "rank": size,
              "conv_rank": _optional(conv_rank, "Conv rank"), "min_diff": min_diff,
              "clamp_quantile": _optional(clamp_quantile, "Clamp quantile"), "device": device or "cpu",
              "save_precision": precision}
    return _lora_args("extract", ExtractOptions, values)


def convert_args(path: str | None, output: str | None, roots: FileRoots, *, to: str, family: str = CONVERT_AUTO
                 ) -> list[str]:
    """`lora convert FILE --to diffusers|kohya`; the default output says the naming (style_diffusers). The engine
    refuses an existing output, so no --overwrite from the page."""
    source = checked_path(path, "LoRA file", roots)
    if to not in CONVERT_CHOICES:
        raise ToolInputError(f"Convert to: choose one of {', '.join(CONVERT_CHOICES)}")
    values = {"file": source, "to": to, "output": _output(output, roots, source, to),
              "family": None if not family or family == CONVERT_AUTO else family}
    return _lora_args("convert", ConvertOptions, values)


def cache_args(config_path: str, *, skip_existing: bool = False, device: str | None = None,
               workers: float | None = None) -> list[str]:
    """`cache-latents CONFIG ...`; EngineJob adds --events. device None or 'auto': the engine's choice.
    skip_existing False re-encodes up-to-date entries too (--force; the engine keeps them by default)."""
    values = {"config": config_path, "skip_existing": skip_existing, "force": not skip_existing,
              "device": device if device and device != DEVICE_AUTO else None,
              "workers": _optional(workers, "Workers")}
    return [CACHE_TASK, *to_argv(CacheLatentsOptions, values)]


def command_text(args: Iterable[str]) -> str:
    """The command line a user could run in a terminal, for the status line."""
    return "python -m engine " + " ".join(f'"{arg}"' if " " in arg else arg for arg in args)
