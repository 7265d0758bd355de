"""Starting a run from the Parameters tab's config: validate, confine its paths to the GUI's folders, run the doctor,
refuse with its errors, then create the run and start it (or put it in the queue). Kept free of gradio so the rules
are tested directly.

Every path field of the config (those the config model marks as a path, folder or file, and the same fields of each
dataset subset, inline or in the dataset TOML) must pass `FileRoots.check`, the rule of every GUI path field: the GUI
must not train on, resume from, or write to folders it may not show. The CLI has no such limit.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.config.describe import PATH_WIDGETS, iter_fields
from engine.config.errors import ConfigError
from engine.config.io import load_dataset_file, resolve_path, validate_config
from engine.config.paths import get_path
from engine.config.readiness import subset_paths
from engine.config.schema import RunConfig
from gui.browse import FileRoots, PathNotAllowed
from gui.doctor_process import LARGE_DATASET_IMAGES, DoctorFailed, doctor_report
from gui.runner import DEFAULT_OUTPUT_DIR, RunManager
from gui.runs import RunHandle

MAX_LISTED = 12  # errors listed in the refusal; the Dataset/Tools doctor shows the full table
MAX_WARNINGS_SHOWN = 5  # doctor warnings listed in the Start message (the queue shows them again)
_NOT_IN_FILE_NAMES = re.compile(r'[/\\:*?"<>|]+')  # what saving.output_name refuses (a plain file name)
_MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt")
LOCATION_WIDGET = "path"  # a local file/folder or a Hugging Face hub id (base model, VAE)


@dataclass
class StartResult:
    handle: RunHandle | None
    message: str  # markdown for the page: what happened, or why nothing did
    report: dict[str, Any] | None = None  # the doctor's report when it ran
    notes: list[str] = field(default_factory=list)


def refusal_markdown(report: Mapping[str, Any]) -> str:
    """The doctor's errors as a list the user can work through: file, problem, what to do."""
    errors = [finding for finding in report["findings"] if finding["severity"] == "error"]
    lines = [f"**Not started: the dataset doctor found {len(errors)} error(s).** Fix them and press Start again:"]
    for finding in errors[:MAX_LISTED]:
        where = f"`{finding['where']}`: " if finding.get("where") else ""
        hint = f" — {finding['hint']}" if finding.get("hint") else ""
        lines.append(f"- {where}{finding['message']}{hint}")
    if len(errors) > MAX_LISTED:
        lines.append(f"- … and {len(errors) - MAX_LISTED} more (the Dataset tab's doctor lists them all)")
    return "\n".join(lines)


def output_name_for(typed: str, configured: str) -> tuple[str, str]:
    """The output name (saving.output_name) a run gets from the name typed in the Train tab, and why it is not what
    was typed ('' when it is). Nothing typed keeps the Parameters tab's name."""
    name = typed.strip()
    if not name:
        return configured, ""
    reasons = []
    while extension := next((ext for ext in _MODEL_EXTENSIONS if name.lower().endswith(ext)), ""):
        name = name[: -len(extension)].strip()  # every one of them: "x.safetensors.pt" is still a model name
        reasons.append(f"the extension {extension} is left out (saving.save_model_as decides it)")
    if _NOT_IN_FILE_NAMES.search(name):
        name = _NOT_IN_FILE_NAMES.sub("-", name).strip(" -")
        reasons.append('a file name cannot hold / \\ : * ? " < > |, so they became "-"')
    if not name:
        return configured, f"nothing of {typed.strip()!r} is usable as a file name, so it keeps {configured!r}"
    return name, f"{typed.strip()!r} became {name!r}: " + "; ".join(reasons) if reasons else ""


def start_choice(running: Sequence[str], mode: str) -> str:
    """What Start does: 'queue' (Add to queue), 'start' (nothing is running, or the user chose to run both at once)
    or 'ask' (a run is going: the page offers to queue this one, or to start both when the user says so)."""
    if mode == "queue":
        return "queue"
    return "start" if mode == "both" or not running else "ask"


def warning_lines(report: Mapping[str, Any]) -> list[str]:
    """The doctor's warnings as one line each: file, problem, what to do."""
    lines = []
    for finding in report["findings"]:
        if finding["severity"] == "warning":
            where = f"`{finding['where']}`: " if finding.get("where") else ""
            hint = f" — {finding['hint']}" if finding.get("hint") else ""
            lines.append(f"{where}{finding['message']}{hint}")
    return lines


