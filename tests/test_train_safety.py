"""No lost work and no code run at the edges of a training run, on the tiny models: a crafted state is refused,
weights that stopped being finite are never saved, a full disk ends the run with exit 2 and a named folder, and a
run cleans what killed runs left behind (restoring a state a crash left under its hidden name)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import events_of, run_engine, train_here, write_config

from engine.files import atomic_write_text

QUICK = {"training": {"max_train_steps": 2}, "saving": {"save_every_n_steps": 1, "save_state": True}}


def _hidden(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _error(run_dir: Path) -> dict:
    return next(event for event in events_of(run_dir) if event["type"] == "error")


def _set(key: str, value: str) -> list[str]:
    return ["--set", f"{key}={json.dumps(value)}"]


@pytest.fixture(scope="module")
def saved_states(tiny_models, tmp_path_factory) -> Path:
    """The output folder of a 2-step run that saved a state at every step (lora-step0000000N-state, lora-state)."""
    folder = tmp_path_factory.mktemp("states")
    return train_here(write_config(folder / "config.toml", tiny_models, **QUICK))


# --- a crafted state --------------------------------------------------------------------------------------------


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_crafted_optimizer_file_is_refused_and_never_runs(saved_states, tiny_models, tmp_path):
    state = shutil.copytree(saved_states / "lora-step00000001-state", tmp_path / "crafted-state")
    marker = tmp_path / "PWNED"
    torch.save({"state": {}, "param_groups": [], "extra": _RunsACommand(marker)}, state / "optimizer.pt")
    config = write_config(tmp_path / "config.toml", tiny_models, **QUICK)
    result = run_engine("train", str(config), *_set("saving.resume", str(state)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert not marker.exists(), "the crafted file's command ran"
    error = _error(tmp_path / "out")
    assert str(state / "optimizer.pt") in error["message"] and "not a state Atelier wrote" in error["message"]
    assert events_of(tmp_path / "out")[-1]["summary"] == "could not start"
    assert "Traceback" not in result.stdout + result.stderr


# --- non-finite weights -----------------------------------------------------------------------------------------


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in load_file(str(path)).values())


@pytest.mark.slow
def test_weights_too_large_for_the_file_stop_the_run_before_they_are_saved(tiny_models, tmp_path):
    """From step 4 the learning rate is 1e6: the weights leave fp16's range in that update (the loss only turns
    NaN at the step after). Saved as fp16 they would be infinities; the step-4 save refuses and names step 3."""
    config = write_config(tmp_path / "config.toml", tiny_models,
                          training={"max_train_steps": 8},
                          optimizer={"learning_rate": 1e-3, "lr_scheduler": "piecewise_constant",
                                     "lr_scheduler_args": {"step_rules": "1:3,1e9"}},
                          saving={"save_every_n_steps": 1, "save_state": True, "save_precision": "fp16"})
    result = run_engine("train", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    out = tmp_path / "out"
    error = _error(out)
    assert error["step"] == 4 and "non-finite" in error["message"], error
    assert error["last_checkpoint"] == str(out / "lora-step00000003.safetensors")
    assert str(out / "lora-step00000003.safetensors") in error["hint"] and "learning rate" in error["hint"]
    saved = sorted(out.glob("*.safetensors"))
    assert [path.name for path in saved] == [f"lora-step0000000{step}.safetensors" for step in (1, 2, 3)]
    assert all(_all_finite(path) for path in saved)
    assert sorted(path.name for path in out.glob("*-state")) == [f"lora-step0000000{step}-state" for step in (1, 2, 3)]
    assert events_of(out)[-1]["type"] == "done" and not events_of(out)[-1]["ok"]


def test_nan_weights_from_an_update_are_never_saved(tiny_models, tmp_path):
    """An update that leaves NaN in a trained LoRA module (as an infinite gradient does) right before a save."""
    from engine.config.io import load_config
    from engine.rundir.control import ControlChannel
    from engine.train.build import build_session
    from engine.train.reporting import RunLog
    from engine.train.trainer import Trainer

    config_path = write_config(tmp_path / "config.toml", tiny_models, training={"max_train_steps": 6},
                               saving={"save_every_n_steps": 1, "save_state": True})
    config = load_config(config_path, check_packages=False)
    run_dir = tmp_path / "out"
    log = RunLog(run_dir)
    try:
        session = build_session(config, config_path.parent, run_dir, log)
        lora = session.method.network.all_loras()[0]
        updates = iter(range(1, 100))

        def poison_after_third_update() -> None:
            if next(updates) == 3:
                with torch.no_grad():
                    lora.lora_up.weight[0, 0] = float("nan")

        session.method.after_update = poison_after_third_update
        outcome = Trainer(session, ControlChannel(run_dir)).run()
    finally:
        log.close()
    assert outcome.status == "failed"
    error = _error(run_dir)
    assert error["step"] == 3 and "non-finite" in error["message"] and lora.lora_name in error["message"]
    assert error["last_checkpoint"] == str(run_dir / "lora-step00000002.safetensors")
    saved = sorted(run_dir.glob("*.safetensors"))
    assert [path.name for path in saved] == ["lora-step00000001.safetensors", "lora-step00000002.safetensors"]
    assert all(_all_finite(path) for path in saved)
    assert not (run_dir / "lora-step00000003-state").exists()


# --- a full disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KiB tmpfs (root only): less than one LoRA checkpoint and its state need."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_a_full_disk_by_quota covers the other case")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # lazy: a failed test may hold files open


def _assert_full_disk_report(result: subprocess.CompletedProcess | None, run_dir: Path, disk: Path) -> None:
    if result is not None:
        assert result.returncode == 2, result.stdout + result.stderr
        console = result.stdout + result.stderr
        assert str(disk) in console and "Traceback" not in console, console
    error = _error(run_dir)
    assert error["where"] == str(disk) and str(disk) in error["message"], error
    assert "saving.output_dir" in error["hint"]
    done = events_of(run_dir)[-1]
    assert done["type"] == "done" and not done["ok"] and "disk is full" in done["summary"]
    assert _hidden(disk) == [], "a failed save left temporaries"


@pytest.mark.slow
@pytest.mark.parametrize("run_dir_on_the_disk", [False, True], ids=["run_dir_elsewhere", "run_dir_on_the_disk"])
def test_a_save_onto_a_full_disk_is_refused_before_writing(tiny_models, tmp_path, small_disk, run_dir_on_the_disk):
    config = write_config(tmp_path / "config.toml", tiny_models, **QUICK)
    run_dir = small_disk if run_dir_on_the_disk else tmp_path / "run"
    result = run_engine("train", str(config), *_set("saving.output_dir", str(small_disk)), "--run-dir", str(run_dir))
    _assert_full_disk_report(result, run_dir, small_disk)
    assert "needed" in _error(run_dir)["message"]


def _train_in_process(config: Path, run_dir: Path) -> int:
    from engine.config.io import load_config
    from engine.train.run import run_training

    return run_training(load_config(config, check_packages=False), config.parent, run_dir=run_dir)


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_save_leaves_no_temporaries(tiny_models, tmp_path, small_disk, monkeypatch):
    """The free-space check is told the disk is large, so the save really runs out of space half-way: the first
    checkpoint fits on the 200 KiB disk, its state (about 450 KiB) does not."""
    import shutil as shutil_module

    real_disk_usage = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage",
                        lambda path: real_disk_usage(path)._replace(free=1 << 40))
    config = write_config(tmp_path / "config.toml", tiny_models, training=QUICK["training"],
                          saving={**QUICK["saving"], "output_dir": str(small_disk)})
    assert _train_in_process(config, small_disk) == 2
    _assert_full_disk_report(None, small_disk, small_disk)
    assert "no space left" in _error(small_disk)["message"].lower()
    assert (small_disk / "lora-step00000001.safetensors").is_file()  # written before the disk filled up


def test_a_full_disk_by_quota(tiny_models, tmp_path, monkeypatch):
    """Without root: the free-space figure says 100 KiB are left, so the first save is refused."""
    if os.geteuid() == 0:
        pytest.skip("root mounts a real small disk (test_a_save_onto_a_full_disk_is_refused_before_writing)")
    import shutil as shutil_module

    real_disk_usage = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: real_disk_usage(path)._replace(free=100 << 10))
    config = write_config(tmp_path / "config.toml", tiny_models, **QUICK)
    out = tmp_path / "out"
    assert _train_in_process(config, tmp_path / "run") == 2
    _assert_full_disk_report(None, tmp_path / "run", out)
    assert not list(out.glob("*.safetensors"))


def test_the_failure_still_reaches_the_console_when_the_event_log_cannot_be_written(small_disk, capsys):
    from engine.train.reporting import RunLog
    from engine.train.run import EXIT_BAD_INPUT, report_failure

    log = RunLog(small_disk)
    with contextlib.suppress(OSError), open(small_disk / "filler", "wb") as filler:  # full once the run started
        while True:
            filler.write(b"\0" * 4096)
            filler.flush()
    assert report_failure(log, EXIT_BAD_INPUT, "stopped: the disk is full", message="the message",
                          hint="the hint") == EXIT_BAD_INPUT
    with contextlib.suppress(OSError):  # the lines it could not write are still in its buffer
        log.close()
    printed = capsys.readouterr()
    assert "error: the message" in printed.out + printed.err and "the hint" in printed.out + printed.err


# --- leftovers of killed runs -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_cleans_stale_temporaries_and_resumes_a_state_left_under_its_hidden_name(saved_states, tiny_models,
                                                                                        tmp_path):
    out = tmp_path / "out"
    shutil.copytree(saved_states, out)
    dead, alive = _dead_pid(), os.getpid()
    # A kill between the two renames of a state replacement: the state is only under its retired name.
    (out / "lora-state").rename(out / f".lora-state.old-{dead}")
    shutil.copytree(saved_states / "lora-state", out / f".lora-state.tmp-{dead}")
    atomic_write_text(out / f".lora.safetensors.tmp-{dead}-k1ll3d", "half a file")
    (out / f".lora-step00000003-state.tmp-{dead}").mkdir()
    kept = [f".lora.safetensors.tmp-{alive}-w0rk1n", f".other.safetensors.tmp-{dead}-n0tm1n"]
    for name in kept:
        atomic_write_text(out / name, "not this run's to remove")
    config = write_config(tmp_path / "config.toml", tiny_models, training={"max_train_steps": 4},
                          saving={"save_every_n_steps": 1, "save_state": True, "resume": str(out / "lora-state")})
    result = run_engine("train", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    events = events_of(out)
    start = next(event for event in reversed(events) if event["type"] == "start")
    assert start["resumed_from"] == str(out / "lora-state") and start["output_name"] == "lora"
    assert [event["step"] for event in events[events.index(start):] if event["type"] == "progress"] == [3, 4]
    assert _hidden(out) == sorted(kept)
    assert (out / "lora-state" / "train_state.json").is_file() and (out / "lora.safetensors").is_file()


def test_a_run_folder_it_cannot_write_to_is_named_without_a_traceback(tiny_models, tmp_path):
    """Start-up writes (the run's config copy) that fail end like a full disk mid-run: exit 2, the folder named."""
    config = write_config(tmp_path / "config.toml", tiny_models, **QUICK)
    run_dir = tmp_path / "run"
    (run_dir / "config.toml").mkdir(parents=True)  # where the run's config copy goes: it cannot be written
    result = run_engine("train", str(config), "--run-dir", str(run_dir))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    error = _error(run_dir)
    assert error["where"] == str(run_dir) and "cannot be written" in error["message"]
    assert events_of(run_dir)[-1]["summary"] == "could not start"
