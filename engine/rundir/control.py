"""The run control channel: stop, save or sample a running training from outside its process.

The GUI (or a user in a shell: `echo stop >> <run_dir>/control`) appends one command per line to
`<run_dir>/control`; the trainer polls the file between steps. A plain file works across processes, machines
sharing a folder and operating systems, needs no port, and leaves a record of what was asked. SIGTERM and SIGINT
ask for the same graceful stop, so a run killed by a job scheduler or Ctrl+C still ends with a saved model.

A run honours what is asked from the moment its process starts, not from when the trainer exists (seconds of
imports and model loading later): `python -m engine train` calls `watch_from_process_start` before importing
anything heavy, which installs the signal handlers and notes where the control file ends. Commands written before
that point belong to an earlier run (or to nobody) and are never replayed, with two refinements that close the
gap between the launch and that first moment:

- a launcher that knows the run folder (the GUI) notes the control file's size just before it starts the process
  and passes it in ATELIER_CONTROL_OFFSET; everything appended after that counts, even before the process exists;
- without it, a control file modified after the process started (by the kernel's start time) has its last line
  counted too: that line was written after the start, so it cannot be an earlier run's.

This module imports only the standard library and the run directory's file names (engine.rundir.layout): it runs
before torch, and before pydantic, is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from engine.rundir.layout import CONTROL_FILE

COMMANDS = ("stop", "save", "sample")
OFFSET_ENV = "ATELIER_CONTROL_OFFSET"  # the control file's size when the launcher started the run
DEFAULT_OUTPUT_DIR = "output"  # SavingSection.output_dir's default (a test keeps the two equal)
_PRESET_FORMAT = "atelier-preset"  # engine.config.io.PRESET_FORMAT, which imports pydantic

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None  # what signal.getsignal returns


def control_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONTROL_FILE


def send_command(run_dir: str | Path, command: str) -> None:
    """Append one command line to the run's control file (created if missing; the run folder must exist).

    The line goes out in a single O_APPEND write, so commands from several senders never interleave.

    Raises:
        ValueError: for a command other than stop, save or sample.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown control command {command!r}; use one of {', '.join(COMMANDS)}")
    descriptor = os.open(control_path(run_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, f"{command}\n".encode())
    finally:
        os.close(descriptor)


class StoppedBeforeTraining(BaseException):  # noqa: N818 - not an error: the run ends as asked
    """A stop asked for before the first training step; raised at a phase boundary to end the run cleanly.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on its way reports it as a failure.
    """

    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"stopped ({reason}) {phase}, before the first training step")
        self.phase = phase
        self.reason = reason


