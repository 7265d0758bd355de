"""The Compare tab's logic without a browser: the command line it builds (read back by the engine's parser), the
checkpoints it refuses, and the grid laid out from the command's events with pending cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.compare.plan import Checkpoint
from gui.views import compare as view


def _pick(tmp_path: Path) -> view.RunPick:
    checkpoints = [Checkpoint(tmp_path / "out" / "lora-000001.safetensors", epoch=1, validation_loss=0.25, best=True),
                   Checkpoint(tmp_path / "out" / "lora.safetensors", epoch=2)]
    return view.RunPick(tmp_path, checkpoints, ["a dog --d 5"], "")


def test_the_command_line_reads_back_as_the_form_said(tmp_path):
    pick = _pick(tmp_path)
    out = view.out_folder(tmp_path, now=0)
    request = view.CompareRequest(str(tmp_path), [str(c.path) for c in pick.checkpoints], "a dog --d 5\n",
                                  "0,-0.5,1", "3")
    args = build_parser().parse_args(view.compare_args(request, pick, out))
    assert (args.command, args.source, args.checkpoints, args.strengths, args.seeds, args.out, args.prompts) == \
        ("compare", str(tmp_path), [str(c.path) for c in pick.checkpoints], "0,-0.5,1", "3", str(out), "")
    assert not list(tmp_path.glob("compare/*prompts.txt"))  # the run's own prompts: no prompt file


def test_edited_prompts_go_into_a_file_beside_the_comparison(tmp_path):
    pick = _pick(tmp_path)
    out = view.out_folder(tmp_path, now=0)
    request = view.CompareRequest(str(tmp_path), [str(pick.checkpoints[0].path)], "a cat\n\n a dog --s 4 ", "1", "")
    args = build_parser().parse_args(view.compare_args(request, pick, out))
    assert Path(args.prompts).read_text(encoding="utf-8") == "a cat\na dog --s 4\n"
    assert Path(args.prompts).parent == out.parent and not out.exists()  # the engine makes the new folder itself


@pytest.mark.parametrize(("chosen", "message"), [([], "at least one"), (["/etc/passwd"], "not a checkpoint")])
def test_checkpoints_must_be_the_runs_own(tmp_path, chosen, message):
    request = view.CompareRequest(str(tmp_path), chosen, "", "1", "")
    with pytest.raises(ValueError, match=message):
        view.compare_args(request, _pick(tmp_path), view.out_folder(tmp_path))


def test_the_grid_fills_in_from_the_events():
    cell = {"prompt_index": 0, "row": 1, "column": 0, "file": "/r/c.png", "checkpoint": "/r/a.safetensors",
            "checkpoint_label": "lora-000001", "strength": 1.0, "seed": 5, "prompt": "a dog", "negative_prompt": "",
            "width": 64, "height": 64, "steps": 2, "scale": 7.5, "sampler": "euler"}
    events = [{"type": "start", "strengths": [0.0, 1.0], "out": "/r/out",
               "checkpoints": [{"label": "lora-000001", "validation_loss": 0.25, "best": True},
                               {"label": "lora", "validation_loss": None, "best": False}],
               "prompts": [{"index": 0, "prompt": "a dog", "seeds": [5]}]},
              {"type": "progress", "cells": [cell]}]
    state = view.grid_state(events)
    assert view.grid_cells(state, 0) == [None, None, cell, None]  # 2 rows x 2 columns, one made
    assert view.column_heads(state) == "**Columns:** 1. `lora-000001` (val loss 0.25, **best**) · 2. `lora`"
    assert view.row_heads(state, 0) == "**Rows:** 1. base model, seed 5 · 2. strength 1, seed 5"
    assert "lora-000001 · strength 1 · seed 5" in view.cell_settings(cell)
    assert view.checkpoint_choice(Checkpoint(Path("/r/lora-000001.safetensors"), epoch=1, validation_loss=0.25,
                                             best=True)) == "lora-000001 (epoch 1, val loss 0.25, best)"
