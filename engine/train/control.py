"""The run control channel: stop, save or sample a running training from outside its process.

The GUI (or a user in a shell: `echo stop >> <run_dir>/control`) appends one command per line to
`<run_dir>/control`; the trainer polls the file between steps. A plain file works across processes, machines
sharing a folder and operating systems, needs no port, and leaves a record of what was asked. SIGTERM and SIGINT
ask for the same graceful stop, so a run killed by a job scheduler or Ctrl+C still ends with a saved model.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

CONTROL_FILE = "control"
COMMANDS = ("stop", "save", "sample")

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


class ControlChannel:
    """Reads the commands appended to `<run_dir>/control` since the last poll, and holds the stop request.

    A control file left from an earlier run in the same folder is read from its current end, so its old
    commands are not replayed.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = control_path(run_dir)
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._stop_reason: str | None = None
        self._unknown_seen: set[str] = set()
        self._warnings: list[str] = []
        self._saved_handlers: dict[int, _Handler] = {}

    # --- the file ---------------------------------------------------------------------------------------------

    def poll(self) -> list[str]:
        """Known commands appended since the last poll, in order, each once; a "stop" also requests the stop.

        A line without its newline yet is left for the next poll (the writer may be mid-line). Asking twice
        between two polls means the same as asking once, so repeats are dropped.
        """
        complete = self._read_complete_lines()
        commands: list[str] = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            command = line.strip().lower()
            if command in COMMANDS and command not in commands:
                commands.append(command)
            elif command and command not in COMMANDS:
                self._note_unknown(command)
        if "stop" in commands:
            self.request_stop("stop command")
        return commands

    def _read_complete_lines(self) -> bytes:
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
        reach its next step.
        """
        if threading.current_thread() is not threading.main_thread():
            return False
        for number in (signal.SIGTERM, signal.SIGINT):
            self._saved_handlers.setdefault(number, signal.getsignal(number))
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
