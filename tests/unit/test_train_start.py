"""Start from the Parameters tab's config: the doctor refuses bad datasets with their files named, a missing
model file is caught before a run directory exists, and good configs become runs (started or queued)."""

from __future__ import annotations

import pytest
from PIL import Image

from engine.config.io import deep_merge, default_config_dict
from gui.runner import RunManager
from gui.train_start import missing_model_file, prepare_run, refusal_markdown, start_run
from gui.views.train import queue_markdown


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """The temporary folder is the home folder: the GUI's default roots (home and the runs folder) hold it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def project(tmp_path):
    concept = tmp_path / "img" / "5_sks dog"
    concept.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (96, 64), (index * 40, 80, 120)).save(concept / f"{index}.png")
        (concept / f"{index}.txt").write_text("sks dog", encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"not loaded before the run starts")
    return tmp_path


def config_for(project, **dataset) -> dict:
    overlay = {"model": {"pretrained_model_name_or_path": str(project / "model.safetensors")},
               "dataset": {"train_data_dir": str(project / "img"), **dataset},
               "training": {"max_train_epochs": 2}}
    return deep_merge(default_config_dict(), overlay)


def test_a_missing_dataset_folder_is_refused_with_the_doctor_error(project, tmp_path):
    manager = RunManager(tmp_path / "runs")
    result = prepare_run(manager, config_for(project, train_data_dir=str(project / "imgs")), base_dir=project)
    assert result.handle is None
    assert "Not started" in result.message and str(project / "imgs") in result.message
    assert manager.discover() == []  # nothing was created


def test_a_wrong_folder_name_is_named_with_what_to_do(project, tmp_path):
    (project / "img" / "sks cat").mkdir()
    Image.new("RGB", (64, 64)).save(project / "img" / "sks cat" / "a.png")
    result = prepare_run(RunManager(tmp_path / "runs"), config_for(project), base_dir=project)
    assert result.handle is None
    assert "sks cat" in result.message
    assert result.report is not None and not result.report["ok"]


def test_invalid_settings_name_the_field(project, tmp_path):
    config = config_for(project)
    config["network"]["network_alpha"] = 1000
    result = prepare_run(RunManager(tmp_path / "runs"), config, base_dir=project)
    assert result.handle is None and "network.network_alpha" in result.message


def test_a_missing_model_file_is_caught_before_any_run_exists(project, tmp_path):
    config = config_for(project)
    config["model"]["pretrained_model_name_or_path"] = str(project / "nope.safetensors")
    manager = RunManager(tmp_path / "runs")
    result = prepare_run(manager, config, base_dir=project)
    assert result.handle is None and "nope.safetensors" in result.message
    assert manager.discover() == []
    assert missing_model_file("stabilityai/stable-diffusion-xl-base-1.0", project) == ""  # a hub id: checked later
    assert "no base model" in missing_model_file("", project)


def test_an_invalid_form_is_refused():
    result = prepare_run(None, None)  # the Parameters tab holds None while it shows problems
    assert result.handle is None and "Parameters tab" in result.message


def test_a_good_config_becomes_a_queued_run_with_the_steps_counted(project, tmp_path):
    manager = RunManager(tmp_path / "runs")
    first = start_run(manager, config_for(project), name="first", queue=True, base_dir=project)
    second = start_run(manager, config_for(project), name="second", queue=True, base_dir=project)
    assert first.handle is not None and second.handle is not None
    assert [handle.name for handle in manager.queue()] == [first.handle.name, second.handle.name]
    # 3 images x 5 repeats, batch 1 -> 15 steps per epoch, 2 epochs
    assert "(30 steps)" in first.message and "position 2" in second.message
    assert first.handle.output_dir == str(first.handle.run_dir / "output")  # each run writes into its own folder
    text = queue_markdown(manager.queue())
    assert text.index(first.handle.name) < text.index(second.handle.name)
    assert (first.handle.run_dir / "config.toml").read_text().count(str(first.handle.run_dir / "logs")) == 1


def test_refusal_lists_at_most_a_dozen_errors_and_counts_the_rest():
    findings = [{"severity": "error", "where": f"f{i}.png", "message": "unreadable", "hint": "re-save it"}
                for i in range(15)]
    text = refusal_markdown({"findings": findings + [{"severity": "warning", "where": "", "message": "w"}]})
    assert "15 error(s)" in text and "f11.png" in text and "f12.png" not in text and "3 more" in text
