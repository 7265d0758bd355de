"""What the Train tab shows for a run, as pure functions of its RunStatus and events: the status line, the error
box, chart rows, the checkpoint list, the run picker's labels. No gradio here, so it is tested without a browser.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from engine.rundir.event_reader import read_events
from gui.run_reader import progress_row
from gui.runs import RunHandle, RunStatus

LOSS_SERIES = {"loss": "raw", "loss_avg": "smoothed", "val_loss": "validation"}
# Fixed, so the legend exists before the first point.
LOSS_COLORS = {"raw": "#a1a1aa", "smoothed": "#f97316", "validation": "#2563eb"}
RESUMABLE_STATES = ("stopped", "failed", "lost")  # a finished run has no steps left to train
_FAILED_STATES = ("failed", "lost")
LIVE_STATES = ("running",)
GALLERY_LIMIT = 48  # samples the gallery shows: the newest (every new sample redraws the whole gallery)
MAX_WARNINGS = 5  # doctor warnings listed per queued run  # the states whose speed and time left mean something
OVER_PLAN = 0.10  # a measured GPU peak this much above the plan's is marked
_MIB_PER_GIB = 1024


def format_duration(seconds: float | None) -> str:
    """'1h 02m', '3m 05s', '42s'; an em dash while the engine cannot estimate it yet."""
    if seconds is None:
        return "—"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def status_markdown(name: str, status: RunStatus) -> str:
    """One line: the run, its state, step/total, epoch, speed and time left."""
    steps = f"step {status.step}/{status.total_steps}" if status.total_steps else f"step {status.step}"
    epochs = f"epoch {status.epoch}/{status.num_epochs}" if status.num_epochs else f"epoch {status.epoch}"
    parts = [f"**{status.state}**", steps, epochs]
    if status.state in LIVE_STATES:  # a stopped or finished run's last speed and time left are no longer true
        speed = f"{status.it_per_s:.2f} it/s" if status.it_per_s else "— it/s"
        parts += [speed, f"ETA {format_duration(status.eta_s)}"]
    if status.loss is not None:
        parts.append(f"loss {status.loss:.4f}")
    if status.validation_loss is not None:
        parts.append(f"validation {status.validation_loss:.4f}")
    line = f"`{name}` — " + " · ".join(parts)
    return f"{line}\n\n{status.summary}" if status.summary else line


def _gib(mib: float | None) -> str:
    return "—" if mib is None else f"{mib / _MIB_PER_GIB:.1f} GiB"


def _plan_mib(plan: Mapping[str, Any], key: str) -> float | None:
    value = plan.get(key)
    return value / 2**20 if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def _plan_warning(peak: float | None, planned: float, fits: Any) -> str:
    """Why the memory line is marked: the plan said the run does not fit the card, or the measured peak is more
    than OVER_PLAN above the plan's (the planner was within a few percent on every measured run)."""
    reasons = ["the plan said it does not fit the card"] if fits is False else []
    if peak is not None and peak > planned * (1 + OVER_PLAN):
        reasons.append(f"the peak is {peak / planned - 1:.0%} above the plan")
    return "; ".join(reasons)


def memory_line(plan: Mapping[str, Any] | None, progress: Mapping[str, Any]) -> str:
    """The run's memory, from its start event's `memory_plan` and a progress event's figures: 'GPU memory: peak
    6.5 GiB (plan 6.4 GiB, card 139.8 GiB)', marked when the peak is over the plan or the plan does not fit;
    without a plan (a CPU run, an older run) the measured peak alone ('GPU peak 6.5 GiB', 'RAM peak 1.2 GiB');
    empty when neither is known yet."""
    peak = progress.get("gpu_peak_mib")
    planned = _plan_mib(plan, "gpu_peak_bytes") if isinstance(plan, Mapping) else None
    if planned is None or not isinstance(plan, Mapping):
        if peak is not None:
            return f"GPU peak {_gib(peak)}"
        return f"RAM peak {_gib(progress['rss_peak_mib'])}" if progress.get("rss_peak_mib") is not None else ""
    card = _plan_mib(plan, "gpu_capacity_bytes")
    context = f"plan {_gib(planned)}" + (f", card {_gib(card)}" if card is not None else "")
    line = f"GPU memory: peak {_gib(peak)} ({context})"
    warning = _plan_warning(peak, planned, plan.get("fits"))
    return f"{line} — ⚠ **{warning}**" if warning else line


def memory_markdown(status: RunStatus) -> str:
    """memory_line for the run as its reader folded it (the start event's plan, the newest progress figures)."""
    return memory_line(status.memory_plan, status.memory)


def error_markdown(status: RunStatus) -> str:
    """The error event's message and hint for a failed (or lost) run; empty for any other state."""
    if status.state not in _FAILED_STATES or not (status.error or status.hint):
        return ""
    lines = [f"**The run {status.state}:** {status.error}"]
    if status.hint:
        lines.append(f"**What to do:** {status.hint}")
    return "\n\n".join(lines)


def progress_fraction(status: RunStatus) -> float:
    return min(1.0, status.step / status.total_steps) if status.total_steps else 0.0


