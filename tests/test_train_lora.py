"""LoRA training end to end on tiny models: it learns, its file loads in diffusers exactly, it reports and resumes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import (
    assert_same_tensors,
    events_of,
    load_pipeline,
    pipeline_text_encoders,
    run_engine,
    stop_by_sigterm_then_resume,
    train_here,
    unet_conditioning,
    validation_loss,
    write_config,
)

DOCUMENTED_FIELDS = {
    "start": {"task", "method", "family", "total_steps", "num_epochs", "num_train_images", "config", "run_dir",
              "memory_plan"},
    "progress": {"task", "step", "total_steps", "epoch", "loss", "loss_avg", "lr", "it_per_s", "eta_s"},
    "sample": {"step", "epoch", "count", "images"},
    "checkpoint": {"kind", "path", "step", "epoch"},
    "warning": {"message", "hint"},
    "done": {"task", "ok", "stopped", "summary"},
}


@pytest.fixture(scope="module")
def sd1_run(tiny_models, tmp_path_factory):
    """One SD1 run with samples, a per-step save and a state; shared by the tests that inspect its outputs."""
    folder = tmp_path_factory.mktemp("sd1_run")
    config = write_config(
        folder / "config.toml", tiny_models, "sd1",
        training={"max_train_steps": 40, "mixed_precision": "fp16"},  # fp16 autocast and loss scaling, on a CPU too
        network={"network_dim": 4, "network_alpha": 2.0},
        optimizer={"learning_rate": 5e-3, "lr_scheduler": "constant"},
        saving={"save_every_n_steps": 20, "save_state": True},
        sampling={"sample_every_n_steps": 20, "sample_at_first": True,
                  "sample_prompts": ["sks dog, red square --w 64 --h 64 --s 2 --d 5"]},
    )
    train_here(config)
    return folder


def _loaded_with_lora(folder: Path, lora: Path):
    pipe = load_pipeline(folder)
    pipe.load_lora_weights(str(lora))
    return pipe


@pytest.mark.slow
def test_sd1_lora_learns_and_loads_in_diffusers(sd1_run, tiny_models):
    lora = sd1_run / "out" / "lora.safetensors"
    before = validation_loss(load_pipeline(tiny_models["sd1"]), "sd1", tiny_models["dataset_img"])
    after = validation_loss(_loaded_with_lora(tiny_models["sd1"], lora), "sd1", tiny_models["dataset_img"])
    assert after < before * 0.97, (before, after)


@pytest.mark.slow
def test_saved_file_has_kohya_keys_and_metadata(sd1_run):
    lora = sd1_run / "out" / "lora.safetensors"
    with safe_open(str(lora), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_steps"] == "40" and metadata["ss_output_name"] == "lora"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert len(metadata["sshs_model_hash"]) == 64
    tensors = load_file(str(lora))
    assert float(tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 2.0


@pytest.mark.slow
def test_engine_forward_equals_diffusers_forward(sd1_run, tiny_models):
    """The engine's own network, rebuilt from the file, gives the UNet output diffusers gives with the file loaded."""
    from diffusers import UNet2DConditionModel

    from engine.models.text_encoding import encode_captions
    from engine.networks.lora import create_lora_network

    lora = sd1_run / "out" / "lora.safetensors"
    pipe = _loaded_with_lora(tiny_models["sd1"], lora)
    base = load_pipeline(tiny_models["sd1"])
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd1"], subfolder="unet")
    network = create_lora_network(unet, [base.text_encoder], "sd1", dim=4, alpha=2.0)
    network.load_kohya_state_dict(load_file(str(lora)))
    network.apply_to()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        ours = encode_captions(pipeline_text_encoders(base, "sd1"), ["sks dog", "a cat"], clip_skip=1,
                               max_token_length=75)
        theirs = encode_captions(pipeline_text_encoders(pipe, "sd1"), ["sks dog", "a cat"], clip_skip=1,
                                 max_token_length=75)
        assert (ours.hidden_states - theirs.hidden_states).abs().max() <= 1e-6
        engine_out = unet(latents, timesteps, **unet_conditioning(ours, "sd1", 2)).sample
        diffusers_out = pipe.unet(latents, timesteps, **unet_conditioning(theirs, "sd1", 2)).sample
    assert (engine_out - diffusers_out).abs().max() <= 1e-6


