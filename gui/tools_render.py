"""What the Tools tab shows: the LoRA tools' reports (their `done` events), the files they wrote, caching and config
errors, as Markdown and tables. Building the commands is gui.tools_commands', running them gui.views.tools'."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from engine.cli.lora_cmd import TEXT_ENCODER_OPTIONS
from engine.config.errors import ConfigError
from engine.data.doctor_models import file_header, flux_family_of, safetensors_header_json
from engine.data.model_kinds import read_sd3_file
from gui.jobs import JobUpdate
from gui.tools_commands import ToolInputError
from gui.views.tools import ToolOutcome

METADATA_COLUMNS = ["key", "value"]


# --- rendering ---------------------------------------------------------------------------------------------------


def counts_text(counts: Mapping[str, int]) -> str:
    """'4 (73 modules), 2 (18 modules)': a value and how many modules have it."""
    return ", ".join(f"{value} ({count} modules)" for value, count in counts.items()) or "none"


def non_finite_errors(report: Mapping[str, Any]) -> list[str]:
    """The inspect errors about NaN or inf weights (they make every image black)."""
    return [error for error in report.get("errors", []) if "NaN or inf" in error]


def _weights_line(report: Mapping[str, Any]) -> str:
    bad = non_finite_errors(report)
    return f"✖ **{bad[0]}**" if bad else "✔ No NaN or inf weights."


def parts_text(modules: Mapping[str, int]) -> str:
    """'double 12, single 8, te1 6': modules per model part, as the engine names the parts (FLUX: double/single
    blocks, te1 CLIP-L, te3 T5; SD: unet, te or te1/te2)."""
    return ", ".join(f"{part} {count}" for part, count in modules.items())


def _module_lines(report: Mapping[str, Any]) -> list[str]:
    modules = report.get("modules") or {}
    if not modules:
        return []
    lines = [f"- **Modules:** {sum(modules.values())} ({parts_text(modules)})",
             f"- **Rank:** {counts_text(report['ranks'])}",
             f"- **Alpha:** {counts_text(report['alphas'])} (0 means alpha = rank)"]
    if report.get("conv_modules"):
        lines.append(f"- **3x3 conv modules (LoCon):** {report['conv_modules']}, rank "
                     f"{counts_text(report['conv_ranks'])}")
    if report.get("split_qkv"):  # parts (3: q/k/v, 4: q/k/v/mlp) -> modules saved merged; the warning says more
        lines.append("- **split_qkv modules** (saved merged, block-diagonal lora_up): "
                     + ", ".join(f"{count} in {parts} parts" for parts, count in report["split_qkv"].items()))
    return lines


def _norm_lines(report: Mapping[str, Any]) -> list[str]:
    norms = report.get("norms") or {}
    if not norms:
        return []
    return [f"- **Change norms** |alpha/rank · up @ down|: min {norms['min']:.4g} (`{norms['min_module']}`), median "
            f"{norms['median']:.4g}, max {norms['max']:.4g} (`{norms['max_module']}`)"]


def _other_lines(report: Mapping[str, Any]) -> list[str]:
    lines = [f"- **Embedding** `{key}`: {shape[0]} vector(s) of {shape[-1]}"
             for key, shape in (report.get("embedding") or {}).items()]
    if report.get("top_tags"):
        lines.append("- **Top tags:** " + ", ".join(f"{tag} ({count})" for tag, count in report["top_tags"]))
    if report.get("unknown_keys"):
        lines.append(f"- **Unknown keys:** {len(report['unknown_keys'])}")
    lines += [f"- ⚠ {warning}" for warning in report.get("warnings", [])]
    lines += [f"- ✖ {error}" for error in report.get("errors", []) if error not in non_finite_errors(report)]
    return lines


def inspect_markdown(report: Mapping[str, Any]) -> str:
    """Format, base model, weight check, modules, ranks and alphas, norms and tags of an inspect report."""
    lines = [f"**{report['format']}** · `{report['path']}`", "", f"**Base model:** {report['base_model']}", ""]
    if report.get("family"):  # a FAMILY_INFO name, or "flux" when the names alone cannot tell FLUX.1 from Chroma
        lines += [f"**Family:** `{report['family']}`", ""]
    lines += [_weights_line(report), ""]
    return "\n".join(lines + _module_lines(report) + _norm_lines(report) + _other_lines(report))


def metadata_frame(report: Mapping[str, Any]) -> pd.DataFrame | None:
    """The training metadata (ss_* and modelspec keys) and the dataset folders, one row each; None when empty."""
    rows = [[key, str(value)] for key, value in report.get("training", {}).items()]
    rows += [[f"dataset folder {name}", json.dumps(info)] for name, info in report.get("dataset_dirs", {}).items()]
    return pd.DataFrame(rows, columns=METADATA_COLUMNS) if rows else None


def _retained_line(report: Mapping[str, Any]) -> list[str]:
    kept = report.get("retained") or {}
    if not kept:
        return []
    return [f"- Kept of each change (Frobenius): min {kept['min']:.4f} (`{kept['min_module']}`), mean "
            f"{kept['mean']:.4f}"]


def _merge_lines(report: Mapping[str, Any]) -> list[str]:
    if "family" in report:  # merged into a model
        return [f"- Base model: `{report['base']}` ({report['family']})"] + [
            f"- Merged `{entry['file']}` at {entry['ratio']:g}: {sum(entry['modules'].values())} modules "
            f"({parts_text(entry['modules'])})" for entry in report["loras"]] + [
            f"- Wrote the {TEXT_ENCODER_OPTIONS.get(option, option)}: `{path}`"
            for option, path in (report.get("components") or {}).items()]
    return [f"- Merged ({report['method']}): " + ", ".join(f"`{name}`" for name in report["inputs"]),
            f"- Ranks: {counts_text(report['ranks'])}", *_retained_line(report)]


def _resize_lines(report: Mapping[str, Any]) -> list[str]:
    return [f"- Resized `{report['input']}` ({report['rule']} {report['value']:g})",
            f"- Ranks before: {counts_text(report['ranks_before'])}",
            f"- Ranks after: {counts_text(report['ranks_after'])}", *_retained_line(report)]


def _extract_lines(report: Mapping[str, Any]) -> list[str]:
    conv = f", conv rank {report['conv_rank']}" if report["conv_rank"] else ""
    parts = ", ".join(f"{part} {count}" for part, count in report["modules"].items())
    return [f"- `{report['tuned']}` minus `{report['base']}` ({report['family']}) at rank {report['rank']}{conv}",
            f"- Modules: {sum(report['modules'].values())} ({parts})",
            *(f"- Left out {part}: {reason}" for part, reason in report["skipped"].items()), *_retained_line(report)]


def _convert_lines(report: Mapping[str, Any]) -> list[str]:
    parts = ", ".join(f"{part} {count}" for part, count in report["modules_out"].items())
    lines = [f"- `{report['input']}` ({report['family']}, read from {report['family_from']}) to {report['to']} names",
             f"- Modules: {report['modules_in']} in, {sum(report['modules_out'].values())} out ({parts})",
             f"- Ranks: {counts_text(report['ranks'])}"]
    return (lines + [f"- ⚠ Left out: {note}" for note in report.get("notes", [])]
            + [f"- {warning}" for warning in report.get("warnings", [])])


# tool name -> the lines that describe what its report says it did
RESULT_LINES = {"merge": _merge_lines, "resize": _resize_lines, "extract": _extract_lines,
                "convert": _convert_lines}


def result_markdown(tool: str, outcome: ToolOutcome) -> str:
    """'Wrote <file>' and what the tool did, or the engine's message."""
    if outcome.report is None:
        return error_markdown(outcome.error)
    return "\n".join([f"✔ **Wrote `{outcome.report['output']}`**", "", *RESULT_LINES[tool](outcome.report)])


