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


@pytest.mark.parametrize("latents_cached, texts_cached", [(True, True), (True, False), (False, True)])
def test_text_encoders_and_vae_leave_the_gpu_when_their_outputs_are_cached(latents_cached, texts_cached, tiny_models,
                                                                          tmp_path: Path):
    """The meta device stands for the GPU: what placement moves there is on the GPU. The memory plan counts each part
    where placement puts it (issue 16)."""
    from engine.plan import make_plan

    config_path = write_config(tmp_path / "config.toml", tiny_models, "sdxl", network={"train_unet_only": True},
                               training={"mixed_precision": "bf16", "cache_latents": latents_cached,
                                         "cache_text_encoder_outputs": texts_cached})
    config = load_config(config_path)
    model = load_model(tiny_models["sdxl"], family="sdxl")
    trained = create_method(config, model, tmp_path)
    gpu = torch.device("meta")
    place_models(config, model, trained, SimpleNamespace(device=gpu), torch.bfloat16, latents_cached=latents_cached,
                 texts_cached=texts_cached)

    def where(module: torch.nn.Module) -> str:
        return "gpu" if {p.device.type for p in module.parameters()} == {"meta"} else "host"

    assert where(model.unet) == "gpu"
    assert {where(encoder) for encoder in model.text.encoders} == {"host" if texts_cached else "gpu"}
    assert where(model.vae.vae) == ("host" if latents_cached else "gpu")
    # Frozen encoders keep the weight dtype on the host too (they only run on the GPU, for samples).
    assert {p.dtype for encoder in model.text.encoders for p in encoder.parameters()} == {torch.bfloat16}
    plan = {item.name: item for item in make_plan(config, tmp_path, gpu_capacity=None).items}
    assert plan["text encoders"].where == where(model.text.encoders[0]) and plan["VAE"].where == where(model.vae.vae)
    assert plan["text encoders"].bytes == sum(p.numel() * p.element_size()
                                              for encoder in model.text.encoders for p in encoder.parameters())
