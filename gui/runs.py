"""What a run directory says about its run: the handle, its record (run.json), its state and progress.

Everything here is read from files (run.json, events.jsonl, train.log, process.log) plus whether the recorded
process is still alive, so the GUI shows the same thing after a page reload or a restart as before it.
No torch here: the GUI imports this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.files import atomic_write_text

RECORD_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
TRAIN_LOG = "train.log"
PROCESS_LOG = "process.log"
_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class RunHandle:
    """One run directory. Cheap to rebuild from the folder, so the GUI may keep or drop handles freely."""

    run_dir: Path
    output_dir: str = ""
    output_name: str = ""
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.toml"

    @property
    def events_path(self) -> Path:
        return self.run_dir / EVENTS_FILE

    @classmethod
    def from_dir(cls, run_dir: Path) -> RunHandle:
        record = read_record(run_dir)
        return cls(run_dir, record.get("output_dir", ""), record.get("output_name", ""),
                   tuple(record.get("notes", ())))


@dataclass
class RunStatus:
    """A run as the Train tab shows it. `state` is one of STATES."""

    state: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    num_epochs: int = 0
    loss: float | None = None
    loss_avg: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    error: str = ""
    hint: str = ""
    summary: str = ""
    resume_state: str = ""  # the state folder a stopped (or saved) run can resume from
    returncode: int | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)


# created: made but neither queued nor started; lost: the process is gone without its `done` event
STATES = ("created", "queued", "running", "finished", "stopped", "failed", "lost")


# --- the record ----------------------------------------------------------------------------------------------


def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RECORD_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Atomic, so a GUI polling the record never reads half of it."""
    atomic_write_text(run_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n")


def update_record(run_dir: Path, **fields: Any) -> dict[str, Any]:
    record = {**read_record(run_dir), **fields}
    write_record(run_dir, record)
    return record


def discover(runs_dir: Path) -> list[RunHandle]:
    """Every run directory (a folder with run.json) in runs_dir, newest first."""
    if not runs_dir.is_dir():
        return []
    found = [RunHandle.from_dir(path) for path in runs_dir.iterdir() if (path / RECORD_FILE).is_file()]
    return sorted(found, key=lambda handle: (read_record(handle.run_dir).get("created_at", 0), handle.name),
                  reverse=True)


# --- the process ---------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from the state on (field 3), or None when the process does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from ours."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether the process runs (a zombie does not; nor does another process that got the same pid)."""
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return start_ticks is None or int(fields[19]) == start_ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_alive(record: dict[str, Any]) -> bool:
    pid = record.get("pid")
    return bool(pid) and record.get("returncode") is None and process_alive(pid, record.get("proc_start"))


# --- events --------------------------------------------------------------------------------------------------


def tail_events(path: Path, since: int) -> tuple[list[dict[str, Any]], int]:
    """Events in complete lines after byte offset `since`, and the offset to ask from next time.

    A line still being written waits for the next call. A file shorter than `since` was replaced: read it anew.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    since = 0 if size < since else since
    with path.open("rb") as stream:
        stream.seek(since)
        data = stream.read(size - since)
    complete = data[: data.rfind(b"\n") + 1]
    return _parse_lines(complete), since + len(complete)


def _parse_lines(data: bytes) -> list[dict[str, Any]]:
    events = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _events_before(path: Path, offset: int) -> list[dict[str, Any]]:
    if offset <= 0 or not path.is_file():
        return []
    with path.open("rb") as stream:
        return _parse_lines(stream.read(offset))


def tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a text file (reading only its end)."""
    if count <= 0 or not path.is_file():
        return []
    with path.open("rb") as stream:
        stream.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        text = stream.read().decode("utf-8", errors="replace")
    return text.splitlines()[-count:]


# --- status --------------------------------------------------------------------------------------------------


def _on_start(status: RunStatus, event: dict[str, Any]) -> None:
    status.total_steps = event.get("total_steps", status.total_steps)
    status.num_epochs = event.get("num_epochs", status.num_epochs)


def _on_progress(status: RunStatus, event: dict[str, Any]) -> None:
    status.step, status.epoch = event.get("step", status.step), event.get("epoch", status.epoch)
    status.total_steps = event.get("total_steps", status.total_steps)
    status.num_epochs = event.get("num_epochs", status.num_epochs)
    status.loss, status.loss_avg = event.get("loss"), event.get("loss_avg")
    status.it_per_s, status.eta_s = event.get("it_per_s"), event.get("eta_s")


def _on_checkpoint(status: RunStatus, event: dict[str, Any]) -> None:
    status.checkpoints.append({key: event.get(key) for key in ("kind", "path", "step", "epoch")})
    if event.get("kind") == "state":
        status.resume_state = event.get("path", "")


def _on_sample(status: RunStatus, event: dict[str, Any]) -> None:
    status.samples.extend(image["path"] for image in event.get("images", []))


def _on_error(status: RunStatus, event: dict[str, Any]) -> None:
    status.error, status.hint = event.get("message", ""), event.get("hint", "")


def _on_warning(status: RunStatus, event: dict[str, Any]) -> None:
    status.warnings.append(event.get("message", ""))


def _on_done(status: RunStatus, event: dict[str, Any]) -> None:
    status.state = "stopped" if event.get("stopped") else "finished" if event.get("ok") else "failed"
    status.summary = event.get("summary", "")
    status.step = event.get("global_step", status.step)
    status.resume_state = event.get("state") or status.resume_state


_FOLD: dict[str, Callable[[RunStatus, dict[str, Any]], None]] = {
    "start": _on_start, "progress": _on_progress, "checkpoint": _on_checkpoint, "sample": _on_sample,
    "error": _on_error, "warning": _on_warning, "done": _on_done,
}
# Events of earlier processes on the same run dir (before a resume) only add files; their state is history.
_HISTORY = ("checkpoint", "sample")


def read_status(handle: RunHandle, *, queued: bool = False, log_lines: int = 30) -> RunStatus:
    """The run's state and progress, from its files and whether its recorded process is alive."""
    record = read_record(handle.run_dir)
    status = RunStatus(state="queued" if queued else "created")
    offset = record.get("events_offset", 0)
    for event in _events_before(handle.events_path, offset):
        if event.get("type") in _HISTORY:
            _FOLD[event["type"]](status, event)
    current, _ = tail_events(handle.events_path, offset)
    for event in current:
        _FOLD.get(event.get("type", ""), lambda *_: None)(status, event)
    status.returncode = record.get("returncode")
    if record.get("pid") and status.state in ("created", "queued"):
        _settle_without_done(status, record, handle.run_dir)
    elif record.get("start_error"):
        status.state, status.error = "failed", record["start_error"]
    status.checkpoints = [entry for entry in status.checkpoints if entry["path"] and Path(entry["path"]).exists()]
    status.log_tail = tail_lines(handle.run_dir / TRAIN_LOG, log_lines)
    return status


def _settle_without_done(status: RunStatus, record: dict[str, Any], run_dir: Path) -> None:
    """No `done` yet: running while the process lives; afterwards failed (it exited with an error code) or lost
    (killed by a signal, or ended while no manager was there to learn its exit code)."""
    if record_alive(record):
        status.state = "running"
    elif status.returncode is not None and status.returncode > 0:
        status.state = "failed"
        if not status.error:
            status.error = f"the engine exited with code {status.returncode} before reporting an error"
            status.hint = "; ".join(tail_lines(run_dir / PROCESS_LOG, 3)) or f"see {run_dir / PROCESS_LOG}"
    else:
        status.state = "lost"
        status.error = status.error or "the training process ended without finishing its event stream"
        status.hint = status.hint or (f"it was killed or crashed hard; see {run_dir / PROCESS_LOG}. "
                                      "Resume from the last saved state, if there is one.")
