"""FLUX.1 (dev, schnell) and Chroma LoRA training end to end through the CLI, on tiny models of the real
architectures written as BFL single files: it learns, its file loads in diffusers with the engine's own output,
its keys are the ones ComfyUI maps, and a run stopped by SIGTERM resumes to the uninterrupted run's weights."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from flux_tiny import tiny_flux_files, tiny_params
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import (
    REPO,
    assert_same_tensors,
    dataset_batch,
    engine_env,
    events_of,
    run_engine,
    stop_by_sigterm_then_resume,
    train_here,
    write_config,
)

SIGMAS = (0.2, 0.4, 0.6, 0.8)  # the fixed noise levels of the validation loss
PROMPT = "sks dog --w 64 --h 64 --s 2 --d 5"


def flux_config(path: Path, tiny_models: dict[str, Path], variant: str = "dev", **sections: Any) -> Path:
    """A small FLUX LoRA run: the tiny files of `variant`, 64 px in buckets of 16, latents cached in memory."""
    files = tiny_flux_files(variant)
    family = "chroma" if variant == "chroma" else "flux1"
    model = {"model_family": family, "v_parameterization": False, "t5xxl": str(files["t5xxl"]),
             "ae": str(files["ae"]), "tokenizer_cache_dir": str(files["t5_tokenizer"]),
             "apply_t5_attn_mask": variant == "chroma"}
    if variant != "chroma":
        model["clip_l"] = str(files["clip_l"])
    flow = {"guidance_scale": 0.0 if variant == "chroma" else 1.0}
    base = {"model": model, "flow": flow, "dataset": {"general": {"bucket_reso_steps": 16}},
            "training": {"cache_latents": True}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return write_config(path, {family: files["model"], "dataset_img": tiny_models["dataset_img"]}, family, **base)


@pytest.fixture(scope="module")
def dev_run(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_dev_run")
    config = flux_config(folder / "config.toml", tiny_models, "dev",
                         training={"max_train_steps": 40},
                         optimizer={"learning_rate": 5e-3, "lr_scheduler": "constant"},
                         saving={"save_every_n_steps": 20, "save_state": True},
                         sampling={"sample_every_n_steps": 20, "sample_prompts": [PROMPT]})
    train_here(config)
    return folder


# --- the engine's own model with a LoRA file ---------------------------------------------------------------------


def load_engine_model(variant: str, lora: Path | None = None) -> Any:
    from engine.models.loading import load_model
    from engine.networks.lora import create_lora_network

    files = tiny_flux_files(variant)
    family = "chroma" if variant == "chroma" else "flux1"
    model = load_model(files["model"], family=family, clip_l=files.get("clip_l") if variant != "chroma" else "",
                       t5xxl=files["t5xxl"], ae=files["ae"], tokenizer_cache_dir=files["t5_tokenizer"])
    if lora is not None:
        tensors = load_file(str(lora))
        train_t5 = any(key.startswith("lora_te3_") for key in tensors)
        network = create_lora_network(model.unet, model.text.encoders, family, dim=4, alpha=4.0,
                                      network_args={"train_t5xxl": "True"} if train_t5 else None)
        network.load_kohya_state_dict(tensors)
        network.apply_to()
    return model


def flow_validation_loss(model: Any, image_dir: Path, *, guidance: float = 1.0, mask: bool = False) -> float:
    """Mean velocity loss on the dataset at fixed σ with fixed noise (the same work for every model)."""
    from engine.models.text_encoding import encode_captions
    from engine.train import flow

    pixels, captions = dataset_batch(image_dir)
    with torch.no_grad():
        latents = model.vae.normalize(model.vae.vae.encode(pixels).latent_dist.mean)
        encoded = encode_captions(model.text, captions, t5xxl_max_token_length=32, apply_t5_attn_mask=mask)
        generator = torch.Generator().manual_seed(0)
        batch, _, height, width = latents.shape
        losses = []
        for sigma in SIGMAS:
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = torch.full((batch,), sigma)
            noisy = flow.noisy_input(latents, noise, sigmas)
            prediction = model.unet(
                img=flow.pack_latents(noisy), img_ids=flow.image_ids(batch, (height, width)),
                txt=encoded.hidden_states, txt_ids=flow.text_ids(batch, encoded.hidden_states.shape[1]),
                timesteps=sigmas, y=encoded.pooled, guidance=torch.full((batch,), guidance),
                txt_mask=encoded.mask if mask else None)
            velocity = flow.unpack_latents(prediction, (height, width))
            losses.append(torch.nn.functional.mse_loss(velocity, flow.velocity_target(latents, noise)).item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_flux_dev_lora_learns(dev_run, tiny_models):
    lora = dev_run / "out" / "lora.safetensors"
    before = flow_validation_loss(load_engine_model("dev"), tiny_models["dataset_img"])
    after = flow_validation_loss(load_engine_model("dev", lora), tiny_models["dataset_img"])
    assert after < before * 0.97, (before, after)


@pytest.mark.slow
def test_flux_run_reports_saves_and_samples(dev_run):
    out = dev_run / "out"
    events = events_of(out)
    start = next(event for event in events if event["type"] == "start")
    assert start["family"] == "flux1"
    assert {"progress", "sample", "checkpoint", "done"} <= {event["type"] for event in events}
    assert events[-1]["type"] == "done" and events[-1]["ok"]
    assert (out / "lora-step00000020.safetensors").is_file() and (out / "lora-state").is_dir()
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 2
    from PIL import Image

    assert Image.open(samples[0]).size == (64, 64)


@pytest.mark.slow
def test_flux_lora_keys_and_metadata_follow_kohya_and_comfyui(dev_run):
    lora = dev_run / "out" / "lora.safetensors"
    files = tiny_flux_files("dev")
    with safe_open(str(lora), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    names = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in keys}
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    # ComfyUI: every `diffusion_model.<path>.weight` of the model is reachable as `lora_unet_<path, . → _>`.
    model_weights = {k.removesuffix(".weight").replace(".", "_") for k in load_file(str(files["model"]))
                     if k.endswith(".weight")}
    clip_weights = {k.removesuffix(".weight").replace(".", "_") for k in load_file(str(files["clip_l"]))
                    if k.endswith(".weight")}
    unet = {name.removeprefix("lora_unet_") for name in names if name.startswith("lora_unet_")}
    text = {name.removeprefix("lora_te1_") for name in names if name.startswith("lora_te1_")}
    assert unet and unet <= model_weights, unet - model_weights
    assert text and text <= clip_weights, text - clip_weights
    assert unet == {name for name in model_weights if name.startswith(("double_blocks_", "single_blocks_"))
                    and not name.endswith(("_scale",))}
    assert "double_blocks_0_img_attn_qkv" in unet and "single_blocks_1_linear1" in unet
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["ss_network_module"] == "networks.lora_flux"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["ss_guidance_scale"] == "1.0" and metadata["ss_model_prediction_type"] == "raw"


@contextmanager
def _tiny_single_block_split(hidden: int):
    """diffusers' kohya FLUX converter splits single-block `linear1` with FLUX.1's widths written in
    ([3072] * 3 + [12288], checked with `sum(dims)` and used by `torch.split`); at the tiny width the same split is
    [hidden] * 3 + [4 * hidden]. Both uses see the tiny widths while the file is converted; nothing else changes."""
    from diffusers.loaders import lora_conversion_utils

    real = [3072, 3072, 3072, 12288]
    tiny = [hidden] * 3 + [4 * hidden]
    original_split = torch.split

    def split(tensor: torch.Tensor, sizes: Any, dim: int = 0) -> Any:
        return original_split(tensor, tiny if sizes == real else sizes, dim)

    def total(values: Any, start: int = 0) -> Any:
        values = list(values)
        return sum(tiny if values == real else values, start)

    torch.split = split
    lora_conversion_utils.sum = total
    try:
        yield
    finally:
        torch.split = original_split
        del lora_conversion_utils.sum


def _diffusers_pipeline(variant: str) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from engine.models.flux.convert import bfl_to_diffusers

    params = tiny_params(variant)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=params.depth, num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim, num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed, axes_dims_rope=tuple(params.axes_dim))
    state, _ = bfl_to_diffusers(load_file(str(tiny_flux_files(variant)["model"])))
    transformer.load_state_dict(state, strict=True)
    model = load_engine_model(variant)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=model.vae.vae,
                        text_encoder=model.text.encoders[0], tokenizer=model.text.tokenizers[0],
                        text_encoder_2=model.text.encoders[1], tokenizer_2=model.text.tokenizers[1],
                        transformer=transformer)


@pytest.mark.slow
def test_flux_lora_loads_in_diffusers_with_the_engines_output(dev_run):
    """diffusers' FluxPipeline.load_lora_weights on our file gives the transformer output the engine gives."""
    from engine.models.text_encoding import encode_captions
    from engine.train import flow

    lora = dev_run / "out" / "lora.safetensors"
    pipe = _diffusers_pipeline("dev")
    with _tiny_single_block_split(tiny_params("dev").hidden_size):
        pipe.load_lora_weights(str(lora))
    ours = load_engine_model("dev", lora)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    sigmas = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        encoded = encode_captions(ours.text, ["sks dog", "a red square"], t5xxl_max_token_length=32)
        theirs_pooled = pipe.text_encoder(pipe.tokenizer(["sks dog", "a red square"], padding="max_length",
                                                         max_length=77, truncation=True,
                                                         return_tensors="pt").input_ids).pooler_output
        assert (encoded.pooled - theirs_pooled).abs().max() <= 1e-5  # the CLIP-L LoRA took effect the same way
        packed, ids = flow.pack_latents(latents), flow.image_ids(2, (8, 8))
        txt_ids = flow.text_ids(2, encoded.hidden_states.shape[1])
        guidance = torch.full((2,), 1.0)
        engine_out = ours.unet(img=packed, img_ids=ids, txt=encoded.hidden_states, txt_ids=txt_ids,
                               timesteps=sigmas, y=encoded.pooled, guidance=guidance)
        diffusers_out = pipe.transformer(hidden_states=packed, encoder_hidden_states=encoded.hidden_states,
                                         pooled_projections=encoded.pooled, timestep=sigmas, img_ids=ids[0],
                                         txt_ids=txt_ids[0], guidance=guidance).sample
    assert (engine_out - diffusers_out).abs().max() <= 1e-5
    base = load_engine_model("dev")
    with torch.no_grad():
        base_out = base.unet(img=packed, img_ids=ids, txt=encoded.hidden_states, txt_ids=txt_ids,
                             timesteps=sigmas, y=encoded.pooled, guidance=guidance)
    assert (engine_out - base_out).abs().max() > 1e-4  # the LoRA changes the output: the comparison means something


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["schnell", "chroma"])
def test_schnell_and_chroma_train_with_their_own_names(variant, tiny_models, tmp_path):
    """schnell (no guidance input) and Chroma (T5 only, masked text, T5 LoRA via train_t5xxl) train and save."""
    network = {"network_args": {"train_t5xxl": True}} if variant == "chroma" else {}
    config = flux_config(tmp_path / "config.toml", tiny_models, variant, training={"max_train_steps": 24},
                         network=network, optimizer={"learning_rate": 5e-3, "lr_scheduler": "constant"},
                         sampling={"sample_every_n_steps": 24, "sample_prompts": [PROMPT + " --g 0 --l 2"]})
    train_here(config)
    lora = tmp_path / "out" / "lora.safetensors"
    with safe_open(str(lora), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    files = tiny_flux_files(variant)
    if variant == "chroma":
        assert metadata["modelspec.architecture"] == "chroma/lora" and metadata["ss_model_type"] == "chroma"
        assert not any(key.startswith("lora_te1_") for key in keys)
        assert not any("_mod_lin" in key or "modulation" in key for key in keys)  # Chroma has no modulation layers
        t5_names = {key.split(".")[0].removeprefix("lora_te3_") for key in keys if key.startswith("lora_te3_")}
        t5_weights = {k.removesuffix(".weight").replace(".", "_") for k in load_file(str(files["t5xxl"]))}
        assert t5_names and t5_names <= t5_weights, t5_names - t5_weights  # ComfyUI's lora_te3_<path> rule
        assert any("SelfAttention_q" in name for name in t5_names) and any("wi_0" in name for name in t5_names)
    else:
        assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"
        assert not any(key.startswith("lora_unet_guidance_in") for key in keys)
    mask, guidance = variant == "chroma", 0.0 if variant == "chroma" else 1.0
    before = flow_validation_loss(load_engine_model(variant), tiny_models["dataset_img"], guidance=guidance,
                                  mask=mask)
    after = flow_validation_loss(load_engine_model(variant, lora), tiny_models["dataset_img"], guidance=guidance,
                                 mask=mask)
    assert after < before, (before, after)
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1


@pytest.mark.slow
def test_flux_resume_after_sigterm_equals_an_uninterrupted_run(tiny_models, tmp_path):
    # Pixels encoded every step (no latent cache) and text encoded every step, with flips, caption shuffling and
    # input perturbation: a resume that replayed or skipped a sample or a random draw would give other weights.
    sections = {"training": {"max_train_steps": 30, "cache_latents": False, "gradient_accumulation_steps": 2,
                             "ip_noise_gamma": 0.1},
                "dataset": {"general": {"flip_aug": True, "shuffle_caption": True}},
                "flow": {"timestep_sampling": "flux_shift"}, "network": {"network_dropout": 0.1},
                "optimizer": {"lr_scheduler": "cosine", "lr_warmup_steps": 3}}
    whole = flux_config(tmp_path / "whole" / "config.toml", tiny_models, "dev", **sections)
    train_here(whole)

    parted = flux_config(tmp_path / "parted" / "config.toml", tiny_models, "dev", **sections)
    run_dir = tmp_path / "parted" / "out"
    stop_by_sigterm_then_resume(parted, run_dir, total_steps=30)
    assert_same_tensors(tmp_path / "whole" / "out" / "lora.safetensors", run_dir / "lora.safetensors",
                        rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fused_adafactor_full_training_equals_the_unfused_run(tiny_models, tmp_path):
    """optimizer.fused_backward_pass steps each weight inside backward; without clipping that is the same update, so
    the fine-tuned transformer must equal the one the ordinary optimizer step produces."""
    sections = {"training": {"max_train_steps": 4},
                "optimizer": {"optimizer_type": "Adafactor", "learning_rate": 1e-3, "lr_scheduler": "constant",
                              "max_grad_norm": 0.0, "optimizer_args": {"relative_step": False,
                                                                       "scale_parameter": False,
                                                                       "warmup_init": False}}}
    saved = {}
    for fused in (False, True):
        folder = tmp_path / ("fused" if fused else "plain")
        config = flux_config(folder / "config.toml", tiny_models, "schnell", **{
            **sections, "optimizer": {**sections["optimizer"], "fused_backward_pass": fused}})
        train_here(config, "--set", 'method="dreambooth"')
        saved[fused] = load_file(str(folder / "out" / "lora.safetensors"))
    base = load_file(str(tiny_flux_files("schnell")["model"]))
    assert saved[True].keys() == saved[False].keys() == base.keys()
    moved = max((saved[False][key] - base[key]).abs().max().item() for key in base)
    assert moved > 1e-5  # the weights trained
    for key in base:
        torch.testing.assert_close(saved[True][key], saved[False][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_two_flux_processes_with_batch_b_equal_one_process_with_batch_2b(tiny_models, tmp_path):
    """Data parallelism (two CPU processes through `accelerate launch`) trains FLUX exactly as one process with the
    doubled batch: same images per step, same noise and σ per image, gradients averaged."""
    from engine.config.io import load_config
    from engine.rundir.launch import launch_command

    single = flux_config(tmp_path / "single" / "config.toml", tiny_models, "dev", training={"max_train_steps": 4},
                         dataset={"general": {"flip_aug": True, "batch_size": 2}})
    train_here(single)
    pair = flux_config(tmp_path / "pair" / "config.toml", tiny_models, "dev", training={"max_train_steps": 4},
                       dataset={"general": {"flip_aug": True, "batch_size": 1}},
                       launch={"num_processes": 2, "multi_gpu": True, "main_process_port": 29527})
    result = subprocess.run(launch_command(load_config(pair), pair), cwd=REPO, env=engine_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [e["step"] for e in events_of(tmp_path / "pair" / "out") if e["type"] == "progress"] == [1, 2, 3, 4]
    expected = load_file(str(tmp_path / "single" / "out" / "lora.safetensors"))
    actual = load_file(str(tmp_path / "pair" / "out" / "lora.safetensors"))
    assert expected.keys() == actual.keys()
    # Summation order differs (one batch vs an all-reduce); Adam turns such last-bit differences in near-zero
    # gradients into visible ones in single elements (measured up to 3e-5 on weights of 8e-3). Another image or
    # noise would move every element by about the learning rate (2e-3).
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-4, msg=key)
        assert (actual[key] - expected[key]).abs().mean() <= 1e-6, key
    assert any(key.endswith("lora_up.weight") and actual[key].abs().max() > 0 for key in actual)


@pytest.mark.slow
def test_flux_cli_commands_and_nan_stop(tiny_models, tmp_path):
    """validate, doctor and cache-latents accept a FLUX config; the run reuses the cache; a cache entry that
    overflows the model stops the run with the batch's images named and only finite checkpoints kept."""
    import shutil

    import numpy as np

    from engine.cache.latent_files import cache_path

    dataset = tmp_path / "img"
    shutil.copytree(tiny_models["dataset_img"], dataset, ignore=shutil.ignore_patterns("*.npz"))
    config = flux_config(tmp_path / "config.toml", tiny_models, "dev", dataset={"train_data_dir": str(dataset)},
                         training={"max_train_steps": 30, "cache_latents_to_disk": True},
                         saving={"save_every_n_steps": 1})
    for command in ("validate", "doctor"):
        result = run_engine(command, str(config))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "(flux1)" in result.stdout or command == "doctor"
    result = run_engine("cache-latents", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    entries = sorted(dataset.rglob("*_flux.npz"))
    assert len(entries) == 6
    # Everything after the first batch is poisoned: finite (the cache's own check passes) but overflowing.
    for entry in entries[2:]:
        with np.load(entry, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        arrays["latents"] = np.full_like(arrays["latents"], 1e30)
        np.savez(entry, **arrays)
    assert cache_path(next(dataset.rglob("*.png")), (64, 64), "flux1").name.endswith("_64x64_flux.npz")
    result = run_engine("train", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    events = events_of(tmp_path / "out")
    assert "reused 6" in (tmp_path / "out" / "train.log").read_text(encoding="utf-8") or any(
        "reused 6" in str(event) for event in events)
    error = next(event for event in events if event["type"] == "error")
    assert error["images"] and "the loss became" in error["message"]
    for path in sorted((tmp_path / "out").glob("lora-step*.safetensors")):
        assert all(torch.isfinite(tensor).all() for tensor in load_file(str(path)).values()), path
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def _deeper_dev_model(folder: Path) -> Path:
    """The tiny dev transformer with 4 double and 4 single blocks: enough blocks to swap some (at most N − 2 of
    each kind stay swappable), everything else as the tiny files."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from engine.models.flux.transformer import Flux

    torch.manual_seed(11)
    model = Flux(replace(tiny_params("dev"), depth=4, depth_single_blocks=4))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    path = folder / "flux1-dev-deeper.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


def _bf16_losses(folder: Path, tiny_models: dict[str, Path], model_file: Path, memory: dict[str, Any]) -> list[float]:
    sections = {"training": {"max_train_steps": 6, "mixed_precision": "bf16", **memory.get("training", {})},
                "model": {"pretrained_model_name_or_path": str(model_file), **memory.get("model", {})},
                "optimizer": {"learning_rate": 5e-3, "lr_scheduler": "constant"}}
    config = flux_config(folder / "config.toml", tiny_models, "dev", **sections)
    train_here(config)
    return [event["loss"] for event in events_of(folder / "out") if event["type"] == "progress"]


@pytest.fixture(scope="module")
def plain_bf16_run(tiny_models, tmp_path_factory) -> tuple[Path, list[float]]:
    """The deeper tiny model and the losses of its plain bf16 LoRA run, the baseline of the memory options."""
    folder = tmp_path_factory.mktemp("plain_bf16")
    model_file = _deeper_dev_model(folder)
    return model_file, _bf16_losses(folder / "run", tiny_models, model_file, {})


@pytest.mark.slow
@pytest.mark.parametrize("memory", [{"training": {"blocks_to_swap": 2}},
                                    {"training": {"gradient_checkpointing": True, "cpu_offload_checkpointing": True}},
                                    {"model": {"fp8_base": True}}], ids=["blocks_to_swap", "cpu_offload", "fp8_base"])
def test_memory_options_train_as_without_them(memory, plain_bf16_run, tiny_models, tmp_path):
    """Block swapping and offloaded checkpointing change where tensors wait, not what is computed: the same losses
    as the plain bf16 run. fp8 storage rounds the frozen weights: the same losses to fp8 tolerance."""
    model_file, plain_losses = plain_bf16_run
    losses = _bf16_losses(tmp_path, tiny_models, model_file, memory)
    assert len(losses) == len(plain_losses) == 6
    if "fp8_base" in memory.get("model", {}):
        for ours, theirs in zip(losses, plain_losses, strict=True):
            assert abs(ours - theirs) <= 0.03 * abs(theirs), (losses, plain_losses)
        assert losses != plain_losses  # the weights really were rounded to fp8
        return
    # bf16 matmuls of the same numbers from other memory (a swapped-in copy) may round differently: bf16 tolerance
    # (torch.testing's for bfloat16); measured 4e-4 relative on the losses, 0 on the first step.
    # (Weights after Adam are not compared: Adam turns last-bit gradient differences near 0 into whole steps.)
    assert losses[0] == plain_losses[0]
    assert losses == pytest.approx(plain_losses, rel=2e-3)
    log = (tmp_path / "out" / "train.log").read_text(encoding="utf-8")
    if "blocks_to_swap" in memory["training"]:
        assert "block swap: 2 blocks" in log, log


def test_flux_latent_cache_holds_the_aes_own_output_for_pixels_in_minus_one_to_one(tiny_models, tmp_path):
    """The AE sees 2·p/255 − 1 (never [0, 1]); its 16-channel output is cached as it is (float32, `_flux.npz`) and
    training shifts and scales it: (z − 0.1159)·0.3611."""
    import shutil

    import numpy as np
    from PIL import Image

    from engine.cache.latent_files import cache_path, load_entry
    from engine.cache.latents import build_latent_cache, jobs_from_scan
    from engine.config.io import validate_config
    from engine.data.buckets import BucketAssignment
    from engine.data.scan import scan_config
    from engine.data.transforms import prepare, to_model_tensor
    from engine.models.flux.ae import load_flux_ae

    root = Path(shutil.copytree(tiny_models["dataset_img"], tmp_path / "img", ignore=shutil.ignore_patterns("*.npz")))
    config = validate_config({"model": {"model_family": "flux1"}, "dataset": {
        "train_data_dir": str(root), "general": {"resolution": 64, "bucket_reso_steps": 16, "min_bucket_reso": 64,
                                                 "max_bucket_reso": 128}}}, check_packages=False)
    jobs = jobs_from_scan(scan_config(config, tmp_path))
    ae = load_flux_ae(tiny_flux_files("dev")["ae"], family="flux1")
    assert (ae.scaling_factor, ae.shift_factor) == (0.3611, 0.1159)
    report = build_latent_cache(jobs, ae, batch_size=1, workers=1)
    assert (report.encoded, report.failed) == (len(jobs), [])
    for job in jobs:
        record = job.record
        entry = load_entry(cache_path(record.path, record.bucket, "flux1"))
        assert cache_path(record.path, record.bucket, "flux1").name.endswith("_flux.npz")
        pixels = prepare(record.path, BucketAssignment(record.bucket, record.resized, 0.0)).pixels
        tensor = to_model_tensor(pixels)
        image = np.asarray(Image.open(record.path).convert("RGB"))
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0 and tensor.min() < 0  # [-1, 1], not [0, 1]
        if image.shape[:2] == pixels.shape[:2]:  # not resized: the exact 2·p/255 − 1 mapping
            expected = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
            torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0)
        with torch.no_grad():
            direct = ae.vae.encode(tensor[None]).latent_dist.mode()[0]
        assert entry.latents.shape == (16, record.bucket[1] // 8, record.bucket[0] // 8)
        assert np.array_equal(entry.latents, direct.numpy())
        normalized = ae.normalize(torch.from_numpy(entry.latents))
        torch.testing.assert_close(normalized, (direct - 0.1159) * 0.3611)
