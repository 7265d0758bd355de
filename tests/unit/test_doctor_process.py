"""Start's doctor on a large dataset runs as `python -m engine doctor --json` and gives what the in-process doctor
gives: the same report, the same message, the same refusal. The threshold is lowered instead of making 200 images."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from engine.config.io import deep_merge, default_config_dict, validate_config
from gui import doctor_process, engine_json
from gui.doctor_process import count_images, doctor_report
from gui.runner import RunManager
from gui.train_start import prepare_run


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """The temporary folder is the home folder: the GUI's default roots (home and the runs folder) hold it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def project(tmp_path):
    """A legacy folder of four images, one corrupt (a warning: it is skipped) and one without its caption (a note:
    the folder name captions it), and a folder whose name lacks the repeats (an error)."""
    concept = tmp_path / "img" / "5_sks dog"
    concept.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (96, 64), (index * 40, 80, 120)).save(concept / f"{index}.png")
        if index:
            (concept / f"{index}.txt").write_text("sks dog", encoding="utf-8")
    png = (concept / "1.png").read_bytes()
    (concept / "broken.png").write_bytes(png[: len(png) // 2])  # the header reads, the pixels do not
    (concept / "broken.txt").write_text("sks dog", encoding="utf-8")
    (tmp_path / "img" / "sks cat").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "img" / "sks cat" / "a.png")
    (tmp_path / "model.safetensors").write_bytes(b"not loaded before the run starts")
    return tmp_path


def config_for(project) -> dict:
    overlay = {"model": {"pretrained_model_name_or_path": str(project / "model.safetensors")},
               "dataset": {"train_data_dir": "img"},  # relative: the doctor process must start from the GUI's base
               "training": {"max_train_epochs": 2}}
    return deep_merge(default_config_dict(), overlay)


@pytest.fixture
def engine_calls(monkeypatch):
    """The engine commands the doctor started, each still run for real."""
    calls = []
    real_run = subprocess.run

    def recording(argv, **kwargs):
        calls.append(list(argv))
        return real_run(argv, **kwargs)

    monkeypatch.setattr(engine_json.subprocess, "run", recording)
    return calls


def test_a_large_dataset_is_doctored_in_a_process_with_the_same_result(project, tmp_path, engine_calls):
    manager = RunManager(tmp_path / "runs")
    here = prepare_run(manager, config_for(project), base_dir=project)
    assert engine_calls == []  # five images: the doctor ran in this process
    there = prepare_run(manager, config_for(project), base_dir=project, large_dataset=4)
    assert len(engine_calls) == 1 and engine_calls[0][:4] == [sys.executable, "-m", "engine", "doctor"]
    assert "--json" in engine_calls[0] and engine_calls[0][engine_calls[0].index("--base-dir") + 1] == str(project)
    assert here.handle is None and there.handle is None  # the misnamed folder blocks both
    assert there.message == here.message and "sks cat" in there.message
    assert there.report == here.report
    found = {finding["code"]: finding["where"] for finding in there.report["findings"]}
    assert "caption-missing" in found and any(where.endswith("broken.png") for where in found.values()), found
    assert manager.discover() == []


def test_warnings_alone_start_the_run_either_way(project, tmp_path, engine_calls):
    (project / "img" / "sks cat" / "a.png").rename(project / "img" / "5_sks dog" / "cat.png")
    (project / "img" / "sks cat").rmdir()
    here = prepare_run(RunManager(tmp_path / "here"), config_for(project), base_dir=project)
    there = prepare_run(RunManager(tmp_path / "there"), config_for(project), base_dir=project, large_dataset=2)
    assert len(engine_calls) == 1
    assert here.handle is not None and there.handle is not None
    assert there.report == here.report and "broken.png" in there.message and "warning" in there.message

    def without_run(result):  # the runs differ in folder and name, made a second apart
        return result.message.replace(str(result.handle.run_dir), "RUN").replace(result.handle.name, "NAME")

    assert without_run(there) == without_run(here)


def test_counting_stops_past_the_threshold(project):
    config = validate_config(config_for(project))
    assert count_images(config, project, stop_above=100) == 5
    assert count_images(config, project, stop_above=1) == 2


def test_a_doctor_that_does_not_finish_is_stopped_with_a_clear_message(project, tmp_path):
    config = validate_config(config_for(project))
    with pytest.raises(doctor_process.DoctorFailed, match="did not finish within 0.01 s"):
        doctor_report(config, project, large=0, timeout=0.01)


def test_a_doctor_that_fails_is_refused_with_its_output(project, tmp_path, monkeypatch):
    broken = [sys.executable, "-c", "import sys; sys.exit('Traceback: the doctor broke')"]
    monkeypatch.setattr(engine_json, "engine_command", lambda args: broken)
    result = prepare_run(RunManager(tmp_path / "runs"), config_for(project), base_dir=project, large_dataset=0)
    assert result.handle is None
    assert result.message.startswith("**Not started:** the dataset doctor stopped (exit code 1) without a report")
    assert "the doctor broke" in result.message