def error_markdown(message: str) -> str:
    """The engine's own message, shown as it is: it names the file and says what to do."""
    return f"✖ **The engine refused:** {message}"


def inspect_outcome_markdown(outcome: ToolOutcome | None) -> str:
    """The inspect summary of a written file ('' when the tool wrote none)."""
    if outcome is None:
        return ""
    return inspect_markdown(outcome.report) if outcome.report is not None else error_markdown(outcome.error)


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def model_file_line(role: str, path: str) -> str:
    """'- **Model** `path`: 1.2 GiB, 780 tensors (BF16 780), a `flux1` transformer (flux-1-dev)', from the header."""
    file = Path(path)
    try:
        header = safetensors_header_json(file)
        size = file.stat().st_size
        family = flux_family_of(file_header(file, header))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"- **{role}** `{path}`: its header cannot be read ({error})"
    metadata = header.pop("__metadata__", None) or {}
    dtypes = Counter(str(entry.get("dtype", "?")) for entry in header.values() if isinstance(entry, dict))
    line = (f"- **{role}** `{path}`: {_size_text(size)}, {len(header)} tensors ("
            + ", ".join(f"{dtype} {count}" for dtype, count in dtypes.most_common()) + ")")
    if family:
        line += f", a `{family}` transformer"
    elif (sd3 := read_sd3_file(file_header(file, header))) is not None:
        line += f", an {sd3.label} model (`sd3`)"
    if metadata.get("modelspec.architecture"):
        line += f" ({metadata['modelspec.architecture']})"
    return line


def model_files_markdown(report: Mapping[str, Any]) -> str:
    """The files a merge into a model wrote (the checkpoint, and for FLUX.1/Chroma the new text-encoder files): size,
    tensors by dtype and what the header says they are; a checkpoint is no LoRA for `lora inspect`."""
    lines = ["**The new files:**", "", model_file_line("Model", report["output"])]
    lines += [model_file_line(TEXT_ENCODER_OPTIONS.get(option, option), path)
              for option, path in (report.get("components") or {}).items()]
    return "\n".join(lines)


def written_markdown(outcome: ToolOutcome, inspected: ToolOutcome | None) -> str:
    """What the page shows of the file(s) a tool wrote: the inspect summary of a LoRA, the headers of a merged
    model's files, '' when it wrote nothing."""
    if inspected is not None:
        return inspect_outcome_markdown(inspected)
    if outcome.report is not None and "components" in outcome.report:  # merged into a model
        return model_files_markdown(outcome.report)
    return ""


def cache_markdown(update: JobUpdate) -> str:
    """The cache build's result from its done event (counts) and warnings, or the engine's error."""
    done = update.last("done")
    if done is None or not done.get("ok"):
        return error_markdown(update.error_text() or "the cache build ended without a result")
    lines = [f"✔ **Cached {done['encoded'] + done['reused']} of {done['total']} images:** {done['encoded']} encoded, "
             f"{done['reused']} reused, {done['rebuilt_stale']} stale entries rebuilt, {done['failed']} failed."]
    lines += [f"- ⚠ `{event.get('where', '')}`: {event['message']}" for event in update.events
              if event.get("type") == "warning"]
    return "\n".join(lines)


def config_error_markdown(error: ConfigError | ToolInputError) -> str:
    """A config's problems, one per field, or the field to fill."""
    problems = getattr(error, "problems", None)
    if not problems:
        return f"✖ {error}"
    return "✖ **The config has problems:**\n" + "\n".join(f"- `{p.path}`: {p.message}" for p in problems)
