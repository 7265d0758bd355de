"""The Parameters tab's logic, apart from its layout (gui/tabs/parameters.py): which fields the form holds, the
validation status and TOML preview it shows, reading a settings file or preset into form values, and what an
import or another tab's patch would clear."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from engine.config.describe import FieldSpec, iter_fields
from engine.config.importers import ImportResult
from engine.config.io import config_to_toml, deep_merge, default_config_dict, is_preset_document, read_document
from engine.config.paths import get_path
from engine.config.readiness import readiness_problems
from engine.config.schema import RunConfig, config_warnings
from gui.browse import FileRoots, PathNotAllowed
from gui.state import DATASETS_SPEC, config_to_form, form_to_config, to_widget

# Shown in the form only where it helps; schema_version is a file detail.
_HIDDEN = {"schema_version"}


def editable_fields() -> dict[str, FieldSpec]:
    """Every value the form holds, by path: the generated fields and the inline datasets (edited as a whole), so that
    the config the form builds keeps everything a Load or Import put in it."""
    specs = {spec.path: spec for spec in iter_fields() if spec.path not in _HIDDEN}
    return specs | {DATASETS_SPEC.path: DATASETS_SPEC}


def status_markdown(config: RunConfig | None, problems: list) -> str:
    """"Valid." only when the run can start: schema problems first, then (for a valid config) what is missing on
    the disk (engine.config.readiness), all listed at once."""
    if config is not None and problems:
        lines = [f"**Not ready to train: {len(problems)} problem(s) to fix:**", ""]
        lines += [f"- `{problem.path}`: {problem.message}" for problem in problems]
        lines += [f"- warning: `{warning.path}`: {warning.message}" for warning in config_warnings(config)]
        return "\n".join(lines)
    if config is not None:
        training = config.training
        length = f"{training.max_train_epochs} epochs" if training.max_train_epochs else \
            f"{training.max_train_steps} steps"
        lines = [f"**Valid.** {config.method}, {length}, saves to "
                 f"`{config.saving.output_dir}/{config.saving.output_name}`"]
        lines += [f"- warning: `{warning.path}`: {warning.message}" for warning in config_warnings(config)]
        return "\n".join(lines)
    lines = [f"**{len(problems)} problem(s) to fix:**", ""]
    lines += [f"- `{problem.path}`: {problem.message}" for problem in problems]
    return "\n".join(lines)


def form_report(values: Mapping[str, Any], specs: Mapping[str, FieldSpec],
                refusal: Any = None) -> tuple[str, str, dict[str, Any] | None]:
    """What the form shows and gives for its values ({path: widget value}): the validation status, the TOML
    preview (Markdown) and the config the other tabs read (shared_config). `refusal` is the roots' rule for paths
    (engine.config.readiness)."""
    config, data, problems = form_to_config(values, specs)
    ready = readiness_problems(config, refusal=refusal) if config is not None else []
    return (status_markdown(config, problems or ready), preview_markdown(preview_text(config, data)),
            shared_config(config, data))


def preview_text(config: RunConfig | None, data: Mapping[str, Any]) -> str:
    return config_to_toml(config) if config is not None else tomli_w.dumps(dict(data))


def preview_markdown(text: str) -> str:
    """The TOML as a code block, drawn whole (a code editor draws only the lines in view, so the page, and a search
    in it, lacked the end of a long config); the fence is longer than any run of backticks in the text."""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence}toml\n{text}\n{fence}"


SETTINGS_FILE_LABEL = "Open a settings file"


def settings_file(path: str | None, roots: FileRoots) -> Path:
    """The settings file to load or import, once the app may read it (the rule of every GUI path field).

    Raises:
        PathNotAllowed: an empty field, or a path outside the roots or hidden; the message says what to do.
    """
    if not (path or "").strip():
        raise PathNotAllowed(f"{SETTINGS_FILE_LABEL}: choose a .json or .toml file first")
    return roots.check(path.strip(), SETTINGS_FILE_LABEL)


def load_preset_values(path: str | Path, specs: dict[str, FieldSpec]) -> dict[str, Any]:
    document = read_document(path)
    overlay = document["config"] if is_preset_document(document) else document
    return config_to_form(deep_merge(default_config_dict(), overlay), specs)


# Formats that hold only part of a run (an sd-scripts dataset TOML): importing one merges it onto the form instead of
# starting again from the defaults, so the base model and the rest stay as they are.
PARTIAL_FORMATS = frozenset({"sd_scripts_dataset"})
# The dataset sources that exclude one another (DatasetSection's check): inline datasets imported replace the others.
_OTHER_DATASET_SOURCES = ("dataset.config_file", "dataset.train_data_dir", "dataset.in_json", "dataset.reg_data_dir")
_ABSENT = object()


def imported_values(result: ImportResult, current: Mapping[str, Any],
                    specs: dict[str, FieldSpec]) -> tuple[dict[str, Any], list[str]]:
    """The form after an import, and the fields it cleared: a whole run replaces the form (on the defaults), a
    partial file sets only its own fields on the `current` form ({path: widget value})."""
    if result.format not in PARTIAL_FORMATS:
        return config_to_form(deep_merge(default_config_dict(), result.overlay), specs), []
    touched = {path for path in specs if get_path(result.overlay, path, _ABSENT) is not _ABSENT}
    cleared = []
    if "dataset.datasets" in touched:
        cleared = [path for path in _OTHER_DATASET_SOURCES if current.get(path)]
    _, data, _ = form_to_config(current, specs)
    merged = config_to_form(deep_merge(data, result.overlay), specs)
    values = dict(current) | {path: merged[path] for path in touched}
    return values | {path: to_widget(specs[path], "") for path in cleared}, cleared


def import_report_markdown(result: ImportResult, path: str) -> str:
    """What an import carried over and, above all, what it could not: nothing is dropped silently."""
    lines = [f"**Imported `{Path(path).name}`** ({result.format}): {len(result.mapped)} setting(s) carried over."]
    lines += [f"- note: {note}" for note in result.notes]
    if result.skipped:
        lines += ["", f"**Not imported ({len(result.skipped)})** — set these by hand if you need them:"]
        lines += [f"- {skipped}" for skipped in result.skipped]
    if result.unset:
        lines += ["", f"Empty or off in the file, nothing lost: {', '.join(sorted(result.unset))}"]
    return "\n".join(lines)


def patch_values(patch: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields of a `config_patch` value (gui.context.config_patch_value)."""
    return dict((patch or {}).get("values") or {})