class ControlChannel:
    """Reads the commands appended to `<run_dir>/control` since the last poll, and holds the stop request.

    A control file left from an earlier run in the same folder is read from its current end (or from `offset`,
    where the launcher noted the end), so its old commands are not replayed. Without a run folder (not known
    yet) only signals can ask for a stop; `retarget` points the channel at the folder once it is known.
    """

    def __init__(self, run_dir: str | Path | None, *, offset: int | None = None) -> None:
        self.path = control_path(run_dir) if run_dir is not None else None
        self._offset = _size(self.path) if offset is None else offset
        self._pending: list[str] = []  # read by check_stop, handed out by the next poll
        self._stop_reason: str | None = None
        self._unknown_seen: set[str] = set()
        self._warnings: list[str] = []
        self._saved_handlers: dict[int, _Handler] = {}

    def retarget(self, run_dir: str | Path) -> None:
        """Watch `<run_dir>/control` from its current end, if that is not the file watched already.

        For the rare case where the folder guessed at process start differs from the one the run uses: what the
        old file asked is dropped (it was not this run's folder); a stop asked by a signal is kept.
        """
        path = control_path(run_dir)
        if self.path is not None and path.resolve() == self.path.resolve():
            return
        self.path, self._offset, self._pending = path, _size(path), []
        if self._stop_reason == "stop command":
            self._stop_reason = None

    # --- the file ---------------------------------------------------------------------------------------------

    def poll(self) -> list[str]:
        """Known commands appended since the last poll, in order, each once; a "stop" also requests the stop.

        A line without its newline yet is left for the next poll (the writer may be mid-line). Asking twice
        between two polls means the same as asking once, so repeats are dropped.
        """
        self.check_stop()  # reads the new lines into _pending, and a "stop" among them requests the stop
        commands, self._pending = list(dict.fromkeys(self._pending)), []
        return commands

    def check_stop(self) -> bool:
        """Whether a stop was asked (by a signal or a new "stop" line); other commands wait for the next poll.

        For the phases before training, where "save" and "sample" mean nothing yet but must not be lost.
        """
        self._pending.extend(self._read_commands())
        if "stop" in self._pending:
            self.request_stop("stop command")
        return self.stop_requested

    def _read_commands(self) -> list[str]:
        commands = []
        for line in self._read_complete_lines().decode("utf-8", errors="replace").splitlines():
            command = line.strip().lower()
            if command in COMMANDS:
                commands.append(command)
            elif command:
                self._note_unknown(command)
        return commands

    def _read_complete_lines(self) -> bytes:
        if self.path is None:
            return b""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return b""
        if size < self._offset:  # the file was truncated or replaced: start over from its beginning
            self._offset = 0
        if size == self._offset:
            return b""
        with self.path.open("rb") as stream:
            stream.seek(self._offset)
            data = stream.read(size - self._offset)
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return complete

    def _note_unknown(self, command: str) -> None:
        if command not in self._unknown_seen:
            self._unknown_seen.add(command)
            self._warnings.append(f"ignored unknown control command {command!r} in {self.path}; "
                                  f"known commands: {', '.join(COMMANDS)}")

    def pop_warnings(self) -> list[str]:
        """Warnings not handed out before (one per distinct unknown command), for the event stream."""
        warnings, self._warnings = self._warnings, []
        return warnings

    # --- stopping ---------------------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop after the current step; the first reason is kept."""
        if self._stop_reason is None:
            self._stop_reason = reason

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    # --- signals ----------------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> bool:
        """Make SIGTERM and SIGINT request a graceful stop. Returns False (and does nothing) off the main thread.

        After the first SIGINT the previous handler is back, so a second Ctrl+C force-quits a run that is slow to
        reach its next step. Installing again (the run does, after the process start did) changes nothing, so
        that a Ctrl+C pressed during the imports still leaves the next one to force-quit.
        """
        if threading.current_thread() is not threading.main_thread():
            return False
        for number in (signal.SIGTERM, signal.SIGINT):
            if number not in self._saved_handlers:
                self._saved_handlers[number] = signal.getsignal(number)
                signal.signal(number, self._on_signal)
        return True

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before install_signal_handlers."""
        if threading.current_thread() is not threading.main_thread():
            return
        for number, handler in self._saved_handlers.items():
            signal.signal(number, handler)
        self._saved_handlers.clear()

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        self.request_stop(signal.Signals(number).name)
        if number == signal.SIGINT and number in self._saved_handlers:
            signal.signal(number, self._saved_handlers[number])


# --- from the start of the process ------------------------------------------------------------------------------

_started: ControlChannel | None = None  # the channel watch_from_process_start opened, until the run takes it


def watch_from_process_start(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ControlChannel:
    """Called first by `python -m engine train ...` (argv without the program): signals and stop lines count
    from here on, though the run only reads them at its next phase boundary.

    The run folder is read cheaply from argv and the config file (`guess_run_dir`); when it cannot be told,
    only signals count until `take_started_channel` learns it.
    """
    global _started
    environ = os.environ if environ is None else environ
    run_dir = guess_run_dir(argv)
    offset = start_offset(control_path(run_dir), environ) if run_dir is not None else None
    channel = ControlChannel(run_dir, offset=offset)
    channel.install_signal_handlers()
    _started = channel
    return channel


def take_started_channel(run_dir: str | Path) -> ControlChannel:
    """The channel opened at process start, pointed at `run_dir`; a new one (reading from now) without it.

    Taken once: a later run in the same process (tests calling the CLI in-process) starts afresh.
    """
    global _started
    channel, _started = _started, None
    if channel is None:
        return ControlChannel(run_dir)
    channel.retarget(run_dir)
    return channel


# The process start time is known to a clock tick (10 ms) and read through two clocks, so a line written just
# before the start can look written after it (a busy machine showed it): only a change this much later counts.
# A user's `stop` comes far later than that; the GUI passes the exact offset and needs no guess.
_START_SLACK_S = 0.1


def start_offset(path: Path, environ: Mapping[str, str]) -> int:
    """Where this run's commands begin in the control file (see the module docstring)."""
    given = environ.get(OFFSET_ENV, "").strip()
    if given.isdigit():
        return int(given)
    try:
        stat = path.stat()
    except OSError:
        return 0
    started = process_start_time(os.getppid() if "LOCAL_RANK" in environ else os.getpid())
    if stat.st_size and started is not None and stat.st_mtime >= started + _START_SLACK_S:
        return _last_line_start(path, stat.st_size)
    return stat.st_size


