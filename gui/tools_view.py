"""The Tools tab's logic, apart from its components: command lines for `python -m engine lora ...` and
`cache-latents`, running them and reading their JSON reports, and the doctor on any config (what the page shows of
the reports: gui.tools_render).

The LoRA tools load torch, so they always run as engine processes (gui.jobs.EngineJob); they print one JSON report
(`--json`), which `parse_report` finds in the process output. The engine checks the inputs and refuses to overwrite
a file; this module only checks what the engine cannot know: which fields the user left empty and whether a path is
inside the folders this app may use (gui.browse.FileRoots.check, the rule of every GUI path field; for a config, every
path it names, as a run started from the GUI: gui.train_start.confined_config).
"""

from __future__ import annotations

import json
import tempfile
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cli.lora_cmd import CONVERT_FAMILIES, CONVERT_TARGETS, TEXT_ENCODER_OPTIONS
from engine.config.choices import SavePrecision
from engine.config.io import (
    config_to_dict,
    deep_merge,
    default_config_dict,
    read_config_document,
    save_config,
)
from engine.config.schema import RunConfig
from engine.data.doctor_models import file_header, flux_family_of, safetensors_header_json
from engine.data.model_kinds import read_sd3_file
from engine.models.families import family_info
from engine.train.run import absolute_config
from gui.browse import FileRoots, PathNotAllowed
from gui.doctor_view import report_for
from gui.jobs import EngineJob, JobUpdate
from gui.train_start import confined_config

LORA_SUFFIX = ".safetensors"
# what the file browser lists for each kind of input (the suffixes the engine reads)
LORA_EXTENSIONS = (".safetensors", ".ckpt", ".pt")
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".sft")  # .sft: BFL's name for the FLUX.1 files
TEXT_ENCODER_EXTENSIONS = (".safetensors", ".sft")  # merged tensor by tensor from the header: no pickles
CONFIG_EXTENSIONS = (".toml", ".json")
PRECISIONS: tuple[str, ...] = typing.get_args(SavePrecision)
# `lora merge` without --save-precision keeps a FLUX.1/Chroma file's own dtype (a bf16 12B transformer written as
# float32 would be 48 GB) and writes LoRAs and SD checkpoints in float32; "keep" leaves the option out.
KEEP_PRECISION = "keep"
MERGE_PRECISIONS: tuple[str, ...] = (KEEP_PRECISION, *(name for name in PRECISIONS if name != KEEP_PRECISION))
# The text encoders FLUX.1/Chroma keep in their own files, by the LoRA prefix of their modules -> `lora merge`
# option stem (engine.cli.lora_cmd.TEXT_ENCODER_OPTIONS; engine.networks.tools.model_files maps them the same way,
# but it loads torch).
TEXT_ENCODER_PREFIXES = {"lora_te1": "clip-l", "lora_te2": "clip-g", "lora_te3": "t5xxl"}
# SD3 single files may hold their text encoders; these keys name them in engine.data.model_kinds.SD3Model.embedded
_SD3_EMBEDDED_PARTS = {"lora_te1": "clip_l", "lora_te2": "clip_g", "lora_te3": "t5xxl"}
# resize rule (as the engine names it) -> (its option, what the value means to a user)
RESIZE_RULES: dict[str, tuple[str, str]] = {
    "rank": ("--rank", "a fixed rank for every module"),
    "sv_ratio": ("--sv-ratio", "keep singular values at least the largest / X"),
    "sv_fro": ("--sv-fro", "keep this fraction (0-1) of each module's Frobenius norm"),
}
# `lora convert` targets (the engine's, in its order) -> what the choice means to a user
_CONVERT_MEANINGS = {
    "diffusers": "diffusers names (from a kohya file: FluxPipeline / StableDiffusion3Pipeline load the new file)",
    "kohya": "kohya names (from a diffusers/PEFT file: ComfyUI and Atelier load the new file)",
}
CONVERT_CHOICES: dict[str, str] = {target: _CONVERT_MEANINGS[target] for target in CONVERT_TARGETS}
CONVERT_AUTO = "auto"  # no --family: the engine reads it from the file
CONVERT_FAMILY_CHOICES: tuple[str, ...] = (CONVERT_AUTO, *CONVERT_FAMILIES)
CONFIG_FILE = "config.toml"
# Where a config for the doctor or the latent cache comes from: value -> label
CONFIG_SOURCES = {"file": "A config file", "current": "The Parameters tab's current settings"}


class ToolInputError(ValueError):
    """A field the user must fill or change before the engine is asked; the message names the field."""


