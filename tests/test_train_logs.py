"""Issue 14, LOGKEYS end to end on the tiny SD1 model: each run logs into its own TensorBoard folder under the shared
logging_dir (sd-scripts' <log_prefix><date-time>/<tracker name>), a torch.optim class trains by its bare name with a
scheduler class, and a one-process run uses launch.num_cpu_threads_per_process threads."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import events_of, run_engine, write_config

pytestmark = pytest.mark.slow


def _train(folder: Path, tiny_models: dict[str, Path], logs: Path, threads: int) -> dict:
    config = write_config(
        folder / "config.toml", tiny_models, "sd1",
        training={"max_train_steps": 2},
        optimizer={"optimizer_type": "RMSprop", "learning_rate": 1e-3, "lr_scheduler_type": "StepLR",
                   "lr_scheduler_args": {"step_size": 1, "gamma": 0.5}},
        logging={"logging_dir": str(logs), "log_prefix": "tiny-", "log_tracker_name": "my_tracker"},
        launch={"num_cpu_threads_per_process": threads},
        saving={"output_dir": str(folder / "out")},
    )
    result = run_engine("train", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    return next(event for event in events_of(folder / "out") if event["type"] == "start")


def test_two_runs_with_one_logging_dir_write_two_folders(tiny_models, tmp_path: Path):
    logs = tmp_path / "logs"
    starts = [_train(tmp_path / f"run{index}", tiny_models, logs, threads) for index, threads in ((1, 1), (2, 3))]
    folders = sorted(path for path in logs.iterdir() if path.is_dir())
    assert len(folders) == 2, folders
    assert all(folder.name.startswith("tiny-20") for folder in folders)
    assert sorted(start["config"]["log_dir"] for start in starts) == [str(folder) for folder in folders]
    for folder in folders:  # TensorBoard's event file, under the tracker's project name
        assert list((folder / "my_tracker").glob("events.out.tfevents.*")), list(folder.rglob("*"))
    assert [start["config"]["cpu_threads"] for start in starts] == [1, 3]
    assert all(start["config"]["optimizer"] == "RMSprop" for start in starts)
