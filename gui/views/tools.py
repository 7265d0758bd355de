"""The Tools tab's logic, apart from its components and command lines: running the engine's tools and reading their
reports, the configs the latent cache and the doctor run on, and what model file headers say (command lines:
gui.tools_commands; what the page shows of the reports: gui.tools_render).

The LoRA tools load torch, so they always run as engine processes (gui.jobs.EngineJob); each reports in its `done`
event (docs/events.md), which is what this module reads. A config's paths must be inside the folders this app may
use, every path it names, as for a run started from the GUI (gui.train_start.confined_config).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cli.lora_cmd import TEXT_ENCODER_OPTIONS
from engine.config.absolute import absolute_config
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
from engine.rundir.layout import CONFIG_FILE
from gui.browse import FileRoots, PathNotAllowed
from gui.doctor_view import report_for
from gui.jobs import EngineJob, JobUpdate
from gui.tools_commands import INTO_MODEL_FLAG, ToolInputError, checked_path, inspect_command
from gui.train_start import confined_config

# what the file browser lists for each kind of input (the suffixes the engine reads)
LORA_EXTENSIONS = (".safetensors", ".ckpt", ".pt")
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".sft")  # .sft: BFL's name for the FLUX.1 files
TEXT_ENCODER_EXTENSIONS = (".safetensors", ".sft")  # merged tensor by tensor from the header: no pickles
CONFIG_EXTENSIONS = (".toml", ".json")
# The text encoders FLUX.1/Chroma keep in their own files, by the LoRA prefix of their modules -> `lora merge`
# option stem (engine.cli.lora_cmd.TEXT_ENCODER_OPTIONS; engine.networks.tools.model_files maps them the same way,
# but it loads torch).
TEXT_ENCODER_PREFIXES = {"lora_te1": "clip-l", "lora_te2": "clip-g", "lora_te3": "t5xxl"}
# SD3 single files may hold their text encoders; these keys name them in engine.data.model_kinds.SD3Model.embedded
_SD3_EMBEDDED_PARTS = {"lora_te1": "clip_l", "lora_te2": "clip_g", "lora_te3": "t5xxl"}
# Where a config for the doctor or the latent cache comes from: value -> label
CONFIG_SOURCES = {"file": "A config file", "current": "The Parameters tab's current settings"}


@dataclass
class ToolOutcome:
    """A LoRA tool's report (its `done` event's fields), or the engine's message when it refused or failed."""

    report: dict[str, Any] | None
    error: str = ""


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

# The `done` event's fields that say which event and tool it is; the others are the tool's report
_EVENT_FIELDS = ("type", "time", "task", "tool")


def outcome_of(update: JobUpdate) -> ToolOutcome:
    """The report in a finished `lora ...` job's `done` event, or the engine's message for what went wrong."""
    done = update.last("done")
    if done is None:  # it failed before it could report (a crash: the last lines of its output say why)
        return ToolOutcome(None, update.error_text() or "the engine wrote no report")
    if "error" in done:
        return ToolOutcome(None, done["error"])
    return ToolOutcome({key: value for key, value in done.items() if key not in _EVENT_FIELDS})


def run_lora_tool(args: list[str]) -> ToolOutcome:
    """Run one `python -m engine lora ...` to its end and read its report."""
    return outcome_of(EngineJob(args).run())


def run_and_inspect(args: list[str]) -> tuple[ToolOutcome, ToolOutcome | None]:
    """Run merge/resize/extract/convert, then inspect the LoRA it wrote (None when the tool failed, wrote a model
    or a diffusers-named LoRA)."""
    outcome = run_lora_tool(args)
    if outcome.report is None or INTO_MODEL_FLAG in args:  # a merged checkpoint is not a LoRA to inspect
        return outcome, None
    if outcome.report.get("to") == "diffusers":  # inspect reads kohya files; the convert report says the rest
        return outcome, None
    return outcome, run_lora_tool(inspect_command(outcome.report["output"]))