@dataclass
class ToolOutcome:
    """A LoRA tool's JSON report, or the engine's message when it refused or failed."""

    report: dict[str, Any] | None
    error: str = ""


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


def _int_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _option(flag: str, value: float | None) -> list[str]:
    return [] if value is None else [flag, _int_text(value)]


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


def inspect_args(path: str | None, roots: FileRoots) -> list[str]:
    """`lora inspect FILE --json`. Raises ToolInputError for an empty or disallowed path (as do the others)."""
    return ["lora", "inspect", checked_path(path, "LoRA file", roots), "--json"]


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


def _precision_args(precision: str | None) -> list[str]:
    """--save-precision, or nothing for "keep" (the engine's default: see KEEP_PRECISION)."""
    return [] if not precision or precision == KEEP_PRECISION else ["--save-precision", precision]


def text_encoder_args(text_encoders: Mapping[str, tuple[str | None, str | None]] | None,
                      roots: FileRoots) -> list[str]:
    """--clip-l/--t5xxl FILE and --*-save-to NEW_FILE for the pairs given, by option stem (TEXT_ENCODER_OPTIONS).

    A blank new file with an input given becomes '<input stem>_merged.safetensors' next to it (as every output
    field); a new file without its input is passed on as it is, so that the engine says what is missing.
    """
    args: list[str] = []
    for option, (source, target) in (text_encoders or {}).items():
        label = TEXT_ENCODER_OPTIONS[option]
        source_path = checked_path(source, f"{label} file", roots, required=False)
        target_path = checked_path(target, f"New {label} file", roots, required=False)
        if source_path and not target_path:
            target_path = default_output(source_path, "merged")
        args += [f"--{option}", source_path] if source_path else []
        args += [f"--{option}-save-to", target_path] if target_path else []
    return args


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
    args = ["lora", "merge", *sources, "-o", _output(output, roots, model or paths[0], "merged")]
    args += ["--into-model", model] if model else []
    args += text_encoder_args(text_encoders, roots)
    args += _option("--svd", _optional(svd_rank, "SVD rank"))
    args += _option("--conv-rank", _optional(conv_rank, "Conv rank"))
    return [*args, *_precision_args(precision), "--json"]


def resize_args(path: str | None, output: str | None, roots: FileRoots, *, rule: str, value: float | None,
                conv_rank: float | None = None, precision: str = "float") -> list[str]:
    """`lora resize` by one of RESIZE_RULES; the default output name says the rule and value (style_rank8)."""
    source = checked_path(path, "LoRA file", roots)
    flag = RESIZE_RULES[rule][0]
    amount = _positive(value, "New size")
    args = ["lora", "resize", source, "-o", _output(output, roots, source, f"{rule}{_int_text(amount)}"),
            flag, _int_text(amount)]
    args += _option("--conv-rank", _optional(conv_rank, "Conv rank"))
    return [*args, "--save-precision", precision, "--json"]


def extract_args(base: str | None, tuned: str | None, output: str | None, roots: FileRoots, *, rank: float | None,
                 conv_rank: float | None = None, min_diff: float | None = None, device: str = "cpu",
                 precision: str = "float", clamp_quantile: float | None = None) -> list[str]:
    """`lora extract` of tuned minus base; conv rank 0 means no 3x3 convs, min_diff None the engine's default,
    clamp quantile 0 or None no clipping (the engine checks it is at most 1)."""
    base_path = checked_path(base, "Base model", roots)
    tuned_path = checked_path(tuned, "Fine-tuned model", roots)
    size = _positive(rank, "Rank")
    args = ["lora", "extract", "--base", base_path, "--tuned", tuned_path,
            "-o", _output(output, roots, tuned_path, f"lora_r{_int_text(size)}"), "--rank", _int_text(size)]
    args += _option("--conv-rank", _optional(conv_rank, "Conv rank"))
    args += [] if min_diff is None else ["--min-diff", f"{min_diff:g}"]
    quantile = _optional(clamp_quantile, "Clamp quantile")
    args += [] if quantile is None else ["--clamp-quantile", f"{quantile:g}"]
    return [*args, "--device", device or "cpu", "--save-precision", precision, "--json"]


def convert_args(path: str | None, output: str | None, roots: FileRoots, *, to: str, family: str = CONVERT_AUTO
                 ) -> list[str]:
    """`lora convert FILE --to diffusers|kohya`; the default output says the naming (style_diffusers). The engine
    refuses an existing output, so no --overwrite from the page."""
    source = checked_path(path, "LoRA file", roots)
    if to not in CONVERT_CHOICES:
        raise ToolInputError(f"Convert to: choose one of {', '.join(CONVERT_CHOICES)}")
    args = ["lora", "convert", source, "--to", to, "-o", _output(output, roots, source, to)]
    args += [] if not family or family == CONVERT_AUTO else ["--family", family]
    return [*args, "--json"]


