"""`python -m engine compare` on a tiny trained SD1 LoRA run: its cells are the run's own samples and the base
model's pictures, its grid holds them under labelled heads, its index lists them, bad input is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import engine_here, events_of, write_config

from engine.cli import main
from engine.cli.common import EXIT_BAD_INPUT
from engine.compare.grid import GridPrompt, _font, _layout, grid_rows
from engine.compare.plan import Checkpoint
from engine.rundir.event_reader import read_events

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PROMPT = "sks dog, red square --w 64 --h 64 --s 2 --d 5"


@pytest.fixture(scope="module")
def trained_run(tiny_models, tmp_path_factory) -> Path:
    """A 2-epoch LoRA run saving and sampling after each epoch (its samples use seed 5); returns its run folder."""
    folder = tmp_path_factory.mktemp("compare_run")
    config = write_config(folder / "config.toml", tiny_models, "sd1",
                          training={"max_train_steps": 0, "max_train_epochs": 2},
                          saving={"save_every_n_epochs": 1},
                          sampling={"sample_every_n_epochs": 1, "sample_prompts": [PROMPT],
                                    "sample_sampler": "euler"})
    assert engine_here("train", str(config), "--run-dir", str(folder / "run")) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def compared(trained_run, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The default comparison of the run (its epochs, its sample prompt) at strengths 0, 0.5 and 1."""
    out = tmp_path_factory.mktemp("grid") / "out"
    events = out.parent / "events.jsonl"
    assert engine_here("compare", str(trained_run), "--strengths", "0,0.5,1", "--out", str(out),
                       "--events", str(events)) == 0
    return out, read_events(events)