@pytest.mark.slow
def test_run_writes_events_samples_checkpoints_and_state(sd1_run):
    out = sd1_run / "out"
    events = events_of(out)
    types = {event["type"] for event in events}
    assert {"start", "progress", "sample", "checkpoint", "warning", "done"} <= types
    for event in events:
        missing = DOCUMENTED_FIELDS.get(event["type"], set()) - set(event)
        assert not missing, (event["type"], missing)
    progress = [event for event in events if event["type"] == "progress"]
    assert [event["step"] for event in progress] == list(range(1, 41))
    assert events[-1]["type"] == "done" and events[-1]["ok"] and not events[-1]["stopped"]
    assert (out / "lora-step00000020.safetensors").is_file() and (out / "lora.safetensors").is_file()
    assert (out / "lora-step00000020-state" / "train_state.json").is_file()
    samples = sorted((out / "samples").glob("*.png"))
    assert [path.name.split("_")[1] for path in samples] == ["000000", "000020", "000040"]
    assert (out / "config.toml").is_file() and (out / "train.log").read_text().count("step ") >= 2
    warnings = [event for event in events if event["type"] == "warning"]
    assert any(event.get("where") == "training.mixed_precision" for event in warnings)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_lora_learns_on_sd2_v_and_sdxl(family, tiny_models, tmp_path):
    # The validation loss is deterministic (fixed noise and timesteps), so a steady 1% drop is learning, not luck.
    config = write_config(tmp_path / "config.toml", tiny_models, family, training={"max_train_steps": 40},
                          optimizer={"learning_rate": 1e-2, "lr_scheduler": "constant"})
    train_here(config)
    lora = tmp_path / "out" / "lora.safetensors"
    v_prediction = family == "sd2"
    before = validation_loss(load_pipeline(tiny_models[family]), family, tiny_models["dataset_img"],
                             v_prediction=v_prediction)
    after = validation_loss(_loaded_with_lora(tiny_models[family], lora), family, tiny_models["dataset_img"],
                            v_prediction=v_prediction)
    assert after < before * 0.99, (before, after)
    with safe_open(str(lora), "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    if family == "sdxl":
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(key.startswith("lora_unet_input_blocks_") for key in keys)
        assert any(key.startswith("lora_te1_") for key in keys) and any(key.startswith("lora_te2_") for key in keys)
    else:
        assert metadata["ss_base_model_version"] == "sd_v2_v"


@pytest.mark.slow
def test_locon_trains_conv_modules(tiny_models, tmp_path):
    # Also runs the memory and caption-length options end to end: checkpointing, clip skip, 150-token captions.
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1",
                          training={"max_train_steps": 2, "gradient_checkpointing": True},
                          model={"clip_skip": 2, "max_token_length": 150},
                          network={"network_type": "locon", "network_dim": 4, "conv_dim": 2, "conv_alpha": 1.0})
    train_here(config)
    tensors = load_file(str(tmp_path / "out" / "lora.safetensors"))
    conv_downs = [key for key, value in tensors.items() if key.endswith("lora_down.weight") and value.dim() == 4
                  and value.shape[-1] == 3]
    assert conv_downs and all(tensors[key].shape[0] == 2 for key in conv_downs)
    assert any("resnets" in key for key in conv_downs)