def missing_model_file(location: str, base_dir: Path) -> str:
    """Why the base model cannot be used: '' when it exists or is a hub id (the engine checks that against the local
    cache). Read with the engine's rule (engine.models.locations), so whatever the engine would load as a local path
    is refused here, before a run exists."""
    from engine.models.locations import looks_like_hub_id  # no torch; not needed to build the page

    if not location:
        return "no base model chosen: set `model.pretrained_model_name_or_path` in the Parameters tab."
    path = resolve_path(location, base_dir)
    if path.exists() or looks_like_hub_id(location):
        return ""
    return f"the base model `{path}` does not exist; check `model.pretrained_model_name_or_path`."


def config_paths(config: RunConfig) -> Iterator[tuple[str, str, str]]:
    """(field, value, widget) of every non-empty path of the config that a run reads or writes. The default output
    folder is left out: the runs manager replaces it with the run's own folder."""
    data = config.model_dump(mode="json")
    for spec in iter_fields():
        value = get_path(data, spec.path) if spec.widget in PATH_WIDGETS else None
        if value and not (spec.path == "saving.output_dir" and value == DEFAULT_OUTPUT_DIR):
            yield spec.path, value, spec.widget
    yield from subset_paths(config.dataset.datasets, "dataset.")


def _dataset_file_paths(config: RunConfig, base: Path) -> Iterator[tuple[str, str, str]]:
    """The subset paths of the dataset TOML named by dataset.config_file (nothing when it cannot be read: the
    validation that follows names its problems)."""
    if not config.dataset.config_file:
        return
    path = resolve_path(config.dataset.config_file, base)
    try:
        dataset_file = load_dataset_file(path)
    except (ConfigError, OSError):
        return
    yield from subset_paths(dataset_file.datasets, f"dataset.config_file ({path.name}): ")


def path_refusals(config: RunConfig, roots: FileRoots, base: Path) -> list[str]:
    """Why each path of the config may not be used from the GUI ('`field`: path is outside ...'); [] when all may.
    Relative paths start from base, as the run reads them. The dataset TOML is read only once its own path passed."""
    refusals = []

    def checked(paths: Iterator[tuple[str, str, str]]) -> None:
        for name, value, widget in paths:
            try:
                check = roots.check_location if widget == LOCATION_WIDGET else roots.check
                check(value, f"`{name}`", base)
            except PathNotAllowed as error:
                refusals.append(str(error))

    checked(config_paths(config))
    if not refusals:
        checked(_dataset_file_paths(config, base))
    return refusals


class PathsRefused(PathNotAllowed):
    """Paths of a config the GUI may not use; `refusals` holds one message per path, each naming its field."""

    def __init__(self, refusals: list[str]):
        self.refusals = refusals
        lines = [f"**{len(refusals)} path(s) of the settings are outside what this app may use:**"]
        super().__init__("\n".join([*lines, *(f"- {refusal}" for refusal in refusals)]))


def confined_config(config_dict: Mapping[str, Any], roots: FileRoots, base: Path, *, source: str = "",
                    check_packages: bool = True) -> RunConfig:
    """The config validated once its paths are confined: the dataset TOML it names is read only after that.

    Raises:
        ConfigError: the settings are not valid.
        PathsRefused: paths the GUI may not use, each named with its field.
    """
    config = validate_config(config_dict, source=source, check_packages=check_packages)  # reads no file
    refusals = path_refusals(config, roots, base)
    if refusals:
        raise PathsRefused(refusals)
    if not config.dataset.config_file:
        return config
    return validate_config(config_dict, source=source, base_dir=base, check_packages=check_packages)


