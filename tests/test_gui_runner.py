"""The GUI's run manager against the real engine on the tiny SD1 model: start, watch, stop, resume, re-attach
after a GUI restart, the queue, a killed process, and output names that never collide."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from train_helpers import write_config

from engine.config.io import load_config
from gui.runner import RunManager
from gui.runs import RunHandle, RunStatus, read_record


@pytest.fixture
def make_config(tiny_models, tmp_path):
    def make(steps: int, **sections):
        path = write_config(tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}" / "config.toml", tiny_models, "sd1",
                            training={"max_train_steps": steps, "max_train_epochs": 0}, **sections)
        return load_config(path, check_packages=False)

    return make


def wait_for(manager: RunManager, handle: RunHandle, predicate, limit: float = 240) -> RunStatus:
    deadline = time.time() + limit
    seen = []
    while time.time() < deadline:
        status = manager.status(handle)
        seen.append(status.state)
        if predicate(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"waited in vain; states seen: {sorted(set(seen))}, last: {status}")


@pytest.mark.slow
def test_stop_resume_and_reattach_after_a_gui_restart(make_config, tmp_path):
    runs_dir = tmp_path / "runs"
    manager = RunManager(runs_dir)
    handle = manager.create_run(make_config(40, saving={"output_dir": "output"}), "resumable")
    assert manager.status(handle).state == "created"
    manager.start(handle)
    record = read_record(handle.run_dir)
    assert record["pgid"] == record["pid"] != os.getpgrp()  # its own process group: the GUI's end is not its end
    running = wait_for(manager, handle, lambda s: s.state == "running" and s.step >= 2)
    assert running.total_steps == 40 and running.loss is not None and running.log_tail
    manager.stop(handle)
    stopped = wait_for(manager, handle, lambda s: s.state != "running")
    assert stopped.state == "stopped" and stopped.step < 40 and Path(stopped.resume_state).is_dir()

    # A "GUI restart": a new manager knows the run only from its files.
    restarted = RunManager(runs_dir)
    [found] = restarted.discover()
    assert found.run_dir == handle.run_dir and restarted.status(found).state == "stopped"
    restarted.resume(found, stopped.resume_state)
    finished = wait_for(restarted, found, lambda s: s.state != "running")
    assert finished.state == "finished", finished
    assert finished.step == finished.total_steps == 40
    final = Path(found.output_dir) / f"{found.output_name}.safetensors"
    assert str(final) in {entry["path"] for entry in finished.checkpoints} and final.is_file()
    assert Path(found.output_dir) == handle.run_dir / "output"  # the default output folder lives in the run dir

    # Polling the events by offset gives each event once, in order, ending with the last `done`.
    first, offset = restarted.tail_events(found, 0)
    again, same_offset = restarted.tail_events(found, offset)
    assert again == [] and same_offset == offset == found.events_path.stat().st_size
    assert [e["type"] for e in first].count("done") == 2 and first[-1]["type"] == "done"
    assert RunManager(runs_dir).status(found).state == "finished"


@pytest.mark.slow
def test_a_failing_run_in_the_queue_is_marked_and_the_next_one_runs(make_config, tmp_path):
    runs_dir = tmp_path / "runs"
    manager = RunManager(runs_dir)
    bad = manager.create_run(make_config(4, model={"pretrained_model_name_or_path": str(tmp_path / "no-model")}),
                             "bad")
    good = manager.create_run(make_config(6), "good")
    manager.enqueue(bad)
    manager.enqueue(good)
    restarted = RunManager(runs_dir)  # the queue order survives a restart
    assert [h.run_dir for h in restarted.queue()] == [bad.run_dir, good.run_dir]
    assert restarted.status(good).state == "queued"
    assert restarted.advance_queue().run_dir == bad.run_dir
    assert restarted.advance_queue() is None  # one run at a time
    failed = wait_for(restarted, bad, lambda s: s.state != "running")
    assert failed.state == "failed" and "no-model" in failed.error, failed
    # The GUI's timer: the next run starts once the failed one's process is gone.
    deadline = time.time() + 60
    while (started := restarted.advance_queue()) is None and time.time() < deadline:
        time.sleep(0.2)
    assert started.run_dir == good.run_dir and restarted.queue() == []
    assert restarted.status(bad).returncode == 2  # "input to fix"
    finished = wait_for(restarted, good, lambda s: s.state != "running")
    assert finished.state == "finished" and finished.step == 6
    states = {h.run_dir: RunManager(runs_dir).status(h).state for h in RunManager(runs_dir).discover()}
    assert states == {bad.run_dir: "failed", good.run_dir: "finished"}


@pytest.mark.slow
def test_a_killed_process_shows_as_lost(make_config, tmp_path):
    manager = RunManager(tmp_path / "runs")
    handle = manager.create_run(make_config(100000), "doomed")
    manager.start(handle)
    wait_for(manager, handle, lambda s: s.state == "running" and s.step >= 1)
    os.killpg(read_record(handle.run_dir)["pgid"], signal.SIGKILL)
    lost = wait_for(manager, handle, lambda s: s.state != "running", limit=30)
    assert lost.state == "lost" and lost.error
    assert RunManager(tmp_path / "runs").status(handle).state == "lost"  # also without the exit code


def test_runs_sharing_an_output_folder_get_different_output_names(make_config, tmp_path):
    manager = RunManager(tmp_path / "runs")
    config = make_config(4)  # output_dir tmp_path/cfg0/out, output_name "lora"
    first = manager.create_run(config, "a")
    second = manager.create_run(config, "a")
    assert first.run_dir != second.run_dir and first.output_dir == second.output_dir
    assert first.output_name == "lora" and first.notes == ()
    assert second.output_name == "lora-2" and "lora-2" in second.notes[0]
    assert load_config(second.config_path, check_packages=False).saving.output_name == "lora-2"
    # Files already in the folder count too, not only other runs.
    (Path(config.saving.output_dir) / "lora-3.safetensors").parent.mkdir(parents=True, exist_ok=True)
    (Path(config.saving.output_dir) / "lora-3.safetensors").write_bytes(b"")
    assert manager.create_run(config).output_name == "lora-4"