def process_start_time(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (Linux; None elsewhere). Under `accelerate launch`
    the launcher (the parent) is what the user started. The kernel counts in clock ticks (10 ms)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime; the split began at field 3
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        now = time.time()
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return now - since_boot + ticks / os.sysconf("SC_CLK_TCK")


def _last_line_start(path: Path, size: int, window: int = 4096) -> int:
    """The offset where the file's last line (complete or not) begins."""
    start = max(0, size - window)
    with path.open("rb") as stream:
        stream.seek(start)
        data = stream.read(size - start)
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    newline = data.rfind(b"\n", 0, end)
    if newline < 0 and start > 0:
        return size  # a last line longer than the window is no command
    return start + newline + 1


def guess_run_dir(argv: Sequence[str]) -> Path | None:
    """The run folder of `train CONFIG [--run-dir DIR] [--set ...]`, as run_training will resolve it: --run-dir,
    else saving.output_dir (from the last --set of it, the config, or the default) beside the config file.

    Standard library only, and never raises: a config it cannot read fails properly a moment later.
    """
    if not argv or argv[0] != "train":
        return None
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("config", nargs="?")
    parser.add_argument("--run-dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    try:
        known, _ = parser.parse_known_args(list(argv[1:]))
    except (argparse.ArgumentError, SystemExit):
        return None
    if known.run_dir:
        return Path(known.run_dir).resolve()
    if not known.config:
        return None
    output_dir = _configured_output_dir(Path(known.config), known.overrides)
    if not output_dir:
        return None
    path = Path(output_dir).expanduser()
    return (path if path.is_absolute() else Path(known.config).resolve().parent / path).resolve()


def _configured_output_dir(config: Path, overrides: Sequence[str]) -> str | None:
    for override in reversed(overrides):  # the last --set wins, as in engine.config.io.apply_overrides
        key, equals, text = override.partition("=")
        if equals and key.strip() == "saving.output_dir":
            value = _override_value(text.strip())
            return value if isinstance(value, str) else None
    try:
        text = config.read_text(encoding="utf-8")
        data = json.loads(text) if config.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, ValueError):  # unreadable, not UTF-8, not TOML/JSON
        return None
    if isinstance(data, dict) and data.get("format") == _PRESET_FORMAT and isinstance(data.get("config"), dict):
        data = data["config"]
    saving = data.get("saving", {}) if isinstance(data, dict) else None
    value = saving.get("output_dir", DEFAULT_OUTPUT_DIR) if isinstance(saving, dict) else None
    return value if isinstance(value, str) else None


def _override_value(text: str) -> Any:
    """engine.config.io.parse_override_value, which this module cannot import (it pulls in pydantic)."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0