def prepare_run(manager: RunManager, config_dict: Mapping[str, Any] | None, *, name: str = "",
                base_dir: str | Path | None = None, quick: bool = False,
                roots: FileRoots | None = None, large_dataset: int = LARGE_DATASET_IMAGES) -> StartResult:
    """Validate, confine and doctor the config, then create its run directory (not started yet).

    Paths in the config are relative to base_dir (default: the GUI's working folder), as in the Parameters tab.
    They must lie inside roots (default: the home folder and the manager's runs folder; the GUI passes its own).
    The doctor runs in an engine process when the datasets hold more than `large_dataset` images.
    """
    if config_dict is None:
        return StartResult(None, "**Not started:** the Parameters tab has problems; they are listed at its top.")
    base = Path(base_dir or Path.cwd())
    roots = roots or FileRoots.from_paths(runs_dir=manager.runs_dir)
    try:
        config = confined_config(config_dict, roots, base)
        report = doctor_report(config, base, quick=quick, large=large_dataset)  # the config validated above
    except (PathsRefused, DoctorFailed) as error:
        return StartResult(None, f"**Not started:** {error}")
    except ConfigError as error:
        listed = "\n".join(f"- `{problem.path}`: {problem.message}" for problem in error.problems)
        return StartResult(None, f"**Not started: the settings need changes.**\n{listed}")
    if not report["ok"]:
        return StartResult(None, refusal_markdown(report), report)
    missing = missing_model_file(config.model.pretrained_model_name_or_path, base)
    if missing:
        return StartResult(None, f"**Not started:** {missing}", report)
    output_name, renamed = output_name_for(name, config.saving.output_name)
    try:  # validated like the Parameters tab's field, not copied past its checks
        saving = type(config.saving).model_validate({**config.saving.model_dump(), "output_name": output_name})
    except ValidationError as error:
        reason = "; ".join(str(detail["msg"]) for detail in error.errors())
        return StartResult(None, f"**Not started:** the run name {name.strip()!r} cannot be the output name "
                                 f"({reason}); type another name.", report)
    config = config.model_copy(update={"saving": saving})
    warnings = warning_lines(report)
    handle = manager.create_run(config, name.strip() or None, base_dir=base, warnings=warnings)
    notes = [note for note in (renamed, *handle.notes) if note]
    message = (f"Created `{handle.name}` ({report['totals']['total_steps']} steps); it saves its model as "
               f"`{handle.output_name}` in `{handle.output_dir}`.")
    if warnings:
        message += f" The doctor has {len(warnings)} warning(s) worth a look:\n" + "\n".join(
            f"- ⚠ {line}" for line in warnings[:MAX_WARNINGS_SHOWN])
        if len(warnings) > MAX_WARNINGS_SHOWN:
            message += f"\n- … and {len(warnings) - MAX_WARNINGS_SHOWN} more (the Dataset tab's doctor lists them)"
        message += "\n\n"
    return StartResult(handle, message, report, notes)


def start_run(manager: RunManager, config_dict: Mapping[str, Any] | None, *, name: str = "", queue: bool = False,
              alongside: bool = False, base_dir: str | Path | None = None, roots: FileRoots | None = None
              ) -> StartResult:
    """prepare_run, then append the run to the queue (`queue`), start it beside whatever runs (`alongside`, only
    when the user said so), or start it if nothing runs; a run that started meanwhile sends this one to the queue
    (two runs on one GPU only ever by choice)."""
    result = prepare_run(manager, config_dict, name=name, base_dir=base_dir, roots=roots)
    if result.handle is None:
        return result
    busy = []
    if alongside:
        manager.start(result.handle)
    elif not queue:
        busy = manager.start_if_idle(result.handle)
    if queue or busy:
        manager.enqueue(result.handle)
        position = len(manager.queue())
        why = f"`{busy[0].name}` started meanwhile, so this run waits. " if busy else ""
        result.message += f" {why}Queued (position {position}); it starts when the runs before it have finished."
    else:
        result.message += " Started" + (" beside the running run(s), as you chose." if alongside else ".")
    if result.notes:
        result.message += "\n" + "\n".join(f"- {note}" for note in result.notes)
    return result


def start_queue_worker(manager: RunManager, interval: float = 2.0) -> threading.Thread:
    """Advance the queue in the background, so queued runs start one after another with no page open. The queue
    lives in the runs folder, so a restarted GUI picks it up where it was."""

    def work() -> None:
        while True:
            with contextlib.suppress(OSError):  # a runs folder briefly unreadable: try again next time
                manager.advance_queue()
            threading.Event().wait(interval)

    thread = threading.Thread(target=work, name="atelier-queue", daemon=True)
    thread.start()
    return thread