def pixels(path: Path | str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def samples_by_epoch(run_dir: Path) -> dict[int, str]:
    return {event["epoch"]: event["images"][0]["path"] for event in events_of(run_dir) if event["type"] == "sample"}


def test_the_index_lists_every_cell_with_its_settings(trained_run, compared):
    out, _ = compared
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    saved = [event["path"] for event in events_of(trained_run) if event["type"] == "checkpoint"]
    assert [entry["path"] for entry in index["checkpoints"]] == saved  # every epoch and the final model, in order
    assert [entry["label"] for entry in index["checkpoints"]] == ["lora-000001", "lora"]
    assert index["strengths"] == [0, 0.5, 1]
    assert len(index["cells"]) == 2 * 3  # checkpoints x strengths x 1 prompt x 1 seed
    cell = index["cells"][-1]
    assert {key: cell[key] for key in ("prompt", "width", "height", "steps", "sampler", "seed", "strength",
                                       "row", "column")} == \
        {"prompt": "sks dog, red square", "width": 64, "height": 64, "steps": 2, "sampler": "euler", "seed": 5,
         "strength": 1, "row": 2, "column": 1}
    assert all(Path(entry["file"]).is_file() for entry in index["cells"])
    assert index["prompts"][0]["grid"] == str(out / "grid_p01.png")


def test_strength_one_cells_equal_the_samples_the_run_drew_with_those_checkpoints(trained_run, compared):
    out, _ = compared
    samples = samples_by_epoch(trained_run)
    cells = {cell["checkpoint_label"]: cell["file"] for cell in
             json.loads((out / "index.json").read_text(encoding="utf-8"))["cells"] if cell["strength"] == 1}
    assert np.array_equal(pixels(cells["lora-000001"]), pixels(samples[1]))
    assert np.array_equal(pixels(cells["lora"]), pixels(samples[2]))
    assert not np.array_equal(pixels(cells["lora-000001"]), pixels(cells["lora"]))


def test_strength_zero_is_the_base_model_in_every_column(tiny_models, compared):
    import torch

    from engine.class_images import sampler_parts
    from engine.models.loading import load_model
    from engine.train.sampling import SampleRequest, generate_samples

    out, _ = compared
    cells = json.loads((out / "index.json").read_text(encoding="utf-8"))["cells"]
    base_cells = [cell for cell in cells if cell["strength"] == 0]
    assert [cell["column"] for cell in base_cells] == [0, 1] and len({cell["file"] for cell in base_cells}) == 1
    request = SampleRequest("sks dog, red square", "", 64, 64, 5, 2, 7.5, "euler")
    base = generate_samples(sampler_parts(load_model(tiny_models["sd1"])), [request], out.parent / "base", stem="b",
                            clip_skip=1, max_token_length=75, device="cpu", dtype=torch.float32)[0]
    assert np.array_equal(pixels(base_cells[0]["file"]), pixels(base.path))
    half = next(cell["file"] for cell in cells if cell["strength"] == 0.5 and cell["column"] == 1)
    full = next(cell["file"] for cell in cells if cell["strength"] == 1 and cell["column"] == 1)
    assert len({pixels(path).tobytes() for path in (base.path, half, full)}) == 3  # the strength changes the image


def test_the_grid_holds_each_cell_under_its_heads(compared):
    out, _ = compared
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    grid = pixels(out / "grid_p01.png")
    checkpoints = [Checkpoint(Path(entry["path"])) for entry in index["checkpoints"]]
    prompt = index["prompts"][0]
    settings = GridPrompt(0, prompt["prompt"], prompt["negative_prompt"], 64, 64, 2, prompt["scale"], "euler",
                          prompt["guidance"])
    layout = _layout(_font(), settings, checkpoints, grid_rows([0, 0.5, 1], [5]))
    for cell in index["cells"]:
        x, y = layout.cell_origin(cell["row"], cell["column"], 64)
        assert np.array_equal(grid[y:y + 64, x:x + 64], pixels(cell["file"])), cell["file"]
    assert grid.shape[0] == layout.top + 3 * layout.row


def test_progress_events_name_the_cells_each_file_fills(compared):
    out, events = compared
    progress = [event for event in events if event["type"] == "progress"]
    assert events[0]["type"] == "start" and events[0]["total"] == 6 and events[-1]["type"] == "done"
    assert [event["done"] for event in progress] == [2, 3, 4, 5, 6]  # the base model's picture fills 2 cells
    assert len(progress[0]["cells"]) == 2 and progress[0]["cells"][0]["strength"] == 0
    assert events[-1]["ok"] is True and events[-1]["grids"] == [str(out / "grid_p01.png")]


def test_chosen_checkpoints_prompts_and_seeds(trained_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na cat --w 64 --h 64 --s 1\na red car --w 64 --h 64 --s 1 --ss ddim\n",
                       encoding="utf-8")
    checkpoint = next(event["path"] for event in events_of(trained_run) if event["type"] == "checkpoint")
    out = tmp_path / "out"
    assert engine_here("compare", str(trained_run), "--checkpoints", checkpoint, "--prompts", str(prompts),
                       "--strengths", "1", "--seeds", "3,4", "--out", str(out)) == 0
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert [(cell["prompt"], cell["seed"], cell["sampler"]) for cell in index["cells"]] == [
        ("a cat", 3, "euler"), ("a cat", 4, "euler"), ("a red car", 3, "ddim"), ("a red car", 4, "ddim")]
    assert sorted(path.name for path in out.glob("grid_*.png")) == ["grid_p01.png", "grid_p02.png"]
    assert not np.array_equal(pixels(index["cells"][0]["file"]), pixels(index["cells"][1]["file"]))


def test_validation_losses_from_the_run_mark_the_best_column(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    saved = [event for event in events_of(run) if event["type"] == "checkpoint"]
    with (run / "events.jsonl").open("a", encoding="utf-8") as stream:
        for event, loss in zip(saved, (0.25, 0.5), strict=True):
            stream.write(json.dumps({"type": "validation", "time": 0, "step": event["step"], "epoch": event["epoch"],
                                     "loss": loss, "checkpoint": event["path"]}) + "\n")
    from engine.compare.grid import column_head
    from engine.compare.plan import list_checkpoints, resolve_source

    listed = list_checkpoints(resolve_source(run))
    assert [(c.label, c.validation_loss, c.best) for c in listed] == [("lora-000001", 0.25, True),
                                                                     ("lora", 0.5, False)]
    assert [column_head(c) for c in listed] == [["lora-000001", "val loss 0.25", "best"], ["lora", "val loss 0.5"]]


def test_a_checkpoint_of_another_network_exits_2_naming_it(tiny_models, trained_run, tmp_path):
    from train_helpers import make_locon_file

    locon = make_locon_file(tiny_models["sd1"], tmp_path / "locon.safetensors", {})  # conv layers: not this run's
    events = tmp_path / "events.jsonl"
    code = main(["compare", str(trained_run), "--checkpoints", str(locon), "--strengths", "1", "--out",
                 str(tmp_path / "out"), "--events", str(events)])
    assert code == EXIT_BAD_INPUT
    error = next(event for event in read_events(events) if event["type"] == "error")
    assert str(locon) in error["message"] and "same network settings" in error["hint"]


@pytest.mark.parametrize("case", ["not lora", "out not empty", "bad strength", "missing checkpoint"])
def test_bad_input_exits_2_before_loading_anything(case, trained_run, tmp_path, capsys):
    source, extra = str(trained_run), []
    out = tmp_path / "out"
    if case == "not lora":
        text = (trained_run / "config.toml").read_text(encoding="utf-8").replace('method = "lora"',
                                                                              'method = "dreambooth"')
        assert 'method = "dreambooth"' in text
        source = str(tmp_path / "config.toml")
        Path(source).write_text(text, encoding="utf-8")
    elif case == "out not empty":
        out.mkdir()
        (out / "mine.png").write_bytes(b"a user's file")
    elif case == "bad strength":
        extra = ["--strengths", "0,half"]
    else:
        extra = ["--checkpoints", str(tmp_path / "nope.safetensors")]
    events = tmp_path / "events.jsonl"
    code = main(["compare", source, "--out", str(out), "--events", str(events), *extra])
    assert code == EXIT_BAD_INPUT
    found = read_events(events)
    assert [event["type"] for event in found] == ["error", "done"] and found[-1]["ok"] is False
    message = found[0]["message"]
    expected = {"not lora": "dreambooth", "out not empty": "not an empty folder", "bad strength": "'half'",
                "missing checkpoint": "nope.safetensors"}[case]
    assert expected in message
    if case == "out not empty":
        assert (out / "mine.png").read_bytes() == b"a user's file"


def test_sigterm_stops_keeping_the_cells_already_written(trained_run, tmp_path):
    import subprocess
    import sys
    import time

    from train_helpers import REPO, engine_env

    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "engine", "compare", str(trained_run), "--strengths",
                                "0,0.25,0.5,0.75,1", "--seeds", "1,2,3,4", "--out", str(out), "--events",
                                str(events_file)], cwd=REPO, env=engine_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(event["type"] == "progress" for event in read_events(events_file)):
            assert process.poll() is None and time.monotonic() < deadline, "no cell was made"
            time.sleep(0.2)
        process.terminate()
        assert process.wait(timeout=120) == 1
    finally:
        process.kill()
    events = read_events(events_file)
    done = events[-1]
    assert done["type"] == "done" and done["stopped"] is True and done["ok"] is False
    written = {cell["file"] for event in events if event["type"] == "progress" for cell in event["cells"]}
    assert 0 < done["cells"] < 2 * 5 * 4 and all(Path(file).is_file() for file in written)
    assert not (out / "index.json").exists()
    assert [path.name for path in (out / "cells").iterdir() if path.name.startswith(".")] == []  # no scratch left


def test_a_validated_run_labels_its_columns_with_its_own_validation_losses(tiny_models, tmp_path):
    """The real `validation` events of a run holding images out (one per epoch save) reach the grid's column heads,
    and the lowest is marked best."""
    from engine.compare.plan import list_checkpoints, resolve_source

    config = write_config(tmp_path / "config.toml", tiny_models, "sd1",
                          dataset={"general": {"validation_split": 0.34, "validation_seed": 1}},
                          training={"max_train_steps": 0, "max_train_epochs": 2},
                          optimizer={"learning_rate": 1e-2}, saving={"save_every_n_epochs": 1})
    assert engine_here("train", str(config), "--run-dir", str(tmp_path / "run")) == 0
    measured = {event["checkpoint"]: event["loss"] for event in events_of(tmp_path / "run")
                if event["type"] == "validation" and event.get("checkpoint")}
    listed = list_checkpoints(resolve_source(tmp_path / "run"))
    assert len(listed) == 2 and all(str(c.path) in measured for c in listed)
    assert [c.validation_loss for c in listed] == [measured[str(c.path)] for c in listed]
    assert [c.best for c in listed] == [c.validation_loss == min(measured.values()) for c in listed]
