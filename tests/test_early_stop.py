"""A stop asked in the first seconds of a run counts: `stop` in the control file or SIGTERM at 0.2 s, 1 s and 2 s
after `python -m engine train` starts (still importing, loading or caching) ends the run with exit 0 and a `done`
stopped event; and a control file left by an earlier run, or a stop written before the run was started, is never
replayed, from the command line or from the GUI's run manager."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import REPO, engine_env, events_of, run_engine, write_config

from engine.rundir.control import control_path, send_command
from gui.runner import RunManager

LONG_RUN = {"training": {"max_train_steps": 100000, "max_train_epochs": 0}}


def start_engine(config: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", "train", str(config), "--run-dir", str(run_dir)],
                            cwd=REPO, env=engine_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_stopped_cleanly(process: subprocess.Popen, run_dir: Path) -> dict:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert "Traceback" not in output, output
    events = events_of(run_dir)
    done = events[-1]
    assert done["type"] == "done" and done["ok"] and done["stopped"], events
    assert [event["type"] for event in events].count("done") == 1
    trained = any(event["type"] == "progress" for event in events)
    if trained:  # the stop came after the first step: the usual stop, with a state to resume from
        assert Path(done["state"]).is_dir()
    else:  # nothing was trained, so nothing was saved, and the event says where the run was
        assert done["files"] == [] and done["state"] is None and done["global_step"] == 0
        assert "before the first training step" in done["summary"] and done["phase"]
        assert not any(event["type"] == "checkpoint" for event in events)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.2, 1.0, 2.0])
@pytest.mark.parametrize("how", ["control", "sigterm"])
def test_a_stop_in_the_first_seconds_is_honoured(tiny_models, tmp_path, how, delay):
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", **LONG_RUN)
    run_dir = tmp_path / "run"
    process = start_engine(config, run_dir)
    try:
        time.sleep(delay)
        if how == "control":
            run_dir.mkdir(exist_ok=True)  # the engine may not have created it yet: `echo stop >>` needs it
            send_command(run_dir, "stop")
        else:
            process.send_signal(signal.SIGTERM)
        done = assert_stopped_cleanly(process, run_dir)
    finally:
        if process.poll() is None:
            process.kill()
    expected = "stop command" if how == "control" else "SIGTERM"
    assert done.get("reason", expected) == expected


@pytest.mark.slow
def test_an_earlier_runs_control_file_is_not_replayed(tiny_models, tmp_path):
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", training={"max_train_steps": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    send_command(run_dir, "stop")  # left by an earlier run, or written before this one was started
    result = run_engine("train", str(config), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    done = events_of(run_dir)[-1]
    assert done["type"] == "done" and done["ok"] and not done["stopped"] and done["global_step"] == 2


@pytest.mark.slow
def test_gui_runs_take_stops_from_their_launch_not_before(tiny_models, tmp_path):
    """The GUI notes the control file's end when it starts the process: a stop pressed at once counts even before
    the engine is running; a stop line older than the launch does not."""
    manager = RunManager(tmp_path / "runs", env=engine_env())
    config_path = write_config(tmp_path / "config.toml", tiny_models, "sd1", **LONG_RUN)
    from engine.config.io import load_config

    stopped = manager.create_run(load_config(config_path), "stopped-at-once", base_dir=tmp_path)
    manager.start(stopped)
    manager.stop(stopped)  # right after the launch, long before the engine has imported torch

    finished = manager.create_run(load_config(config_path, ["training.max_train_steps=2"]), "old-stop",
                                  base_dir=tmp_path)
    send_command(finished.run_dir, "stop")  # before the launch: not this run's
    manager.start(finished)

    for handle in (stopped, finished):
        deadline = time.monotonic() + 600
        while manager.status(handle, log_lines=0).state in ("created", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
    assert manager.status(stopped, log_lines=0).state == "stopped"
    done = events_of(stopped.run_dir)[-1]
    assert done["type"] == "done" and done["ok"] and done["stopped"]
    done = events_of(finished.run_dir)[-1]
    assert done["type"] == "done" and done["ok"] and not done["stopped"] and done["global_step"] == 2
    assert control_path(finished.run_dir).read_text() == "stop\n"


@pytest.mark.parametrize("target", ["while scanning the dataset", "while loading the model", "while caching"])
def test_a_stop_during_each_phase_ends_the_build_at_its_boundary(tiny_models, tmp_path, target):
    """A `stop` written while the session is being built (here: during `target`) ends it at that phase's
    boundary, through the run's own check, before anything trainable exists."""
    from engine.config.io import load_config
    from engine.rundir.control import ControlChannel, StoppedBeforeTraining
    from engine.train.build import build_session
    from engine.train.reporting import RunLog
    from engine.train.run import phase_check
    from engine.train.setup import make_accelerator

    config_path = write_config(tmp_path / "config.toml", tiny_models, "sd1")
    config = load_config(config_path, check_packages=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    channel = ControlChannel(run_dir)
    accelerator = make_accelerator(config, tmp_path)
    check = phase_check(channel, accelerator)
    seen = []

    def checkpoint(phase: str) -> None:
        seen.append(phase)
        if phase == target:
            send_command(run_dir, "stop")  # as if written while this phase ran
        check(phase)

    log = RunLog(run_dir)
    try:
        with pytest.raises(StoppedBeforeTraining) as stopped:
            build_session(config, tmp_path, run_dir, log, accelerator=accelerator, checkpoint=checkpoint)
    finally:
        log.close()
    phases = ["while scanning the dataset", "while loading the model", "while caching"]
    assert seen == phases[:phases.index(target) + 1]
    assert stopped.value.phase == target and stopped.value.reason == "stop command"
    assert not (tmp_path / "out").exists()  # stopped before the output folder was even made
