"""Driving a live run: save/sample/stop through the control file, a separate run directory, TensorBoard logs,
and several processes through `accelerate launch`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, engine_env, events_of, train_here, write_config

from engine.config.io import load_config
from engine.rundir.control import send_command
from engine.rundir.launch import launch_command

pytestmark = pytest.mark.slow


def _wait_for(run_dir: Path, predicate, process: subprocess.Popen, limit: float = 300) -> dict:
    deadline = time.time() + limit
    while time.time() < deadline:
        events = events_of(run_dir) if (run_dir / "events.jsonl").exists() else []
        found = [event for event in events if predicate(event)]
        if found:
            return found[-1]
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the awaited event never came")


def test_save_sample_and_stop_through_the_control_file(tiny_models, tmp_path):
    config = write_config(
        tmp_path / "config.toml", tiny_models, "sd1",
        training={"max_train_steps": 100000, "max_train_epochs": 0},
        sampling={"sample_prompts": ["sks dog --w 64 --h 64 --s 2 --d 3"]},
        logging={"logging_dir": "logs"},  # relative: beside the config file, wherever the engine runs from
    )
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "engine", "train", str(config), "--run-dir", str(run_dir)],
                               cwd=REPO, env=engine_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        _wait_for(run_dir, lambda e: e["type"] == "progress" and e["step"] >= 2, process)
        send_command(run_dir, "save")
        saved = _wait_for(run_dir, lambda e: e["type"] == "checkpoint" and e["kind"] == "step", process)
        send_command(run_dir, "sample")
        sample = _wait_for(run_dir, lambda e: e["type"] == "sample", process)
        send_command(run_dir, "stop")
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert Path(saved["path"]).is_file() and Path(saved["path"]).parent == tmp_path / "out"
    assert Path(sample["images"][0]["path"]).is_file()
    done = events_of(run_dir)[-1]
    assert done["type"] == "done" and done["stopped"] and Path(done["state"]).is_dir()
    assert (run_dir / "config.toml").is_file() and (run_dir / "train.log").is_file()
    # The run's config copy has absolute paths, so it runs from anywhere.
    copied = load_config(run_dir / "config.toml")
    assert Path(copied.model.pretrained_model_name_or_path).is_absolute()
    logs = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert logs, "no TensorBoard log was written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logs[0].parent), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    assert "loss/current" in accumulator.Tags()["scalars"] and accumulator.Tags()["images"]


def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tiny_models, tmp_path):
    """Data parallelism through `accelerate launch` (two CPU processes, gloo) is the same training as one process
    with the doubled batch: same images per step, same noise per image, gradients averaged."""
    sections = {"training": {"max_train_steps": 4}, "dataset": {"general": {"flip_aug": True}}}
    single = write_config(tmp_path / "single" / "config.toml", tiny_models, "sd1",
                          **{**sections, "dataset": {"general": {"flip_aug": True, "batch_size": 2}}})
    train_here(single)  # the one process needs no process of its own

    pair = write_config(tmp_path / "pair" / "config.toml", tiny_models, "sd1",
                        **{**sections, "dataset": {"general": {"flip_aug": True, "batch_size": 1}}},
                        launch={"num_processes": 2, "multi_gpu": True, "main_process_port": 29517})
    argv = launch_command(load_config(pair), pair)
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    result = subprocess.run(argv, cwd=REPO, env=engine_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    events = events_of(tmp_path / "pair" / "out")
    start = next(event for event in events if event["type"] == "start")
    assert start["config"]["processes"] == 2
    # Only the main process reports and saves: one progress event per step, one final file.
    assert [event["step"] for event in events if event["type"] == "progress"] == [1, 2, 3, 4]
    assert sorted(path.name for path in (tmp_path / "pair" / "out").glob("*.safetensors")) == ["lora.safetensors"]

    expected = load_file(str(tmp_path / "single" / "out" / "lora.safetensors"))
    actual = load_file(str(tmp_path / "pair" / "out" / "lora.safetensors"))
    assert expected.keys() == actual.keys()
    changed = 0
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
        changed += key.endswith("lora_up.weight") and bool(actual[key].abs().max() > 0)
    assert changed, "nothing was trained"
