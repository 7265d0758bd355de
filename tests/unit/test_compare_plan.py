"""The comparison's plan without a model: strengths and seeds, which checkpoints a run or a bare config offers,
validation losses read from a run's events, cells and their file names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.compare.grid import GridPrompt, cell_name, grid_rows, plan_cells
from engine.compare.plan import (
    Checkpoint,
    RunSource,
    list_checkpoints,
    mark_best,
    parse_seeds,
    parse_strengths,
    resolve_source,
    validation_losses,
)


def test_strengths_and_seeds_are_read_as_lists_without_duplicates():
    assert parse_strengths("0, 0.5,0.8,1,1") == [0.0, 0.5, 0.8, 1.0]
    assert parse_strengths("-0.5") == [-0.5]
    assert parse_seeds("") == [] and parse_seeds("3,4,3") == [3, 4]
    for bad, parse, named in (("0,x", parse_strengths, "'x'"), ("", parse_strengths, "at least one"),
                              ("nan", parse_strengths, "finite"), ("1.5", parse_seeds, "'1.5'"),
                              ("-1", parse_seeds, "negative")):
        with pytest.raises(ValueError, match=named):
            parse(bad)


def _run(tmp_path: Path, events: list[dict]) -> RunSource:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("", encoding="utf-8")
    (run / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    return resolve_source(run)


def test_a_run_offers_its_saved_epochs_and_final_model_that_still_exist(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("lora-000002.safetensors", "lora-000003.safetensors", "lora.safetensors"):
        (out / name).write_bytes(b"x")
    events = [{"type": "checkpoint", "kind": "epoch", "epoch": epoch, "step": epoch * 10,
               "path": str(out / f"lora-{epoch:06d}.safetensors")} for epoch in (1, 2, 3)]  # epoch 1 was removed
    events += [{"type": "checkpoint", "kind": "state", "path": str(out / "lora-state")},
               {"type": "checkpoint", "kind": "last", "epoch": 4, "step": 40, "path": str(out / "lora.safetensors")}]
    listed = list_checkpoints(_run(tmp_path, events))
    assert [(c.label, c.epoch, c.step) for c in listed] == [("lora-000002", 2, 20), ("lora-000003", 3, 30),
                                                            ("lora", 4, 40)]
    assert not any(c.best or c.validation_loss is not None for c in listed)  # no validation events: nothing shown


def test_a_bare_config_offers_the_files_named_after_its_output_name(tmp_path):
    config = tmp_path / "my.toml"
    config.write_text("", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("lora-000002.safetensors", "lora-000010.safetensors", "lora-step00000500.safetensors",
                 "lora.safetensors", "lora-2.safetensors", "other.safetensors", "lora-000003.txt"):
        (out / name).write_bytes(b"x")
    source = resolve_source(config)
    assert source.run_dir is None and source.folder == tmp_path
    listed = list_checkpoints(source, out, "lora")
    assert [c.label for c in listed] == ["lora-000002", "lora-000010", "lora-step00000500", "lora"]


def test_validation_losses_take_the_newest_finite_value_per_checkpoint(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    events = [{"type": "validation", "loss": 0.3, "checkpoint": str(a)},
              {"type": "validation", "loss": 0.2, "path": str(b)},
              {"type": "validation", "loss": float("nan"), "checkpoint": str(b)},
              {"type": "validation", "loss": 0.1},  # measured without a save: no column to show it on
              {"type": "validation", "loss": 0.25, "checkpoint": str(a)},
              {"type": "progress", "loss": 0.01}]
    assert validation_losses(events) == {a.resolve(): 0.25, b.resolve(): 0.2}
    marked = mark_best([Checkpoint(a), Checkpoint(b), Checkpoint(tmp_path / "c.pt")], validation_losses(events))
    assert [(c.validation_loss, c.best) for c in marked] == [(0.25, False), (0.2, True), (None, False)]


def test_missing_sources_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="without config.toml"):
        resolve_source(tmp_path)


def test_cells_fill_rows_of_strength_and_seed_and_strength_zero_shares_one_file(tmp_path):
    prompt = GridPrompt(0, "a dog", "", 64, 64, 2, 7.5, "euler", 3.5)
    checkpoints = [Checkpoint(tmp_path / "lora-000001.safetensors"), Checkpoint(tmp_path / "lora.safetensors")]
    assert grid_rows([0, 1], [5, 6]) == [(0, 5), (0, 6), (1, 5), (1, 6)]
    cells = plan_cells([prompt], [[5, 6]], checkpoints, [0, 1], tmp_path)
    assert len(cells) == 8
    assert [cell.file.name for cell in cells[:2]] == ["p01_base_seed5.png"] * 2
    assert cells[-1].file.name == "p01_lora_s1_seed6.png" and (cells[-1].row, cells[-1].column) == (3, 1)
    assert cell_name(1, checkpoints[0], 0.5, 9) == "p02_lora-000001_s0.5_seed9.png"


def test_a_run_saving_by_steps_offers_its_step_saves_and_final_model(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    events = []
    saves = (("lora-step00000010", "step", 10), ("lora-step00000020", "step", 20), ("lora", "last", 25))
    for name, kind, step in saves:
        (out / f"{name}.safetensors").write_bytes(b"x")
        events.append({"type": "checkpoint", "kind": kind, "step": step, "epoch": 1,
                       "path": str(out / f"{name}.safetensors")})
    listed = list_checkpoints(_run(tmp_path, events))
    assert [(c.label, c.step) for c in listed] == [("lora-step00000010", 10), ("lora-step00000020", 20), ("lora", 25)]
