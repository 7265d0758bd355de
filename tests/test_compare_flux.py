"""`python -m engine compare` on a tiny FLUX.1 dev LoRA run saving by steps: its flow-matching cells at strength 1
are the samples the run drew with those checkpoints, and strength 0 is the base model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_train_flux import PROMPT, flux_config
from train_helpers import engine_here, events_of

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_flux_cells_equal_the_runs_samples_and_strength_zero_is_the_base(tiny_models, tmp_path):
    config = flux_config(tmp_path / "config.toml", tiny_models, "dev", training={"max_train_steps": 8},
                         optimizer={"learning_rate": 5e-3, "lr_scheduler": "constant"},
                         saving={"save_every_n_steps": 4}, sampling={"sample_every_n_steps": 4,
                                                                     "sample_prompts": [PROMPT]})
    run = tmp_path / "run"
    assert engine_here("train", str(config), "--run-dir", str(run)) == 0
    samples = {event["step"]: event["images"][0]["path"] for event in events_of(run) if event["type"] == "sample"}

    out = tmp_path / "grid"
    assert engine_here("compare", str(run), "--strengths", "0,1", "--out", str(out)) == 0
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert [(c["label"], c["step"]) for c in index["checkpoints"]] == [("lora-step00000004", 4),
                                                                       ("lora-step00000008", 8), ("lora", 8)]
    cells = {(cell["checkpoint_label"], cell["strength"]): cell["file"] for cell in index["cells"]}
    assert np.array_equal(pixels(cells["lora-step00000004", 1]), pixels(samples[4]))
    assert np.array_equal(pixels(cells["lora", 1]), pixels(samples[8]))
    assert np.array_equal(pixels(cells["lora-step00000008", 1]), pixels(samples[8]))
    assert cells["lora", 0] == cells["lora-step00000004", 0]  # the base model, drawn once
    assert not np.array_equal(pixels(cells["lora", 0]), pixels(cells["lora", 1]))
    assert index["cells"][0]["sampler"] and index["cells"][0]["guidance"] == 3.5