def cache_args(config_path: str, *, skip_existing: bool = False, device: str | None = None,
               workers: float | None = None) -> list[str]:
    """`cache-latents CONFIG ...`; EngineJob adds --events. device None or 'auto': the engine's choice.
    skip_existing False re-encodes up-to-date entries too (--force; the engine keeps them by default)."""
    args = ["cache-latents", config_path]
    args += ["--skip-existing"] if skip_existing else ["--force"]
    args += ["--device", device] if device and device != "auto" else []
    return args + _option("--workers", _optional(workers, "Workers"))


# --- configs -----------------------------------------------------------------------------------------------------


def config_from_file(path: str | None, roots: FileRoots) -> tuple[dict[str, Any], Path]:
    """A run config file (TOML, or JSON preset) as a config dict and the folder its relative paths start from.

    Raises:
        ToolInputError: an empty field, or a path (of the file or in it) the app may not use.
        ConfigError: the file is missing or not a valid config; its problems name the fields.
    """
    file = Path(checked_path(path, "Config file", roots))
    data = read_config_document(file)
    base_dir = file.resolve().parent
    return config_to_dict(_confined(data, roots, base_dir, source=str(file))), base_dir


def _confined(config_dict: Mapping[str, Any], roots: FileRoots, base_dir: Path, source: str = "") -> RunConfig:
    """The config once every path it names may be used from the GUI (see gui.train_start.confined_config).

    Raises:
        ToolInputError: the paths the app may not use, each with its field.
        ConfigError: the config is not valid.
    """
    try:
        return confined_config(config_dict, roots, base_dir, source=source, check_packages=False)
    except PathNotAllowed as error:
        raise ToolInputError(str(error)) from None


