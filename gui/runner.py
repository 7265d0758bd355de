"""The GUI's run manager: makes run directories, starts the engine detached, controls it, and keeps a queue.

A run directory (`<runs_dir>/<timestamp>-<name>/`) holds config.toml (absolute paths), run.json (the process:
pid, process group, argv, start time), process.log (the engine's stdout and stderr), and what the engine writes:
events.jsonl, train.log, and by default the models under output/. The engine runs in its own session, so
closing the browser or the GUI never stops it; everything the GUI shows is read back from those files
(gui/runs.py, folded by gui/run_reader.py), so a restarted GUI re-attaches to running and finished runs alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.config.absolute import absolute_config
from engine.config.io import config_to_toml, load_config, save_config
from engine.config.schema import RunConfig
from engine.config.sections_output import SavingSection
from engine.files import atomic_write_text
from engine.rundir import event_reader, layout
from engine.rundir.control import OFFSET_ENV, control_path, send_command
from engine.rundir.launch import describe_command, engine_environment, launch_command
from engine.rundir.naming import name_in_use
from gui import runs
from gui.run_reader import ChartData, RunReader
from gui.runs import RunHandle, RunStatus, read_record, record_alive, update_record

QUEUE_FILE = "queue.json"
DEFAULT_OUTPUT_DIR = SavingSection.model_fields["output_dir"].default


class RunError(RuntimeError):
    """An action that does not fit the run's state (e.g. starting a run that is already running)."""


