"""TensorBoard started from the Train tab is reused for the same run and stops when the app stops (issue 14)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_helpers import free_port, wait_for_http

pytestmark = [pytest.mark.browser, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _listening_on(port: int) -> list[int]:
    """The processes whose command line asks for this port (TensorBoard, or the watchdog it runs in)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in argv and str(port).encode() in argv and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _finished_run(runs_dir: Path, logs: Path) -> None:
    run = runs_dir / "tb-run"
    run.mkdir(parents=True)
    logs.mkdir(parents=True)
    (run / "config.toml").write_text(f'[logging]\nlogging_dir = "{logs}"\n', encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"created_at": time.time(), "output_dir": str(run),
                                              "output_name": "tb-run"}), encoding="utf-8")


def _open_tensorboard(page) -> int:
    page.locator("#run-tensorboard").click()
    link = page.locator("#tensorboard-link a")
    link.wait_for(timeout=120_000)
    return int(re.search(r":(\d+)/", link.get_attribute("href")).group(1))


def test_tensorboard_is_reused_and_stops_with_the_app(browser, tmp_path: Path):
    runs_dir, logs = tmp_path / "runs", tmp_path / "logs"
    _finished_run(runs_dir, logs)
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    app = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--runs-dir", str(runs_dir)],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    boards: list[int] = []
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", app)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_role("tab", name="Train", exact=True).click()
        page.locator("#run-picker input").fill("tb-run")
        page.keyboard.press("Enter")
        board_port = _open_tensorboard(page)
        boards = _listening_on(board_port)
        assert len(boards) == 1
        assert _open_tensorboard(page) == board_port  # the same board for the same run, not a second one
        assert _listening_on(board_port) == boards
        context.close()
        app.send_signal(signal.SIGINT)  # Ctrl+C in the app's terminal
        app.wait(timeout=60)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in boards) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in boards if _alive(pid)], "TensorBoard still runs after the app stopped"
    finally:
        app.kill()
        app.wait()
        for pid in boards:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
