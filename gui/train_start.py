"""Starting a run from the Parameters tab's config: validate, run the doctor, refuse with its errors, then create
the run and start it (or put it in the queue). Kept free of gradio so the rules are tested directly."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.errors import ConfigError
from engine.config.io import validate_config
from gui.runner import RunManager
from gui.runs import RunHandle

MAX_LISTED = 12  # errors listed in the refusal; the Dataset/Tools doctor shows the full table


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


def missing_model_file(location: str, base_dir: Path) -> str:
    """Why a base model that is clearly a local path cannot be used ('' when fine or when it is a hub id, which
    the engine checks against the local cache)."""
    if not location:
        return "no base model chosen: set `model.pretrained_model_name_or_path` in the Parameters tab."
    path = Path(location).expanduser()
    path = path if path.is_absolute() else base_dir / path
    looks_local = Path(location).suffix in (".safetensors", ".ckpt") or location.startswith((".", "/", "~")) \
        or path.exists()
    if looks_local and not path.exists():
        return f"the base model `{path}` does not exist; check `model.pretrained_model_name_or_path`."
    return ""


def prepare_run(manager: RunManager, config_dict: Mapping[str, Any] | None, *, name: str = "",
                base_dir: str | Path | None = None, quick: bool = False) -> StartResult:
    """Validate and doctor the config, then create its run directory (not started yet).

    Paths in the config are relative to base_dir (default: the GUI's working folder), as in the Parameters tab.
    """
    if config_dict is None:
        return StartResult(None, "**Not started:** the Parameters tab has problems; they are listed at its top.")
    from engine.data.doctor import run_doctor  # image libraries load when a run is first started

    base = Path(base_dir or Path.cwd())
    try:
        config = validate_config(config_dict, base_dir=base)
        report = run_doctor(config, base, quick=quick).to_dict()  # the config validated above, not again
    except ConfigError as error:
        listed = "\n".join(f"- `{problem.path}`: {problem.message}" for problem in error.problems)
        return StartResult(None, f"**Not started: the settings need changes.**\n{listed}")
    if not report["ok"]:
        return StartResult(None, refusal_markdown(report), report)
    missing = missing_model_file(config.model.pretrained_model_name_or_path, base)
    if missing:
        return StartResult(None, f"**Not started:** {missing}", report)
    handle = manager.create_run(config, name.strip() or None, base_dir=base)
    notes = list(handle.notes)
    warnings = report["counts"].get("warning", 0)
    extra = f" The doctor has {warnings} warning(s) worth a look." if warnings else ""
    return StartResult(handle, f"Created `{handle.name}` ({report['totals']['total_steps']} steps).{extra}",
                       report, notes)


def start_run(manager: RunManager, config_dict: Mapping[str, Any] | None, *, name: str = "", queue: bool = False,
              base_dir: str | Path | None = None) -> StartResult:
    """prepare_run, then start the run now (`queue=False`) or append it to the queue."""
    result = prepare_run(manager, config_dict, name=name, base_dir=base_dir)
    if result.handle is None:
        return result
    if queue:
        manager.enqueue(result.handle)
        position = len(manager.queue())
        result.message += f" Queued (position {position}); it starts when the runs before it have finished."
    else:
        manager.start(result.handle)
        result.message += " Started."
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
