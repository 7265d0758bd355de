"""The Train tab's decisions as plain functions (issue 14): what Start does while a run is going, the queue's order
and removal, which output name a typed run name becomes and why, which texts belong to which run, the samples'
captions and the doctor's warnings a queued run shows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from engine.config.io import deep_merge, default_config_dict, load_config
from engine.rundir.layout import EVENTS_FILE
from gui.run_reader import RunReader, sample_label
from gui.runner import RunManager
from gui.runs import RunStatus, process_start_ticks, update_record, write_record
from gui.train_start import output_name_for, start_choice, start_run
from gui.views import train as view


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """The temporary folder is the home folder: the GUI's default roots (home and the runs folder) hold it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def project(tmp_path):
    """Three 96x64 images: at resolution 512 with upscaling allowed, the doctor warns that they are small."""
    concept = tmp_path / "img" / "5_sks dog"
    concept.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (96, 64), (index * 40, 80, 120)).save(concept / f"{index}.png")
        (concept / f"{index}.txt").write_text("sks dog", encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"not loaded before the run starts")
    return tmp_path


def config_for(project: Path) -> dict:
    overlay = {"model": {"pretrained_model_name_or_path": str(project / "model.safetensors")},
               "dataset": {"train_data_dir": str(project / "img"), "general": {"bucket_no_upscale": False}},
               "training": {"max_train_epochs": 1}}
    return deep_merge(default_config_dict(), overlay)


def pretend_running(manager: RunManager, name: str) -> Path:
    """A run folder whose recorded process is alive: this test process (a real process, so record_alive holds)."""
    run_dir = manager.runs_dir / name
    run_dir.mkdir(parents=True)
    write_record(run_dir, {"created_at": 1.0, "status": "started", "pid": os.getpid(),
                           "proc_start": process_start_ticks(os.getpid())})
    return run_dir


# --- Start while a run is going --------------------------------------------------------------------------------


def test_start_asks_while_a_run_is_going_and_starts_both_only_when_told():
    assert start_choice([], "start") == "start"
    assert start_choice(["20260101-alpha"], "start") == "ask"
    assert start_choice(["20260101-alpha"], "both") == "start"
    assert start_choice(["20260101-alpha"], "queue") == "queue"
    assert start_choice([], "queue") == "queue"


def test_a_run_started_while_another_runs_waits_in_the_queue(project, tmp_path):
    manager = RunManager(tmp_path / "runs")
    busy = pretend_running(manager, "busy")
    result = start_run(manager, config_for(project), name="second", base_dir=project)
    assert result.handle is not None
    assert [handle.name for handle in manager.queue()] == [result.handle.name]
    assert "`busy` started meanwhile" in result.message and "Queued (position 1)" in result.message
    assert manager.advance_queue() is None  # still busy: the queue waits
    update_record(busy, returncode=0)  # the busy run has ended
    assert [handle.run_dir for handle in manager.running()] == []


def test_the_queue_keeps_its_order_and_a_removed_run_is_gone(project, tmp_path):
    manager = RunManager(tmp_path / "runs")
    pretend_running(manager, "busy")
    names = [start_run(manager, config_for(project), name=name, queue=True, base_dir=project).handle.name
             for name in ("one", "two", "three")]
    assert view.queue_choices(manager.queue()) == names
    middle = manager.queue()[1]
    assert manager.dequeue(middle) and not middle.run_dir.exists()
    assert view.queue_choices(manager.queue()) == [names[0], names[2]]
    assert not manager.dequeue(middle)  # not queued any more


# --- the run name is the output name ---------------------------------------------------------------------------


def test_the_typed_name_is_the_output_name_or_says_why_not():
    assert output_name_for("", "last") == ("last", "")
    assert output_name_for("  alpha ", "last") == ("alpha", "")
    assert output_name_for("my dog v2", "last") == ("my dog v2", "")
    name, why = output_name_for("dogs/v2", "last")
    assert name == "dogs-v2" and "'dogs/v2' became 'dogs-v2'" in why and "cannot hold" in why
    name, why = output_name_for("alpha.safetensors", "last")
    assert name == "alpha" and ".safetensors is left out" in why
    name, why = output_name_for("alpha.safetensors.pt", "last")  # every model extension goes, not only the last
    assert name == "alpha" and ".pt is left out" in why and ".safetensors is left out" in why
    name, why = output_name_for("///", "last")
    assert name == "last" and "keeps 'last'" in why


def test_a_started_run_saves_under_the_typed_name_and_the_message_says_so(project, tmp_path):
    manager = RunManager(tmp_path / "runs")
    first = start_run(manager, config_for(project), name="alpha", queue=True, base_dir=project)
    saving = load_config(first.handle.config_path, check_packages=False).saving
    assert saving.output_name == first.handle.output_name == "alpha"
    assert "saves its model as `alpha`" in first.message

    renamed = start_run(manager, config_for(project), name="dogs/v2", queue=True, base_dir=project)
    assert renamed.handle.output_name == "dogs-v2"
    assert "'dogs/v2' became 'dogs-v2'" in renamed.message