class RunManager:
    """Runs under one runs folder. Holds no state the files do not also hold, except the Popen objects it
    started (kept only to reap them and learn their exit codes) and one RunReader per run looked at (what it has
    read of the run's events, so every viewer's tick reads only what was appended since)."""

    def __init__(self, runs_dir: str | Path, *, python: str = sys.executable, env: dict[str, str] | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.env = env
        self._children: dict[Path, subprocess.Popen] = {}
        self._readers: dict[Path, RunReader] = {}
        self._readers_lock = threading.Lock()  # Gradio runs each viewer's tick in its own thread
        # Held while deciding whether the GPU is free and starting, so the queue worker and a Start pressed in
        # the page never both see "nothing running" and start two runs at once.
        self._start_lock = threading.Lock()

    # --- creating ------------------------------------------------------------------------------------------

    def create_run(self, config: RunConfig, name: str | None = None, *, base_dir: str | Path | None = None,
                   warnings: Sequence[str] = ()) -> RunHandle:
        """A new run directory with config.toml (paths made absolute against base_dir, default the current
        folder). The models go to `<run dir>/output` unless the config names another folder, TensorBoard logs to
        `<run dir>/logs` unless it names a log folder; an output name already used there (by files or by another
        run) gets a suffix, and the handle's notes say so. `warnings` (the dataset doctor's) are kept with the run
        for the queue to show."""
        run_dir = self._new_run_dir(name or config.saving.output_name)
        if config.saving.output_dir == DEFAULT_OUTPUT_DIR:
            config = _with_saving(config, output_dir=str(run_dir / "output"))
        if not config.logging.logging_dir:  # the GUI's runs always keep TensorBoard logs, in the run directory
            config = config.model_copy(update={"logging": config.logging.model_copy(
                update={"logging_dir": str(run_dir / "logs")})})
        config = absolute_config(config, Path(base_dir or Path.cwd()))
        output_name, notes = self._unique_output_name(config)
        config = _with_saving(config, output_name=output_name)
        atomic_write_text(layout.config_path(run_dir), config_to_toml(config))
        runs.write_record(run_dir, {"created_at": time.time(), "status": "created", "notes": notes,
                                    "output_dir": config.saving.output_dir, "output_name": output_name,
                                    "doctor_warnings": list(warnings)})
        return RunHandle.from_dir(run_dir)

    def _new_run_dir(self, name: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
        candidate, suffix = self.runs_dir / base, 2
        while candidate.exists():
            candidate, suffix = self.runs_dir / f"{base}-{suffix}", suffix + 1
        candidate.mkdir(parents=True)
        return candidate

    def _unique_output_name(self, config: RunConfig) -> tuple[str, list[str]]:
        """engine.rundir.naming's rule (never overwrite files of that name), extended to names that other runs
        into the same folder have claimed but not written yet (queued runs)."""
        output_dir, name = Path(config.saving.output_dir), config.saving.output_name
        claimed = {handle.output_name for handle in self.discover()
                   if handle.output_dir and Path(handle.output_dir) == output_dir}
        candidate, suffix = name, 2
        while candidate in claimed or name_in_use(output_dir, candidate, config.saving.save_model_as):
            candidate, suffix = f"{name}-{suffix}", suffix + 1
        if candidate == name:
            return name, []
        return candidate, [f"{output_dir} already has (or another run will write) models named {name!r}; "
                           f"this run saves as {candidate!r} so nothing is overwritten"]

    # --- starting and controlling --------------------------------------------------------------------------

    def start(self, handle: RunHandle, config_path: Path | None = None) -> RunHandle:
        """Start the engine on the run, detached (own session and process group), and record its process."""
        self._wait_for_exit_after_done(handle)
        config_path = config_path or handle.config_path
        argv = launch_command(load_config(config_path, check_packages=False), config_path,
                              run_dir=handle.run_dir, python=self.python)
        events_offset = handle.events_path.stat().st_size if handle.events_path.exists() else 0
        # A stop pressed from here on is this run's, even before its process exists; older lines are not.
        control = control_path(handle.run_dir)
        control_offset = control.stat().st_size if control.exists() else 0
        with (handle.run_dir / runs.PROCESS_LOG).open("ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=handle.run_dir,
                                       env=engine_environment(self.env, **{OFFSET_ENV: str(control_offset)}),
                                       start_new_session=True)
        self._children[handle.run_dir] = process
        self._remove_from_queue(handle)
        update_record(handle.run_dir, status="started", pid=process.pid, pgid=os.getpgid(process.pid),
                      proc_start=runs.process_start_ticks(process.pid), argv=argv, command=describe_command(argv),
                      config=str(config_path), started_at=time.time(), events_offset=events_offset,
                      control_offset=control_offset,
                      returncode=None, start_error="")
        return handle

    def start_if_idle(self, handle: RunHandle) -> list[RunHandle]:
        """Start the run only when no other run is running; returns the running runs that kept it from starting
        ([] when it started)."""
        with self._start_lock:
            busy = [other for other in self.running() if other.run_dir != handle.run_dir]
            if not busy:
                self.start(handle)
            return busy

    def _wait_for_exit_after_done(self, handle: RunHandle, limit: float = 60) -> None:
        """A run whose `done` is written may still be closing its files for a moment: wait for that, since two
        processes must never share a run dir. A run without `done` is really running: refuse."""
        deadline = time.monotonic() + limit
        while record_alive(read_record(handle.run_dir)):
            if self.status(handle, log_lines=0).state == "running" or time.monotonic() > deadline:
                raise RunError(f"{handle.name} is still running; stop it first")
            time.sleep(0.1)
            self._reap(handle)

    def resume(self, handle: RunHandle, state_dir: str | Path) -> RunHandle:
        """Continue a stopped (or failed) run from a saved state folder: a new process on the same run dir."""
        config = load_config(handle.config_path, check_packages=False)
        previous = read_record(handle.run_dir)
        config_path = handle.run_dir / f"config-resume-{len(previous.get('history', [])) + 1}.toml"
        save_config(_with_saving(config, resume=str(Path(state_dir).resolve())), config_path)
        update_record(handle.run_dir, history=[*previous.get("history", []), _process_fields(previous)])
        return self.start(handle, config_path)

    def stop(self, handle: RunHandle) -> None:
        """Graceful: the engine saves the model and a resumable state after the current step, then ends."""
        send_command(handle.run_dir, "stop")

    def save_now(self, handle: RunHandle) -> None:
        send_command(handle.run_dir, "save")

    def sample_now(self, handle: RunHandle) -> None:
        send_command(handle.run_dir, "sample")

    def kill(self, handle: RunHandle) -> None:
        """SIGTERM to the run's process group (every process of an accelerate launch); the engine still treats it
        as a graceful stop. For a run that does not read its control file any more."""
        record = read_record(handle.run_dir)
        if record_alive(record):
            os.killpg(record["pgid"], signal.SIGTERM)

    # --- reading -------------------------------------------------------------------------------------------

    def status(self, handle: RunHandle, *, log_lines: int = 30) -> RunStatus:
        self._reap(handle)
        return self._reader(handle).status(queued=handle.name in self._load_queue(), log_lines=log_lines)

    def chart(self, handle: RunHandle) -> ChartData:
        """The run's loss and learning-rate rows (bounded, about 2000 points however long the run) and their
        version, which changes only when they do."""
        return self._reader(handle).chart()

    def _reader(self, handle: RunHandle) -> RunReader:
        with self._readers_lock:
            reader = self._readers.get(handle.run_dir)
            if reader is None:
                reader = self._readers[handle.run_dir] = RunReader(handle.run_dir)
            return reader

    def _reap(self, handle: RunHandle) -> None:
        """Collect the exit code of a process this manager started (else it lingers as a zombie)."""
        process = self._children.get(handle.run_dir)
        if process is not None and process.poll() is not None:
            del self._children[handle.run_dir]
            if read_record(handle.run_dir).get("pid") == process.pid:
                update_record(handle.run_dir, returncode=process.returncode)

    def discover(self) -> list[RunHandle]:
        found = runs.discover(self.runs_dir)
        with self._readers_lock:  # forget the readers of run directories that were deleted
            kept = {handle.run_dir for handle in found}
            self._readers = {run_dir: reader for run_dir, reader in self._readers.items() if run_dir in kept}
        return found

    def tail_events(self, handle: RunHandle, since: int) -> tuple[list[dict[str, Any]], int]:
        """New events since byte offset `since` (0 for all) and the next offset; cheap enough to poll."""
        return event_reader.tail_events(handle.events_path, since)

    # --- the queue -----------------------------------------------------------------------------------------

    def enqueue(self, handle: RunHandle) -> None:
        queue = self._load_queue()
        if handle.name not in queue:
            self._save_queue([*queue, handle.name])
            update_record(handle.run_dir, status="queued")

    def queue(self) -> list[RunHandle]:
        return [RunHandle.from_dir(self.runs_dir / name) for name in self._load_queue()]

    def running(self) -> list[RunHandle]:
        for handle in self.discover():
            self._reap(handle)
        return [handle for handle in self.discover() if record_alive(read_record(handle.run_dir))]

    def advance_queue(self) -> RunHandle | None:
        """Start the next queued run when none is running (the GUI calls this on a timer). A run that cannot
        even start is marked failed with the reason, and the next one is tried."""
        with self._start_lock:
            return self._advance_queue()

    def dequeue(self, handle: RunHandle) -> bool:
        """Take a run out of the queue before it starts, and delete its folder (a config and a record, nothing
        trained). False when it is not queued any more (it may have started meanwhile)."""
        with self._start_lock:
            if handle.name not in self._load_queue() or read_record(handle.run_dir).get("pid"):
                return False
            self._remove_from_queue(handle)
            if handle.run_dir.parent == self.runs_dir:
                shutil.rmtree(handle.run_dir, ignore_errors=True)
            return True

    def _advance_queue(self) -> RunHandle | None:
        if self.running():
            return None
        for name in self._load_queue():
            handle = RunHandle.from_dir(self.runs_dir / name)
            try:
                return self.start(handle)
            except Exception as error:  # noqa: BLE001 - a bad run must not block the queue behind it
                self._remove_from_queue(handle)
                update_record(handle.run_dir, status="failed to start", start_error=f"{type(error).__name__}: "
                                                                                   f"{error}")
        return None

    def _load_queue(self) -> list[str]:
        path = self.runs_dir / QUEUE_FILE
        names = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        return [name for name in names if (self.runs_dir / name).is_dir()]

    def _save_queue(self, names: list[str]) -> None:
        atomic_write_text(self.runs_dir / QUEUE_FILE, json.dumps(names, indent=2) + "\n")

    def _remove_from_queue(self, handle: RunHandle) -> None:
        queue = self._load_queue()
        if handle.name in queue:
            self._save_queue([name for name in queue if name != handle.name])


def _process_fields(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("pid", "pgid", "argv", "config", "started_at", "events_offset", "returncode")
    return {key: record.get(key) for key in keys}


def _with_saving(config: RunConfig, **updates: Any) -> RunConfig:
    return config.model_copy(update={"saving": config.saving.model_copy(update=updates)})
