"""Placing the model for training: a part that trains keeps its exact float32 weights under mixed precision (a cast
to half first would round them for good); frozen parts go to the mixed-precision dtype."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_helpers import write_config

from engine.config.io import load_config
from engine.models.loading import load_model
from engine.train.methods import create_method
from engine.train.placement import place_models


@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_trained_weights_are_placed_without_rounding(method, tiny_models, tmp_path: Path):
    config_path = write_config(tmp_path / "config.toml", tiny_models, "sd1", method=method,
                               training={"mixed_precision": "bf16"})
    config = load_config(config_path)
    model = load_model(tiny_models["sd1"], family="sd1")
    before = {name: tensor.clone() for name, tensor in model.unet.state_dict().items()}
    trained = create_method(config, model, tmp_path)
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    place_models(config, model, trained, accelerator, torch.bfloat16, latents_cached=True, texts_cached=False)
    after = model.unet.state_dict()
    if method == "dreambooth":  # the UNet trains: float32, bit for bit what was loaded
        assert all(after[name].dtype == torch.float32 and torch.equal(after[name], before[name]) for name in before)
    else:  # a LoRA's base stays frozen in the mixed-precision dtype
        assert {tensor.dtype for tensor in after.values() if tensor.is_floating_point()} == {torch.bfloat16}
