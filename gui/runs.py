"""What a run directory says about its run: the handle, its record (run.json), its state and progress.

Everything here is read from files (run.json, events.jsonl, train.log, process.log) plus whether the recorded
process is still alive, so the GUI shows the same thing after a page reload or a restart as before it.
No torch here: the GUI imports this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.files import atomic_write_text
from engine.rundir import layout

# The GUI's own files in a run directory, beside the engine's (engine.rundir.layout)
RECORD_FILE = "run.json"
PROCESS_LOG = "process.log"
_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class RunHandle:
    """One run directory. Cheap to rebuild from the folder, so the GUI may keep or drop handles freely."""

    run_dir: Path
    output_dir: str = ""
    output_name: str = ""
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # the dataset doctor's warnings when the run was created (the queue shows them)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def config_path(self) -> Path:
        return layout.config_path(self.run_dir)

    @property
    def events_path(self) -> Path:
        return layout.events_path(self.run_dir)

    @classmethod
    def from_dir(cls, run_dir: Path) -> RunHandle:
        return cls.from_record(run_dir, read_record(run_dir))

    @classmethod
    def from_record(cls, run_dir: Path, record: dict[str, Any]) -> RunHandle:
        return cls(run_dir, record.get("output_dir", ""), record.get("output_name", ""),
                   tuple(record.get("notes", ())), tuple(record.get("doctor_warnings", ())))


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
    sample_labels: list[str] = field(default_factory=list)  # one per sample: its step and prompt
    warnings: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    memory_plan: dict[str, Any] | None = None  # the start event's plan (a GPU run's; None on a CPU or older runs)
    memory: dict[str, float] = field(default_factory=dict)  # the newest progress event's memory figures (MiB)
    validation_images: int = 0  # held out for the validation loss (the start event's num_validation_images)
    validation_loss: float | None = None  # the newest `validation` event's loss
    best_checkpoint: str | None = None  # the checkpoint with the lowest validation loss, as the engine last said


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
    records = {path: read_record(path) for path in runs_dir.iterdir() if (path / RECORD_FILE).is_file()}
    found = [RunHandle.from_record(path, record) for path, record in records.items()]
    # One read of each record (the Train tab lists the runs at every tick).
    return sorted(found, key=lambda handle: (records[handle.run_dir].get("created_at", 0), handle.name),
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


# --- logs ----------------------------------------------------------------------------------------------------


def tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a text file (reading only its end)."""
    if count <= 0 or not path.is_file():
        return []
    with path.open("rb") as stream:
        stream.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        text = stream.read().decode("utf-8", errors="replace")
    return text.splitlines()[-count:]