def progress_rows(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per progress event: step, loss, loss_avg and the first parameter group's learning rate (the Train
    tab gets these rows already bounded, from RunManager.chart)."""
    return [row for row in map(progress_row, events) if row is not None]


def loss_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Long format (step, value, series) so one LinePlot draws the raw and the smoothed loss in two colours."""
    records = [{"step": row["step"], "value": row[key], "series": series}
               for row in rows for key, series in LOSS_SERIES.items() if key in row and row[key] is not None]
    # Explicit dtypes: an empty frame would otherwise be `object`, and the plot would take step as categories.
    return pd.DataFrame(records, columns=["step", "value", "series"]).astype(
        {"step": "int64", "value": "float64", "series": object})


def lr_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    records = [{"step": row["step"], "lr": row["lr"]} for row in rows if row.get("lr") is not None]
    return pd.DataFrame(records, columns=["step", "lr"]).astype({"step": "int64", "lr": "float64"})


def checkpoints_markdown(status: RunStatus) -> str:
    """The files and state folders written so far, newest last; a state folder is what Resume continues from."""
    if not status.checkpoints:
        return "No checkpoints yet."
    lines = [f"- step {entry.get('step')} · {entry.get('kind')} · `{Path(entry['path']).name}`"
             + (" · lowest validation loss" if entry["path"] == status.best_checkpoint else "")
             for entry in status.checkpoints]
    if can_resume(status):  # a finished run keeps its state folder but has nothing left to resume
        lines.append(f"\nResume continues from `{status.resume_state}`.")
    return "\n".join(lines)


def run_choices(handles: Sequence[RunHandle]) -> list[tuple[str, str]]:
    """Dropdown entries (label, run folder name), in the order given (discover() gives newest first)."""
    return [(handle.name, handle.name) for handle in handles]


def can_resume(status: RunStatus) -> bool:
    return status.state in RESUMABLE_STATES and bool(status.resume_state)


def progress_html(status: RunStatus) -> str:
    """A native progress bar with the step count, so the page shows progress without reading the text."""
    percent = round(100 * progress_fraction(status))
    return (f'<div id="run-progress-bar"><progress value="{status.step}" max="{max(status.total_steps, 1)}" '
            f'style="width:100%"></progress> <span>{percent}%</span></div>')


def queue_markdown(queued: Sequence[RunHandle]) -> str:
    """The queued runs in the order they will start ('' when none), each with the dataset doctor's warnings that its
    Start message counted (nobody may be watching when it starts, so they are shown while it waits)."""
    if not queued:
        return ""
    lines = [f"**Queue** ({len(queued)} waiting; each starts when the runs before it have ended):"]
    for position, handle in enumerate(queued, start=1):
        count = len(handle.warnings)
        lines.append(f"{position}. `{handle.name}`" + (f" — the doctor's {count} warning(s):" if count else ""))
        lines += [f"    - ⚠ {warning}" for warning in handle.warnings[:MAX_WARNINGS]]
        if count > MAX_WARNINGS:
            lines.append(f"    - … and {count - MAX_WARNINGS} more (the Dataset tab's doctor lists them all)")
    return "\n".join(lines)


def queue_choices(queued: Sequence[RunHandle]) -> list[str]:
    """The queue's remove picker: the queued runs' names, in queue order."""
    return [handle.name for handle in queued]


def gallery_items(status: RunStatus, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
    """The newest `limit` samples with their captions (step and prompt), oldest first, as the Gallery takes them.
    Gradio sends and the page redraws the whole gallery at each change, so a long run sampling often would send
    hundreds of images for every new one; the files all stay in the run's sample folder."""
    labels = status.sample_labels + [""] * (len(status.samples) - len(status.sample_labels))
    return list(zip(status.samples, labels, strict=False))[-limit:]


def gallery_label(status: RunStatus, limit: int = GALLERY_LIMIT) -> str:
    """'Samples', or which of them the gallery shows and where the rest are."""
    count = len(status.samples)
    if count <= limit:
        return "Samples"
    return f"Samples: the newest {limit} of {count} (all in {Path(status.samples[-1]).parent})"


def stale_texts(owners: Mapping[str, str | None], run: str | None) -> list[str]:
    """Which texts to clear when the picker shows `run`: those written about another run (a "stopped" message, a
    TensorBoard link). Texts about no run (a refused Start, the queue) stay."""
    return [key for key, owner in owners.items() if owner and owner != run]


def log_dir(handle: RunHandle) -> str:
    """The run's own TensorBoard folder, as its start events name it (each start logs into
    `<logging_dir>/<log_prefix><date-time>`; a resumed run's starts share their parent folder, which is shown then).
    Before the run starts: its logging_dir from config.toml (absolute paths there), which other runs may share."""
    from engine.config.io import load_config

    events = read_events(handle.events_path)
    folders = list(dict.fromkeys(event["config"]["log_dir"] for event in events if event.get("type") == "start"
                                 and isinstance(event.get("config"), dict) and event["config"].get("log_dir")))
    if folders:
        return folders[0] if len(folders) == 1 else os.path.commonpath(folders)
    folder = load_config(handle.config_path, check_packages=False).logging.logging_dir
    if not folder:
        raise ValueError("this run keeps no TensorBoard logs (its logging.logging_dir is empty)")
    return folder


def tensorboard_markdown(name: str, url: str) -> str:
    port = url.rstrip("/").rsplit(":", 1)[1]
    return (f"[Open TensorBoard for `{name}`]({url}) — it listens on this machine only; from another machine, "
            f"forward the port first: `ssh -L {port}:127.0.0.1:{port} <this machine>`.")