def patched_fields(patch: Mapping[str, Any] | None, specs: Mapping[str, FieldSpec]) -> tuple[dict[str, Any], str]:
    """What another tab's `config_patch` sets in the form: the widget values of the fields it has ({path: value}),
    and the message saying which fields were set (and which are not fields here)."""
    values = patch_values(patch)
    known = [path for path in values if path in specs]
    unknown = [path for path in values if path not in specs]
    message = f"Set from another tab: {', '.join(f'`{path}`' for path in known)}." if known else ""
    if unknown:
        message += f" Not a field here: {', '.join(unknown)}."
    return {path: to_widget(specs[path], values[path]) for path in known}, message


def default_form(specs: Mapping[str, FieldSpec]) -> dict[str, Any]:
    """The form's widget values for the default config ({path: widget value})."""
    return config_to_form(default_config_dict(), specs)


def shared_config(config: RunConfig | None, data: dict[str, Any]) -> dict[str, Any] | None:
    """What the form gives the other tabs (TabContext.config) for form_to_config's config and dict: the config dict
    once it validates, None while the form has problems."""
    return data if config is not None else None


def cleared_by(new_values: Mapping[str, Any], current: Mapping[str, Any], patched: list[str]) -> list[str]:
    """The fields other tabs set that `new_values` would change."""
    return [path for path in patched if path in new_values and new_values[path] != current.get(path)]


