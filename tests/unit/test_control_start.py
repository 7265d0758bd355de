"""What a run counts as its own from the moment its process starts: the run folder read cheaply from argv, where
the control file's commands begin (launcher's note, or the file's state at process start), and the channel opened
then and handed to the run. Real files, real signals, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config.io import load_config, resolve_path
from engine.config.sections_output import SavingSection
from engine.rundir import control
from engine.rundir.control import (
    DEFAULT_OUTPUT_DIR,
    OFFSET_ENV,
    ControlChannel,
    control_path,
    guess_run_dir,
    process_start_time,
    send_command,
    start_offset,
    take_started_channel,
    watch_from_process_start,
)


def run_dir_of(config: Path, overrides: list[str] = (), run_dir: str | None = None) -> Path:
    """Where run_training puts the run (engine.train.run.run_training's rule), from the validated config."""
    if run_dir:
        return Path(run_dir).resolve()
    loaded = load_config(config, overrides, check_packages=False)
    return resolve_path(loaded.saving.output_dir, config.resolve().parent).resolve()


def test_the_default_output_dir_is_the_schemas():
    assert SavingSection.model_fields["output_dir"].default == DEFAULT_OUTPUT_DIR


@pytest.mark.parametrize("case", ["default", "relative", "absolute", "override", "override-last", "preset",
                                  "run-dir", "run-dir=form"])
def test_the_guessed_run_dir_is_where_the_run_goes(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    configs = tmp_path / "configs"
    configs.mkdir()
    config = configs / "run.toml"
    config.write_text('[saving]\noutput_dir = "../outputs/a"\n' if case != "default" else "")
    overrides: list[str] = []
    argv = ["train", str(config)]
    run_dir = None
    if case == "absolute":
        config.write_text(f'[saving]\noutput_dir = "{tmp_path / "abs"}"\n')
    elif case == "override":
        overrides = ["saving.output_dir=elsewhere"]
    elif case == "override-last":
        overrides = ['saving.output_dir="first"', "training.seed=4", 'saving.output_dir = "last one"']
    elif case == "preset":
        config = configs / "preset.json"
        config.write_text(json.dumps({"format": "atelier-preset", "config": {"saving": {"output_dir": "p"}}}))
        argv = ["train", str(config)]
    elif case == "run-dir":
        run_dir = "relative/run"
        argv += ["--run-dir", run_dir]
    elif case == "run-dir=form":
        run_dir = str(tmp_path / "r")
        argv = ["train", f"--run-dir={run_dir}", str(config)]
    for override in overrides:
        argv += ["--set", override]
    assert guess_run_dir(argv) == run_dir_of(config, overrides, run_dir)


@pytest.mark.parametrize("argv", [[], ["validate", "x.toml"], ["train"], ["train", "missing.toml"],
                                  ["train", "--set"], ["train", "binary.toml"]])
def test_no_guess_when_the_run_dir_cannot_be_told(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    assert guess_run_dir(argv) is None


def test_a_launchers_offset_wins(tmp_path):
    send_command(tmp_path, "stop")
    assert start_offset(control_path(tmp_path), {OFFSET_ENV: "0"}) == 0  # the stop came after the launch


def test_a_file_untouched_since_the_process_started_is_read_from_its_end(tmp_path):
    send_command(tmp_path, "stop")
    send_command(tmp_path, "save")
    path = control_path(tmp_path)
    before_start = process_start_time(os.getpid()) - 60
    os.utime(path, (before_start, before_start))  # as if written by an earlier run
    assert start_offset(path, {}) == path.stat().st_size


def test_a_file_written_after_the_process_started_has_its_last_line_counted(tmp_path):
    path = control_path(tmp_path)
    path.write_text("stop\nsave\n")  # now: after this process started
    assert start_offset(path, {}) == len("stop\n")
    path.write_text("save\nsto")  # a line being written
    assert start_offset(path, {}) == len("save\n")
    assert start_offset(control_path(tmp_path / "none"), {}) == 0


def test_process_start_time_is_the_kernels(tmp_path):
    before = time.time()
    child = subprocess.run([sys.executable, "-c", "import os, time\nfrom engine.rundir.control import "
                            "process_start_time\nprint(process_start_time(os.getpid()), time.time())"],
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    started, now = map(float, child.stdout.split())
    tick = 1 / os.sysconf("SC_CLK_TCK")  # the kernel counts whole ticks, rounded down
    assert before - tick <= started <= now


@pytest.fixture
def restore_signals():
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    # A fresh engine process's handlers, whatever an earlier test in this worker left.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    control._started = None
    for number, handler in before.items():
        signal.signal(number, handler)


def test_the_channel_opened_at_start_is_handed_to_the_run_once(tmp_path, restore_signals):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    send_command(run_dir, "stop")
    old = time.time() - 3600
    os.utime(control_path(run_dir), (old, old))  # an earlier run's stop
    opened = watch_from_process_start(["train", str(tmp_path / "run.toml"), "--run-dir", str(run_dir)], {})
    assert not opened.check_stop()
    send_command(run_dir, "save")
    send_command(run_dir, "stop")  # asked while the run was still importing
    os.kill(os.getpid(), signal.SIGTERM)  # handled, not fatal: the handlers are in place from the start
    time.sleep(0.05)
    taken = take_started_channel(run_dir)
    assert taken is opened and taken.check_stop() and taken.stop_reason == "SIGTERM"
    assert taken.poll() == ["save", "stop"]  # check_stop left the save for the trainer
    assert take_started_channel(run_dir) is not opened  # a second run in this process starts afresh


def test_a_wrong_guess_is_corrected_keeping_signals_only(tmp_path, restore_signals):
    guessed, actual = tmp_path / "guessed", tmp_path / "actual"
    guessed.mkdir()
    actual.mkdir()
    opened = watch_from_process_start(["train", "x.toml", "--run-dir", str(guessed)], {OFFSET_ENV: "0"})
    send_command(guessed, "stop")
    send_command(actual, "sample")  # before the run learnt its folder: not counted
    assert opened.check_stop()
    taken = take_started_channel(actual)
    assert taken.path == control_path(actual) and not taken.check_stop() and taken.poll() == []
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    taken.retarget(guessed)
    assert taken.stop_reason == "SIGTERM"


def test_without_a_run_dir_only_signals_count(restore_signals):
    channel = ControlChannel(None)
    assert channel.poll() == [] and not channel.check_stop()


def test_a_ctrl_c_during_the_imports_still_leaves_the_next_one_to_force_quit(tmp_path, restore_signals):
    watch_from_process_start(["train", "x.toml", "--run-dir", str(tmp_path)], {})
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    taken = take_started_channel(tmp_path)
    assert taken.install_signal_handlers()  # what run_training does once the imports are done
    assert taken.stop_reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