def _current(config_dict: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The Parameters tab's config; it holds None while its form has problems."""
    if config_dict is None:
        raise ToolInputError("Parameters: the current settings have problems; fix them in the Parameters tab first")
    return config_dict


def write_temp_config(config_dict: Mapping[str, Any] | None, base_dir: str | Path, roots: FileRoots) -> Path:
    """The Parameters tab's config as a TOML file in a new temporary folder, with every local path made absolute
    against `base_dir` (so the engine finds them from there).

    Raises:
        ToolInputError: there is no valid config (the Parameters tab shows its problems), or it names paths the
            app may not use.
        ConfigError: the config is not valid.
    """
    config = _confined(deep_merge(default_config_dict(), dict(_current(config_dict))), roots, Path(base_dir))
    path = Path(tempfile.mkdtemp(prefix="atelier-tools-")) / CONFIG_FILE
    save_config(absolute_config(config, Path(base_dir)), path, header="Written by the Tools tab from the "
                                                                      "Parameters tab's settings.")
    return path


def cache_config_path(source: str, path: str | None, current: Mapping[str, Any] | None, roots: FileRoots) -> str:
    """The config file to cache latents for: the chosen file (checked here, so its problems show in the page), or
    the Parameters tab's settings written to a temporary TOML (relative paths from the GUI's working folder, as for
    a run started from the Train tab).

    Raises:
        ToolInputError, ConfigError: as :func:`config_from_file` and :func:`write_temp_config`.
    """
    if source == "current":
        return str(write_temp_config(current, Path.cwd(), roots))
    config_from_file(path, roots)
    return checked_path(path, "Config file", roots)


def doctor_report(source: str, path: str | None, current: Mapping[str, Any] | None, roots: FileRoots, *,
                  quick: bool = False) -> dict[str, Any]:
    """The dataset doctor's report for a config file or for the Parameters tab's settings.

    Raises:
        ToolInputError, ConfigError: a field to fill or a config to fix.
    """
    if source == "current":
        _confined(deep_merge(default_config_dict(), dict(_current(current))), roots, Path.cwd())
        return report_for(_current(current), Path.cwd(), quick=quick)
    config_dict, base_dir = config_from_file(path, roots)
    return report_for(config_dict, base_dir, quick=quick)


# --- model files (headers only: the GUI never imports safetensors or torch) ---------------------------------------


def _separate_prefixes(path: Path, header: Mapping[str, Any]) -> tuple[str, list[str]] | None:
    """(family, LoRA prefixes of the text encoders kept in files of their own) for a FLUX.1/Chroma transformer or
    an SD3 file without (some of) its text encoders; None for anything else (the doctor's test of the keys)."""
    found = file_header(path, header)
    family = flux_family_of(found)
    if family is not None:
        return family, list(family_info(family).text_encoder_lora_prefixes)
    sd3 = read_sd3_file(found)
    if sd3 is None:
        return None
    separate = [prefix for prefix in family_info("sd3").text_encoder_lora_prefixes
                if _SD3_EMBEDDED_PARTS[prefix] not in sd3.embedded]
    return ("sd3", separate) if separate else None


def separate_text_encoders(model: str | None, roots: FileRoots) -> tuple[str, list[str]] | None:
    """(family, labels of the text encoders kept in their own files) when `model` names a FLUX.1/Chroma file or an
    SD3 file without its text encoders; None for anything else (SD checkpoints and folders hold their own; an empty,
    disallowed or unreadable path)."""
    text = (model or "").strip()
    if not text:
        return None
    try:
        path = roots.check(text, "Merge into model")
    except PathNotAllowed:
        return None
    if path.suffix.lower() not in (".safetensors", ".sft") or not path.is_file():
        return None
    try:
        found = _separate_prefixes(path, safetensors_header_json(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if found is None:
        return None
    family, prefixes = found
    return family, [TEXT_ENCODER_OPTIONS[TEXT_ENCODER_PREFIXES[prefix]] for prefix in prefixes]


TEXT_ENCODER_HELP = ("Only for FLUX.1, Chroma and SD3 files without their text encoders, whose encoders are files of "
                     "their own (an SD checkpoint holds its own): a LoRA's CLIP-L (lora_te1), CLIP-G (lora_te2) or T5 "
                     "(lora_te3) modules are merged into new copies of them. Give the file a LoRA's modules go "
                     "into; the new file may stay blank (next to it, named *_merged).")


def text_encoder_note(model: str | None, roots: FileRoots) -> tuple[str, bool]:
    """What the text-encoder fields are for, given the base model field, and whether to open them (a FLUX file)."""
    found = separate_text_encoders(model, roots)
    if found is None:
        return TEXT_ENCODER_HELP, False
    family, labels = found
    missing = [label for label in TEXT_ENCODER_OPTIONS.values() if label not in labels]
    lines = [f"**`{Path(str(model).strip()).name}` is a `{family}` transformer:** its text encoders "
             f"({' and '.join(labels)}) are separate files. A LoRA with modules for them is refused unless each "
             "one's file is given here."]
    lines += [f"This family has no {label}: leave its fields blank." for label in missing]
    return "\n\n".join(lines), True


# --- running -----------------------------------------------------------------------------------------------------


def parse_report(output: str) -> dict[str, Any] | None:
    """The last JSON object in a process's output (stderr lines such as warnings may come before it)."""
    decoder = json.JSONDecoder()
    found = None
    position = output.find("{")
    while position != -1:
        try:
            value, end = decoder.raw_decode(output, position)
        except json.JSONDecodeError:
            position = output.find("{", position + 1)
            continue
        if isinstance(value, dict):
            found = value
        position = output.find("{", end)
    return found


def outcome_of(update: JobUpdate) -> ToolOutcome:
    """The report of a finished `lora ... --json` job, or the engine's message for what went wrong."""
    report = parse_report(update.output)
    if report is None:
        return ToolOutcome(None, update.error_text() or "the engine printed no report")
    if "error" in report:
        return ToolOutcome(None, report["error"])
    return ToolOutcome(report)


def run_lora_tool(args: list[str]) -> ToolOutcome:
    """Run one `python -m engine lora ...` to its end (the tools emit no progress events)."""
    return outcome_of(EngineJob(args, events_flag=False).run())


def run_and_inspect(args: list[str]) -> tuple[ToolOutcome, ToolOutcome | None]:
    """Run merge/resize/extract/convert, then inspect the LoRA it wrote (None when the tool failed, wrote a model
    or a diffusers-named LoRA)."""
    outcome = run_lora_tool(args)
    if outcome.report is None or "--into-model" in args:  # a merged checkpoint is not a LoRA to inspect
        return outcome, None
    if outcome.report.get("to") == "diffusers":  # inspect reads kohya files; the convert report says the rest
        return outcome, None
    return outcome, run_lora_tool(["lora", "inspect", outcome.report["output"], "--json"])


def command_text(args: Iterable[str]) -> str:
    """The command line a user could run in a terminal, for the status line."""
    return "python -m engine " + " ".join(f'"{arg}"' if " " in arg else arg for arg in args)