def test_a_name_that_files_already_use_gets_a_suffix_and_the_reason(project, tmp_path):
    manager = RunManager(tmp_path / "runs")
    output = project / "shared-output"
    output.mkdir()
    (output / "alpha.safetensors").write_bytes(b"someone's model")
    config = deep_merge(config_for(project), {"saving": {"output_dir": str(output)}})
    result = start_run(manager, config, name="alpha", queue=True, base_dir=project)
    assert result.handle.output_name == "alpha-2"
    assert "saves its model as `alpha-2`" in result.message and "nothing is overwritten" in result.message


# --- texts that belong to a run --------------------------------------------------------------------------------


def test_texts_about_another_run_are_stale():
    owners = {"message": "run-a", "tensorboard": "run-a"}
    assert view.stale_texts(owners, "run-b") == ["message", "tensorboard"]
    assert view.stale_texts(owners, "run-a") == []
    assert view.stale_texts({"message": None, "tensorboard": "run-a"}, "run-b") == ["tensorboard"]


def test_speed_and_time_left_show_only_while_running():
    base = {"step": 137, "total_steps": 1000, "epoch": 3, "num_epochs": 20, "it_per_s": 0.84, "eta_s": 1000.0}
    assert "0.84 it/s" in view.status_markdown("a", RunStatus(state="running", **base))
    for state in ("stopped", "finished", "failed", "lost", "queued"):
        line = view.status_markdown("a", RunStatus(state=state, **base))
        assert "it/s" not in line and "ETA" not in line and "step 137/1000" in line


def test_the_resume_hint_only_for_runs_that_can_resume():
    checkpoints = [{"kind": "state", "path": "/out/last-state", "step": 10}]
    finished = RunStatus(state="finished", resume_state="/out/last-state", checkpoints=checkpoints)
    stopped = RunStatus(state="stopped", resume_state="/out/last-state", checkpoints=checkpoints)
    assert "Resume continues" not in view.checkpoints_markdown(finished)
    assert "Resume continues from `/out/last-state`" in view.checkpoints_markdown(stopped)


# --- samples and warnings --------------------------------------------------------------------------------------


def test_samples_carry_their_step_and_prompt(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    write_record(run_dir, {"created_at": 1.0})
    images = [{"path": str(run_dir / "a.png"), "prompt": "sks dog, red square"},
              {"path": str(run_dir / "b.png"), "prompt": "a  cat\nin snow " + "x" * 100}]
    (run_dir / EVENTS_FILE).write_text(json.dumps({"type": "sample", "step": 40, "images": images}) + "\n",
                                       encoding="utf-8")
    items = view.gallery_items(RunReader(run_dir).status())
    assert items[0] == (str(run_dir / "a.png"), "step 40 · sks dog, red square")
    assert items[1][1].startswith("step 40 · a cat in snow x") and items[1][1].endswith("…")
    assert sample_label(0, "") == "step 0"


def test_the_gallery_shows_the_newest_samples_of_a_long_run(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    write_record(run_dir, {"created_at": 1.0})
    sample_dir = run_dir / "sample"
    events = [{"type": "sample", "step": step, "images": [{"path": str(sample_dir / f"s{step}.png"), "prompt": "p"}]}
              for step in range(1, view.GALLERY_LIMIT + 13)]
    (run_dir / EVENTS_FILE).write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    status = RunReader(run_dir).status()
    items = view.gallery_items(status)
    assert len(items) == view.GALLERY_LIMIT
    assert items[0] == (str(sample_dir / "s13.png"), "step 13 · p")
    assert items[-1][0] == str(sample_dir / f"s{view.GALLERY_LIMIT + 12}.png")
    label = view.gallery_label(status)
    assert f"newest {view.GALLERY_LIMIT} of {view.GALLERY_LIMIT + 12}" in label and str(sample_dir) in label
    few = RunStatus(state="running", samples=[str(sample_dir / "a.png")], sample_labels=["step 1 · p"])
    assert view.gallery_label(few) == "Samples" and len(view.gallery_items(few)) == 1


def test_a_queued_run_shows_the_doctors_warnings(project, tmp_path):
    manager = RunManager(tmp_path / "runs")
    config = deep_merge(config_for(project), {"dataset": {"general": {"resolution": [512, 512]}}})
    result = start_run(manager, config, name="warned", queue=True, base_dir=project)
    assert "1 warning(s) worth a look" in result.message and "smaller than 512x512" in result.message
    [queued] = manager.queue()
    assert len(queued.warnings) == 1
    text = view.queue_markdown(manager.queue())
    assert "the doctor's 1 warning(s)" in text and "smaller than 512x512" in text and "5_sks dog" in text
