"""Issue 14, part LOGKEYS: optimizer and scheduler classes through `validate`, per-run log folders, the tracker
name and the CPU threads of a one-process run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli import main
from engine.config.io import validate_config
from engine.train.reporting import run_log_folder, tracker_name

REPO = Path(__file__).resolve().parents[2]


def _validate(tmp_path: Path, text: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    config = tmp_path / "run.toml"
    config.write_text(text, encoding="utf-8")
    code = main(["validate", str(config)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("key", "value"), [("optimizer_type", "os.system"),
                                            ("optimizer_type", "mypkg.optim.RMSprop"),
                                            ("lr_scheduler_type", "os.system"),
                                            ("lr_scheduler_type", "mypkg.sched.Cosine")])
def test_a_class_outside_the_allowed_packages_is_refused_with_exit_2(tmp_path, capsys, key: str, value: str):
    code, err = _validate(tmp_path, f'[optimizer]\n{key} = "{value}"\n', capsys)
    assert code == 2
    assert f"optimizer.{key}" in err and "not in an allowed package" in err
    assert value.split(".")[0] not in sys.modules or value.startswith("os.")


def test_bare_torch_names_validate_to_torchs_spelling():
    config = validate_config({"optimizer": {"optimizer_type": "rmsprop", "lr_scheduler_type": "steplr"}},
                             check_packages=False)
    assert config.optimizer.optimizer_type == "RMSprop"
    assert config.optimizer.lr_scheduler_type == "StepLR"


def test_an_unknown_scheduler_name_is_refused_listing_the_names(tmp_path, capsys):
    code, err = _validate(tmp_path, '[optimizer]\nlr_scheduler_type = "CosineLR"\n', capsys)
    assert code == 2
    assert "optimizer.lr_scheduler_type" in err and "CosineAnnealingLR" in err


def test_a_scheduler_class_with_a_warmup_is_refused_by_the_rules(tmp_path, capsys):
    code, err = _validate(tmp_path, '[optimizer]\nlr_scheduler_type = "StepLR"\nlr_warmup_steps = 10\n'
                          'lr_scheduler_args = {step_size = 5}\n', capsys)
    assert code == 2
    assert "optimizer.lr_warmup_steps" in err and "StepLR" in err


def test_runs_sharing_a_logging_dir_get_their_own_folders(tmp_path: Path):
    now = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    first = run_log_folder(tmp_path / "logs", "mylora-", reserve=True, now=now)
    second = run_log_folder(tmp_path / "logs", "mylora-", reserve=True, now=now)  # the same second
    assert first.name == "mylora-20260102030405"
    assert second.name == "mylora-20260102030405-2"
    assert first.is_dir() and second.is_dir()
    assert run_log_folder(tmp_path / "other", "", reserve=False, now=now).name == "20260102030405"
    assert not (tmp_path / "other").exists()


def test_the_tracker_name_is_log_tracker_name_or_sd_scripts_name_for_the_method():
    assert tracker_name("lora", "") == "network_train"
    assert tracker_name("dreambooth", "") == "dreambooth"
    assert tracker_name("finetune", "") == "finetuning"
    assert tracker_name("textual_inversion", "") == "textual_inversion"
    assert tracker_name("lora", "my_project") == "my_project"


def _threads_in_a_fresh_process(launch: dict, environment_threads: str | None) -> list[str]:
    """apply_cpu_threads' result, torch's thread count and OMP_NUM_THREADS in a fresh interpreter, as the engine's
    subprocess is (torch reads OMP_NUM_THREADS when it starts)."""
    code = ("import os, torch\n"
            "from engine.config.schema import RunConfig\n"
            "from engine.train.setup import apply_cpu_threads\n"
            f"config = RunConfig.model_validate({{'launch': {launch!r}}}, context={{'check_packages': False}})\n"
            "print(apply_cpu_threads(config.launch), torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'))\n")
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    if environment_threads is not None:
        env["OMP_NUM_THREADS"] = environment_threads
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            check=True, timeout=300)
    return result.stdout.split()


@pytest.mark.parametrize("threads", [1, 3])
def test_num_cpu_threads_per_process_applies_to_a_one_process_run(threads: int):
    assert _threads_in_a_fresh_process({"num_cpu_threads_per_process": threads}, "2") == [str(threads)] * 3


def test_unset_cpu_threads_keep_the_environments_choice():
    # Two test workers on two cores each run with OMP_NUM_THREADS=1; a default config must not raise it.
    assert _threads_in_a_fresh_process({}, "1") == ["1", "1", "1"]


def test_sd_scripts_args_bring_their_scheduler_class_and_tracker_name(tmp_path: Path):
    from engine.config.importers.registry import import_file

    args = tmp_path / "args.toml"
    args.write_text('pretrained_model_name_or_path = "/models/x.safetensors"\noutput_dir = "/out"\n'
                    'lr_scheduler_type = "CosineAnnealingLR"\nlr_scheduler_args = ["T_max=100"]\n'
                    'log_tracker_name = "my_project"\nlogging_dir = "/logs"\n', encoding="utf-8")
    result = import_file(args)
    assert result.overlay["optimizer"]["lr_scheduler_type"] == "CosineAnnealingLR"
    assert result.overlay["optimizer"]["lr_scheduler_args"] == {"T_max": 100}
    assert result.overlay["logging"]["log_tracker_name"] == "my_project"
    assert not [item.key for item in result.skipped if item.key in ("lr_scheduler_type", "log_tracker_name")]