@pytest.mark.slow
def test_resume_after_sigterm_equals_an_uninterrupted_run(tiny_models, tmp_path):
    # Pixels are loaded every step (no latent cache), with flips and caption shuffling, so a resume that replayed
    # or skipped any sample, or any random draw, would give different weights.
    sections = {"training": {"max_train_steps": 40, "cache_latents": False, "gradient_accumulation_steps": 2},
                "dataset": {"general": {"flip_aug": True, "shuffle_caption": True}},
                "network": {"network_dropout": 0.1}, "optimizer": {"lr_scheduler": "cosine", "lr_warmup_steps": 3}}
    whole = write_config(tmp_path / "whole" / "config.toml", tiny_models, **sections)
    train_here(whole)

    parted = write_config(tmp_path / "parted" / "config.toml", tiny_models, **sections)
    run_dir = tmp_path / "parted" / "out"
    stopped_at = stop_by_sigterm_then_resume(parted, run_dir, total_steps=40)
    resumed_progress = [e["step"] for e in events_of(run_dir) if e["type"] == "progress"]
    assert resumed_progress[-(40 - stopped_at):] == list(range(stopped_at + 1, 41))
    assert_same_tensors(tmp_path / "whole" / "out" / "lora.safetensors", run_dir / "lora.safetensors",
                        rtol=1e-5, atol=1e-6)


def _poison_latents_of_a_later_image(config_path: Path) -> Path:
    """Put huge values into the cached latents of an image the first batch does not use (a corrupted cache entry
    that still passes the cache's finiteness check); returns that image."""
    from engine.cache.latent_files import cache_path
    from engine.config.io import load_config
    from engine.data.sampler import BucketBatchSampler
    from engine.data.scan import scan_config
    from engine.train.build import examples_records
    from engine.train.dataset import batch_sizes

    config = load_config(config_path)
    scan = scan_config(config, config_path.parent)
    records = examples_records(scan)
    sampler = BucketBatchSampler(records, batch_sizes(scan), seed=config.training.seed)
    sampler.set_epoch(1)
    first = {records[index].path for index in next(iter(sampler))}
    victim = next(record for record in records if record.path not in first)
    entry = cache_path(victim.path, victim.bucket, "sd1")
    with np.load(entry, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    # Finite, so the cache's own check lets it through (it refuses NaN/inf by file), but so large that the forward
    # pass overflows: the loss of that batch is not finite while the weights still are.
    arrays["latents"] = np.full_like(arrays["latents"], 1e30)
    if "latents_flipped" in arrays:
        arrays["latents_flipped"] = np.full_like(arrays["latents_flipped"], 1e30)
    np.savez(entry, **arrays)
    return victim.path


@pytest.mark.slow
def test_nan_loss_stops_with_an_error_and_keeps_earlier_checkpoints(tiny_models, tmp_path):
    dataset = tmp_path / "img"
    shutil.copytree(tiny_models["dataset_img"], dataset)
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1",
                          dataset={"train_data_dir": str(dataset)},
                          training={"max_train_steps": 30, "cache_latents_to_disk": True},
                          saving={"save_every_n_steps": 1})
    assert run_engine("cache-latents", str(config)).returncode == 0
    victim = _poison_latents_of_a_later_image(config)
    result = run_engine("train", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    events = events_of(tmp_path / "out")
    error = next(event for event in events if event["type"] == "error")
    assert error["step"] >= 2 and f"at step {error['step']}" in error["message"]
    assert "learning rate" in error["hint"] and "bf16" in error["hint"]
    assert str(victim) in error["images"] and str(victim) in error["message"]  # the batch that broke is named
    saved = sorted((tmp_path / "out").glob("lora-step*.safetensors"))
    assert len(saved) == error["step"] - 1
    for path in saved:
        assert all(torch.isfinite(tensor).all() for tensor in load_file(str(path)).values()), path
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    assert events[-1]["type"] == "done" and not events[-1]["ok"]


@pytest.mark.slow
def test_bad_dataset_is_refused_before_training(tiny_models, tmp_path):
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1",
                          dataset={"train_data_dir": str(tmp_path / "missing")})
    result = run_engine("train", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    error = next(event for event in events_of(tmp_path / "out") if event["type"] == "error")
    assert "missing" in error["message"] and error["hint"]


def test_xformers_on_a_machine_without_it_is_refused_before_loading(tiny_models, tmp_path):
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", training={"attention": "xformers"})
    result = run_engine("train", str(config))
    assert result.returncode == 2
    assert "training.attention" in result.stderr + result.stdout
