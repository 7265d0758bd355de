"""'Open TensorBoard': the real tensorboard, started once per log folder on a free port of this machine.

It always listens on 127.0.0.1, even when the GUI listens wider with a password: TensorBoard has no login, so a
remote user reaches it through an SSH tunnel (the page says so).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class TensorBoardError(RuntimeError):
    """TensorBoard could not start; the message says why and what to do."""


@dataclass
class _Board:
    process: subprocess.Popen
    port: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TensorBoards:
    """The TensorBoard processes this GUI started, by log folder; a folder's board is reused while it runs."""

    def __init__(self, python: str = sys.executable):
        self.python = python
        self._boards: dict[Path, _Board] = {}

    def url_for(self, log_dir: str | Path, *, wait: float = 60) -> str:
        """Start (or reuse) TensorBoard on log_dir and return its local URL once it answers.

        Raises:
            TensorBoardError: the folder is missing or TensorBoard did not answer within `wait` seconds.
        """
        folder = Path(log_dir).resolve()
        if not folder.is_dir():
            raise TensorBoardError(f"{folder} does not exist yet: the run writes its logs there once it starts "
                                   "(set logging.logging_dir in the Parameters tab to get logs at all)")
        board = self._boards.get(folder)
        if board is None or board.process.poll() is not None:
            board = self._start(folder)
            self._boards[folder] = board
        url = f"http://127.0.0.1:{board.port}/"
        self._wait_until_up(url, board, wait)
        return url

    def _start(self, folder: Path) -> _Board:
        port = free_port()
        argv = [self.python, "-m", "tensorboard.main", "--logdir", str(folder), "--port", str(port),
                "--host", "127.0.0.1", "--reload_interval", "5"]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        return _Board(process, port)

    @staticmethod
    def _wait_until_up(url: str, board: _Board, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if board.process.poll() is not None:
                tail = (board.process.stderr.read() if board.process.stderr else "").strip().splitlines()[-3:]
                raise TensorBoardError("TensorBoard exited: " + (" ".join(tail) or f"code {board.process.returncode}"))
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise TensorBoardError(f"TensorBoard did not answer on {url} within {wait:.0f} s")

    def close(self) -> None:
        for board in self._boards.values():
            if board.process.poll() is None:
                board.process.terminate()
        self._boards.clear()
