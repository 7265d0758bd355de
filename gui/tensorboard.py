"""'Open TensorBoard': the real tensorboard, started once per log folder on a free port of this machine.

It always listens on 127.0.0.1, even when the GUI listens wider with a password: TensorBoard has no login, so a
remote user reaches it through an SSH tunnel (the page says so).

A TensorBoard started here never outlives the app: every `TensorBoards` is closed when the interpreter exits (an
atexit hook, which also covers the tests), and each TensorBoard runs under a small watchdog (this module run as
`python -m gui.tensorboard --parent PID -- ARGS`) that ends it as soon as the app's process is gone, so even an app
killed without a chance to clean up (SIGKILL, a crash) leaves none behind. A board for a folder is reused while it
runs, whoever asks for it.
"""

from __future__ import annotations

import argparse
import atexit
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# How often the watchdog looks whether the app is still there; a TensorBoard may outlive it by about this long.
PARENT_POLL_SECONDS = 1.0
STOP_WAIT_SECONDS = 5.0


class TensorBoardError(RuntimeError):
    """TensorBoard could not start; the message says why and what to do."""


@dataclass
class _Board:
    process: subprocess.Popen
    port: int
    errors: IO[str]  # its stderr, in a file: a pipe nobody reads would stop TensorBoard once full

    def error_tail(self) -> str:
        self.errors.seek(0)
        return " ".join(self.errors.read().strip().splitlines()[-3:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TensorBoards:
    """The TensorBoard processes this GUI started, by log folder; a folder's board is reused while it runs."""

    def __init__(self, python: str = sys.executable):
        self.python = python
        self._boards: dict[Path, _Board] = {}
        self._lock = threading.Lock()  # two clicks at once must not start two boards for one folder
        _OPEN.add(self)

    def url_for(self, log_dir: str | Path, *, wait: float = 60) -> str:
        """Start (or reuse) TensorBoard on log_dir and return its local URL once it answers.

        Raises:
            TensorBoardError: the folder is missing or TensorBoard did not answer within `wait` seconds.
        """
        folder = Path(log_dir).resolve()
        if not folder.is_dir():
            raise TensorBoardError(f"{folder} does not exist yet: the run writes its logs there once it starts "
                                   "(set logging.logging_dir in the Parameters tab to get logs at all)")
        with self._lock:
            board = self._boards.get(folder)
            if board is None or board.process.poll() is not None:
                if board is not None:
                    board.errors.close()  # the ended board's stderr file
                board = self._start(folder)
                self._boards[folder] = board
        url = f"http://127.0.0.1:{board.port}/"
        self._wait_until_up(url, board, wait)
        return url

    def pids(self) -> list[int]:
        """The process ids of the boards still running (the watchdog's; TensorBoard runs inside it)."""
        with self._lock:
            return [board.process.pid for board in self._boards.values() if board.process.poll() is None]

    def _start(self, folder: Path) -> _Board:
        port = free_port()
        arguments = ["--logdir", str(folder), "--port", str(port), "--host", "127.0.0.1", "--reload_interval", "5"]
        argv = [self.python, "-m", "gui.tensorboard", "--parent", str(os.getpid()), "--", *arguments]
        # Its own session, so a Ctrl+C in the app's terminal reaches the app, which then stops the boards itself.
        errors = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed by close()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True,
                                   cwd=_REPO, env=_child_env())
        return _Board(process, port, errors)

    @staticmethod
    def _wait_until_up(url: str, board: _Board, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if board.process.poll() is not None:
                raise TensorBoardError("TensorBoard exited: " + (board.error_tail() or
                                                                  f"code {board.process.returncode}"))
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise TensorBoardError(f"TensorBoard did not answer on {url} within {wait:.0f} s")

    def close(self) -> None:
        """Stop every board this object started and wait for them to end (killed if they do not stop)."""
        with self._lock:
            boards = list(self._boards.values())
            self._boards.clear()
        for board in boards:
            if board.process.poll() is None:
                board.process.terminate()
        for board in boards:
            try:
                board.process.wait(timeout=STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                board.process.kill()
                board.process.wait()
            board.errors.close()


_REPO = Path(__file__).resolve().parents[1]
_OPEN: weakref.WeakSet[TensorBoards] = weakref.WeakSet()


def _child_env() -> dict[str, str]:
    """The app's environment, with the repository importable (the watchdog is `gui.tensorboard`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH", "")]))
    return env


def close_all() -> None:
    """Stop every TensorBoard any `TensorBoards` of this process started (run at exit)."""
    for boards in list(_OPEN):
        boards.close()


atexit.register(close_all)


# --- the watchdog: `python -m gui.tensorboard --parent PID -- TENSORBOARD ARGS` ------------------------------------


def _watch_parent(parent: int) -> None:
    """End this process once `parent` is gone (the app exited or was killed: this process was handed to another)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(0)  # TensorBoard's own threads would keep a normal exit waiting


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gui.tensorboard", description="TensorBoard that ends with "
                                     "the process that started it.")
    parser.add_argument("--parent", type=int, required=True, help="the app's process id")
    parser.add_argument("tensorboard_args", nargs=argparse.REMAINDER, help="-- then TensorBoard's arguments")
    args = parser.parse_args(argv)
    if os.getppid() != args.parent:
        return  # the app is gone already
    threading.Thread(target=_watch_parent, args=(args.parent,), name="parent-watch", daemon=True).start()
    from tensorboard.main import run_main

    forwarded = args.tensorboard_args
    sys.argv = ["tensorboard", *(forwarded[1:] if forwarded[:1] == ["--"] else forwarded)]
    run_main()


if __name__ == "__main__":
    main()
