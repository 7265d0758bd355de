"""'Open TensorBoard' starts the real tensorboard on a log folder, answers on 127.0.0.1, and reuses it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gui.tensorboard import TensorBoardError, TensorBoards

REPO = Path(__file__).resolve().parents[2]


def test_tensorboard_serves_a_log_folder_and_is_reused(tmp_path):
    boards = TensorBoards()
    try:
        url = boards.url_for(tmp_path)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and b"TensorBoard" in response.read()
        assert boards.url_for(tmp_path) == url  # the same process, not a second one
    finally:
        boards.close()


def test_a_missing_log_folder_says_what_to_set(tmp_path):
    with pytest.raises(TensorBoardError, match="logging.logging_dir"):
        TensorBoards().url_for(tmp_path / "logs")


# --- lifecycle: reused per folder, never outliving the process that started it ------------------------------------

def _alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _gone(pid: int, wait: float = 60) -> bool:
    deadline = time.monotonic() + wait
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


@pytest.mark.slow
def test_two_requests_at_once_share_one_board(tmp_path):
    boards = TensorBoards()
    try:
        with ThreadPoolExecutor(2) as pool:
            urls = list(pool.map(boards.url_for, [tmp_path, tmp_path]))
        assert urls[0] == urls[1]
        assert len(boards.pids()) == 1
    finally:
        boards.close()
    assert not boards.pids()


_STARTER = """
import sys, time
from gui.tensorboard import TensorBoards
boards = TensorBoards()
boards.url_for(sys.argv[1])
print(boards.pids()[0], flush=True)
if sys.argv[2] == "wait":
    time.sleep(600)
"""


@pytest.mark.parametrize("ending", ["exit", "killed"])
def test_no_board_outlives_the_process_that_started_it(tmp_path, ending: str):
    # "exit": the interpreter ends normally (atexit closes the boards); "killed": SIGKILL leaves no chance to clean
    # up, and the board's watchdog ends it.
    starter = subprocess.Popen([sys.executable, "-c", _STARTER, str(tmp_path), "wait" if ending == "killed" else ""],
                               cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(starter.stdout.readline())
        assert _alive(pid)
        if ending == "killed":
            starter.kill()
        assert starter.wait(timeout=120) is not None
        assert _gone(pid), f"TensorBoard {pid} still runs after the app {ending}"
    finally:
        starter.kill()
        starter.wait()
