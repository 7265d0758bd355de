"""SD3 medium, SD3.5 medium and SD3.5 large LoRA training end to end through the CLI, on tiny models of the real
architectures written as SAI single files (tests/sd3_tiny.py): it learns, its file converted to diffusers' names
loads in StableDiffusion3Pipeline with the engine's own output, its keys are the ones ComfyUI maps, a run stopped by
SIGTERM resumes to the uninterrupted run's weights, cached text-encoder outputs train as encoding every step, the
memory options train as without them and a NaN loss stops the run keeping only finite checkpoints.
(Full fine-tuning end to end: tests/test_sd3_finetune_save.py.)"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_cli import run_json
from safetensors import safe_open
from safetensors.torch import load_file
from sd3_tiny import SAI_PREFIX, tiny_sd3_files, write_tiny_sd3_diffusers
from train_helpers import (
    assert_same_tensors,
    dataset_batch,
    events_of,
    run_engine,
    stop_by_sigterm_then_resume,
    train_here,
    write_config,
)

MAIN = "5-medium"  # the module-scoped run: SD3.5 medium has every kind of block (qk-norm, attn2 on block 0)
SIGMAS = (0.2, 0.4, 0.6, 0.8)  # the fixed noise levels of the validation loss
T5_LENGTH = 16  # t5xxl_max_token_length of every run and check: the tiny T5 needs no more
PROMPT = "sks dog --w 64 --h 64 --s 2 --l 4 --d 5"
ARCHITECTURES = {"medium": "stable-diffusion-3-medium/lora", "5-medium": "stable-diffusion-3-5-medium/lora",
                 "5-large": "stable-diffusion-3-5-large/lora"}
FAST = {"learning_rate": 5e-3, "lr_scheduler": "constant"}


def sd3_config(path: Path, tiny_models: dict[str, Path], variant: str = MAIN, **sections: Any) -> Path:
    """A small SD3 LoRA run: the tiny files of `variant` (separate CLIP-L, CLIP-G and T5), 64 px in buckets of 16,
    T5 padded to 16 tokens, latents cached in memory."""
    files = tiny_sd3_files(variant)
    model = {"model_family": "sd3", "v_parameterization": False, "clip_l": str(files["clip_l"]),
             "clip_g": str(files["clip_g"]), "t5xxl": str(files["t5xxl"]),
             "tokenizer_cache_dir": str(files["t5_tokenizer"]), "t5xxl_max_token_length": T5_LENGTH}
    base: dict[str, Any] = {"model": model, "dataset": {"general": {"bucket_reso_steps": 16}},
                            "training": {"cache_latents": True}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return write_config(path, {"sd3": files["model"], "dataset_img": tiny_models["dataset_img"]}, "sd3", **base)


def train(config: Path) -> Path:
    """`python -m engine train config` in this process (the runs' subject is not the process); returns its output
    folder."""
    return train_here(config)


@pytest.fixture(scope="module")
def main_run(tiny_models, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd3_main_run")
    config = sd3_config(folder / "config.toml", tiny_models, training={"max_train_steps": 30}, optimizer=FAST,
                        saving={"save_every_n_steps": 15, "save_state": True},
                        sampling={"sample_every_n_steps": 15, "sample_prompts": [PROMPT]})
    return train(config)


# --- the engine's own model with a LoRA file ---------------------------------------------------------------------


def load_engine_model(variant: str, lora: Path | None = None) -> Any:
    """The tiny SD3 model through engine.models.loading, with the kohya LoRA file applied (as the trainer builds
    the network: family "sd3", T5 only when the file has lora_te3_ modules)."""
    from engine.models.loading import load_model
    from engine.networks.lora import create_lora_network

    files = tiny_sd3_files(variant)
    model = load_model(files["model"], family="sd3", clip_l=files["clip_l"], clip_g=files["clip_g"],
                       t5xxl=files["t5xxl"], tokenizer_cache_dir=files["t5_tokenizer"])
    if lora is not None:
        tensors = load_file(str(lora))
        train_t5 = any(key.startswith("lora_te3_") for key in tensors)
        network = create_lora_network(model.unet, model.text.encoders, "sd3", dim=4, alpha=4.0,
                                      network_args={"train_t5xxl": "True"} if train_t5 else None)
        network.load_kohya_state_dict(tensors)
        network.apply_to()
    return model


def encode(model: Any, captions: list[str]) -> Any:
    from engine.models.text_encoding import encode_captions

    return encode_captions(model.text, captions, t5xxl_max_token_length=T5_LENGTH)


def sd3_validation_loss(model: Any, image_dir: Path) -> float:
    """Mean velocity loss on the dataset at fixed σ with fixed noise: x_σ = σ·ε + (1 − σ)·x0, the MMDiT at t = 1000·σ
    predicting ε − x0 (the same work for every model)."""
    pixels, captions = dataset_batch(image_dir)
    with torch.no_grad():
        latents = model.vae.normalize(model.vae.vae.encode(pixels).latent_dist.mean)
        encoded = encode(model, captions)
        generator = torch.Generator().manual_seed(0)
        losses = []
        for sigma in SIGMAS:
            noise = torch.randn(latents.shape, generator=generator)
            noisy = sigma * noise + (1 - sigma) * latents
            prediction = model.unet(x=noisy, t=torch.full((latents.shape[0],), sigma * 1000), y=encoded.pooled,
                                    context=encoded.hidden_states)
            losses.append(torch.nn.functional.mse_loss(prediction, noise - latents).item())
    return sum(losses) / len(losses)


def assert_learns(variant: str, lora: Path, image_dir: Path) -> None:
    before = sd3_validation_loss(load_engine_model(variant), image_dir)
    after = sd3_validation_loss(load_engine_model(variant, lora), image_dir)
    assert after < before * 0.97, (before, after)


def assert_kohya_names_and_metadata(lora: Path, variant: str) -> dict[str, Any]:
    """The reference's rule (spec §8.6, §5.5, §8.9): every lora_unet_ name is `lora_unet_` + an SAI module path
    (dots → underscores) whose `.weight` the base file holds under `model.diffusion_model.` (ComfyUI's generic
    map); lora_te1_ / lora_te2_ names are CLIP-L's / CLIP-G's `text_model.encoder.layers…` Linears; sd-scripts'
    metadata for the variant and no prediction type (meaningless for flow matching)."""
    files = tiny_sd3_files(variant)
    with safe_open(str(lora), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    names = {key.split(".", 1)[0] for key in keys}
    with safe_open(str(files["model"]), "pt") as handle:
        model_keys = list(handle.keys())
    model_weights = {key.removeprefix(SAI_PREFIX).removesuffix(".weight").replace(".", "_") for key in model_keys
                     if key.startswith(SAI_PREFIX) and key.endswith(".weight")}
    unet = {name.removeprefix("lora_unet_") for name in names if name.startswith("lora_unet_")}
    assert unet and unet <= model_weights, unet - model_weights
    # sd-scripts' default targets: every Linear of every context_block and x_block, nothing else
    linears = {name for name in model_weights if name.startswith("joint_blocks_")
               and name.endswith(("_qkv", "_proj", "_fc1", "_fc2", "_adaLN_modulation_1"))}
    assert unet == linears, unet ^ linears
    assert "joint_blocks_1_context_block_adaLN_modulation_1" in unet  # the last (pre-only) context block's adaLN
    assert "joint_blocks_1_context_block_attn_proj" not in unet  # ...which has no attn.proj
    assert ("joint_blocks_0_x_block_attn2_qkv" in unet) == (variant == "5-medium")
    for prefix, encoder in (("lora_te1_", "clip_l"), ("lora_te2_", "clip_g")):
        text = {name.removeprefix(prefix) for name in names if name.startswith(prefix)}
        layers = {key.split(".")[3] for key in load_file(str(files[encoder])) if key.startswith(
            "text_model.encoder.layers.")}
        expected = {f"text_model_encoder_layers_{layer}_{part}" for layer in layers for part in (
            "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
        assert text == expected, (prefix, text ^ expected)
    assert not any(name.startswith("lora_te3_") for name in names)  # T5 trains only with train_t5xxl
    assert metadata["ss_network_module"] == "networks.lora_sd3"
    assert metadata["ss_base_model_version"] == variant
    assert metadata["modelspec.architecture"] == ARCHITECTURES[variant]
    assert "modelspec.prediction_type" not in metadata
    return metadata


# --- the main run: SD3.5 medium ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sd3_lora_learns(main_run, tiny_models):
    assert_learns(MAIN, main_run / "lora.safetensors", tiny_models["dataset_img"])


@pytest.mark.slow
def test_sd3_run_reports_saves_and_samples(main_run):
    events = events_of(main_run)
    start = next(event for event in events if event["type"] == "start")
    assert start["family"] == "sd3"
    assert {"progress", "sample", "checkpoint", "done"} <= {event["type"] for event in events}
    assert events[-1]["type"] == "done" and events[-1]["ok"]
    progress = [event for event in events if event["type"] == "progress"]
    assert progress[-1]["lr_names"] == ["unet", "text_encoder1", "text_encoder2"]  # CLIP-L, CLIP-G; T5 frozen
    assert (main_run / "lora-step00000015.safetensors").is_file() and (main_run / "lora-state").is_dir()
    samples = sorted((main_run / "samples").glob("*.png"))
    assert len(samples) == 2
    from PIL import Image

    assert Image.open(samples[0]).size == (64, 64)


@pytest.mark.slow
def test_sd3_lora_keys_and_metadata_follow_kohya_and_comfyui(main_run):
    metadata = assert_kohya_names_and_metadata(main_run / "lora.safetensors", MAIN)
    assert metadata["ss_weighting_scheme"] == "uniform" and metadata["ss_apply_lg_attn_mask"] == "False"


@pytest.mark.slow
def test_trained_lora_converted_to_diffusers_names_loads_in_the_sd3_pipeline(main_run, tmp_path, capsys):
    """`lora convert --to diffusers` on the trained file; StableDiffusion3Pipeline.load_lora_weights on it gives the
    text encodings (CLIP-L and CLIP-G LoRAs; T5 had none) and the transformer output the engine gives."""
    from diffusers import StableDiffusion3Pipeline

    lora = main_run / "lora.safetensors"
    converted = tmp_path / "lora-diffusers.safetensors"
    code, report = run_json(capsys, "convert", "--to", "diffusers", lora, "-o", converted)  # the CLI, in-process
    assert code == 0, report
    assert report["family"] == "sd3" and not report["dropped"], report  # no lora_te3_: nothing left out
    with safe_open(str(converted), "pt") as handle:
        prefixes = {key.split(".", 1)[0] for key in handle.keys()}  # noqa: SIM118
    assert prefixes == {"transformer", "text_encoder", "text_encoder_2"}

    pipe = StableDiffusion3Pipeline.from_pretrained(str(write_tiny_sd3_diffusers(tiny_sd3_files(MAIN),
                                                                                 tmp_path / "pipe")),
                                                    local_files_only=True)
    pipe.load_lora_weights(str(converted))
    ours, base = load_engine_model(MAIN, lora), load_engine_model(MAIN)
    captions = ["sks dog", "a red square, white background"]
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    timesteps = torch.tensor([300.0, 900.0])
    with torch.no_grad():
        encoded = encode(ours, captions)
        context, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                                   max_sequence_length=T5_LENGTH)
        assert (encoded.hidden_states - context).abs().max() <= 1e-5
        assert (encoded.pooled - pooled).abs().max() <= 1e-5
        assert (encoded.pooled - encode(base, captions).pooled).abs().max() > 1e-4  # the CLIP LoRAs act
        engine_out = ours.unet(x=latents, t=timesteps, y=encoded.pooled, context=encoded.hidden_states)
        diffusers_out = pipe.transformer(hidden_states=latents, encoder_hidden_states=encoded.hidden_states,
                                         pooled_projections=encoded.pooled, timestep=timesteps).sample
        base_out = base.unet(x=latents, t=timesteps, y=encoded.pooled, context=encoded.hidden_states)
    assert (engine_out - diffusers_out).abs().max() <= 1e-5
    assert (engine_out - base_out).abs().max() > 1e-4  # the transformer LoRA acts: the comparison means something


# --- the other variants -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["medium", "5-large"])
def test_sd3_medium_and_sd35_large_train_with_their_own_names(variant, tiny_models, tmp_path):
    """SD3 medium (no qk-norm) with scaled position tables and SD3.5 large (qk-norm, no attn2) train, save with
    their own names and metadata and sample."""
    flow = {"enable_scaled_pos_embed": True} if variant == "medium" else {}
    config = sd3_config(tmp_path / "config.toml", tiny_models, variant, training={"max_train_steps": 20},
                        optimizer=FAST, flow=flow,
                        sampling={"sample_every_n_steps": 20, "sample_prompts": [PROMPT]})
    out = train(config)
    assert_kohya_names_and_metadata(out / "lora.safetensors", variant)
    assert_learns(variant, out / "lora.safetensors", tiny_models["dataset_img"])
    assert len(list((out / "samples").glob("*.png"))) == 1


# --- resume ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sd3_resume_after_sigterm_equals_an_uninterrupted_run(tiny_models, tmp_path):
    # Every random draw of SD3 training: per-encoder text dropout, logit-normal u shifted by 3, the random position
    # window, network dropout; pixels encoded every step (no latent cache) with flips and shuffled captions. A resume
    # that replayed or skipped a sample or a draw would give other weights.
    sections = {"training": {"max_train_steps": 30, "cache_latents": False, "gradient_accumulation_steps": 2,
                             "clip_l_dropout_rate": 0.3, "clip_g_dropout_rate": 0.3, "t5_dropout_rate": 0.3},
                "dataset": {"general": {"flip_aug": True, "shuffle_caption": True}},
                "flow": {"weighting_scheme": "logit_normal", "training_shift": 3.0, "pos_emb_random_crop_rate": 0.5},
                "network": {"network_dropout": 0.1},
                "optimizer": {"lr_scheduler": "cosine", "lr_warmup_steps": 3}}
    whole = sd3_config(tmp_path / "whole" / "config.toml", tiny_models, **sections)
    train(whole)
    parted = sd3_config(tmp_path / "parted" / "config.toml", tiny_models, **sections)
    run_dir = tmp_path / "parted" / "out"
    stop_by_sigterm_then_resume(parted, run_dir, total_steps=30)
    assert_same_tensors(tmp_path / "whole" / "out" / "lora.safetensors", run_dir / "lora.safetensors",
                        rtol=1e-5, atol=1e-6)


# --- caches and the NaN stop -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sd3_cache_latents_cli_and_nan_stop(tiny_models, tmp_path):
    """cache-latents writes `_<W>x<H>_sd3.npz` entries the run
    reuses; a cache entry that overflows the model stops the run with the batch's images named and only finite
    checkpoints kept."""
    import numpy as np

    dataset = tmp_path / "img"
    shutil.copytree(tiny_models["dataset_img"], dataset, ignore=shutil.ignore_patterns("*.npz"))
    config = sd3_config(tmp_path / "config.toml", tiny_models, dataset={"train_data_dir": str(dataset)},
                        training={"max_train_steps": 30, "cache_latents_to_disk": True},
                        saving={"save_every_n_steps": 1})
    result = run_engine("cache-latents", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    entries = sorted(dataset.rglob("*.npz"))
    assert len(entries) == 6 and all(re.search(r"_\d+x\d+_sd3\.npz$", path.name) for path in entries), entries
    # One image's entry is poisoned: finite (the cache's own check passes) but overflowing. With seed 3 the first
    # batches do not hold it, so the run saves some steps before it meets it.
    poisoned = next(entry for entry in entries if entry.name.startswith("04_yellow_square"))
    with np.load(poisoned, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["latents"] = np.full_like(arrays["latents"], 1e30)
    np.savez(poisoned, **arrays)
    result = run_engine("train", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    out = tmp_path / "out"
    assert "reused 6" in (out / "train.log").read_text(encoding="utf-8")
    events = events_of(out)
    error = next(event for event in events if event["type"] == "error")
    assert "the loss became" in error["message"] and any("04_yellow_square" in image for image in error["images"])
    failed_at = int(re.search(r"at step (\d+)", error["message"]).group(1))
    checkpoints = sorted(out.glob("lora-step*.safetensors"))
    assert failed_at > 1, error  # a clean step came first, so something was saved
    assert checkpoints[-1].name == f"lora-step{failed_at - 1:08d}.safetensors", (failed_at, checkpoints)
    for path in checkpoints:
        assert all(torch.isfinite(tensor).all() for tensor in load_file(str(path)).values()), path
    assert not (out / "lora.safetensors").exists()


@pytest.mark.slow
def test_sd3_cached_text_encoder_outputs_train_as_encoding_every_step(tiny_models, tmp_path):
    """training.cache_text_encoder_outputs (frozen encoders, no text dropout) trains the LoRA that encoding every
    step trains; the cache's disk entries for SD3 are `<stem>_te_outputs_sd3.npz` holding what encode_captions
    gives."""
    from engine.cache.text_encoder import build_text_encoder_cache, cache_path, jobs_from_scan, load_entry
    from engine.config.io import load_config
    from engine.data.scan import scan_config
    from engine.models.text_encoding import encoding_options

    saved = {}
    for cached in (True, False):
        folder = tmp_path / ("cached" if cached else "every-step")
        config = sd3_config(folder / "config.toml", tiny_models, network={"train_unet_only": True},
                            training={"max_train_steps": 8, "cache_text_encoder_outputs": cached}, optimizer=FAST)
        out = train(config)
        if cached:
            assert "text encoder outputs: " in (out / "train.log").read_text(encoding="utf-8")
        saved[cached] = out / "lora.safetensors"
    assert not any(key.startswith("lora_te") for key in load_file(str(saved[True])))
    # The cache encodes the distinct captions in one sorted batch, training its micro-batch of 2: other batches may
    # round the last bits differently (measured: identical on CPU); another caption or a dropped encoder would move
    # every weight by about the learning rate, 5e-3.
    assert_same_tensors(saved[False], saved[True], rtol=1e-5, atol=1e-6)

    dataset = tmp_path / "img"
    shutil.copytree(tiny_models["dataset_img"], dataset, ignore=shutil.ignore_patterns("*.npz"))
    config_path = sd3_config(tmp_path / "disk" / "config.toml", tiny_models, dataset={"train_data_dir": str(dataset)})
    config = load_config(config_path, check_packages=False)
    jobs = jobs_from_scan(scan_config(config, config_path.parent))
    model = load_engine_model(MAIN)
    report = build_text_encoder_cache(jobs, model.text, **encoding_options(config.model, MAIN), to_disk=True)
    assert report.encoded == len(jobs) == 6 and not report.failed
    entries = sorted(dataset.rglob("*_te_outputs_sd3.npz"))
    assert [path.name for path in entries] == sorted(f"{job.record.path.stem}_te_outputs_sd3.npz" for job in jobs)
    job = jobs[0]
    entry = load_entry(cache_path(job.record.path, "sd3"))
    with torch.no_grad():
        encoded = encode(model, [job.caption])
    assert entry.hidden_states.shape == (77 + T5_LENGTH, 64) and entry.pooled.shape == (64,)
    torch.testing.assert_close(torch.from_numpy(entry.hidden_states), encoded.hidden_states[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(entry.pooled), encoded.pooled[0], rtol=1e-5, atol=1e-6)


# --- memory options ------------------------------------------------------------------------------------------------


def _deeper_model(folder: Path) -> Path:
    """The tiny SD3.5 medium file with 4 joint blocks (hidden 256, 4 heads): SD3 swaps at most depth − 2 blocks, so
    the 2-block tiny model could swap none. The VAE is the tiny file's."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from engine.models.sd3.mmdit import MMDiT
    from engine.models.sd3.params import tiny_params

    torch.manual_seed(13)
    model = MMDiT(replace(tiny_params(MAIN), depth=4))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    state = {SAI_PREFIX + key: value.contiguous() for key, value in model.state_dict().items()}
    state.update({key: value for key, value in load_file(str(tiny_sd3_files(MAIN)["model"])).items()
                  if key.startswith("first_stage_model.")})
    path = folder / "sd3.5-medium-deeper.safetensors"
    save_file(state, str(path))
    return path


def _bf16_losses(folder: Path, tiny_models: dict[str, Path], model_file: Path, memory: dict[str, Any]) -> list[float]:
    sections = {"training": {"max_train_steps": 6, "mixed_precision": "bf16", **memory.get("training", {})},
                "model": {"pretrained_model_name_or_path": str(model_file), **memory.get("model", {})},
                "optimizer": FAST}
    out = train(sd3_config(folder / "config.toml", tiny_models, **sections))
    return [event["loss"] for event in events_of(out) if event["type"] == "progress"]


@pytest.fixture(scope="module")
def plain_bf16_run(tiny_models, tmp_path_factory) -> tuple[Path, list[float]]:
    """The deeper tiny model and the losses of its plain bf16 LoRA run, the baseline of the memory options."""
    folder = tmp_path_factory.mktemp("sd3_plain_bf16")
    model_file = _deeper_model(folder)
    return model_file, _bf16_losses(folder / "run", tiny_models, model_file, {})


@pytest.mark.slow
@pytest.mark.parametrize("memory", [{"training": {"blocks_to_swap": 2}}, {"model": {"fp8_base": True}},
                                    {"training": {"gradient_checkpointing": True, "cpu_offload_checkpointing": True}}],
                         ids=["blocks_to_swap", "fp8_base", "cpu_offload_checkpointing"])
def test_sd3_memory_options_train_as_without_them(memory, plain_bf16_run, tiny_models, tmp_path):
    """Swapping depth − 2 joint blocks changes where they wait, not what is computed: the plain bf16 run's losses.
    fp8 storage rounds the frozen weights: the same losses to fp8 tolerance."""
    model_file, plain_losses = plain_bf16_run
    losses = _bf16_losses(tmp_path, tiny_models, model_file, memory)
    assert len(losses) == len(plain_losses) == 6
    if "fp8_base" in memory.get("model", {}):
        for ours, theirs in zip(losses, plain_losses, strict=True):
            assert abs(ours - theirs) <= 0.03 * abs(theirs), (losses, plain_losses)
        assert losses != plain_losses  # the weights really were rounded to fp8
        return
    # bf16 matmuls of the same numbers from other memory may round differently: bf16 tolerance (as FLUX's test).
    assert losses[0] == plain_losses[0]
    assert losses == pytest.approx(plain_losses, rel=2e-3)
    if "blocks_to_swap" in memory.get("training", {}):
        log = (tmp_path / "out" / "train.log").read_text(encoding="utf-8")
        assert "block swap: 2 blocks" in log, log


@pytest.mark.slow
def test_sd3_finetuning_with_swapped_blocks_equals_the_run_without(tiny_models, tmp_path):
    """Full fine-tuning with blocks_to_swap (optimizer.fused_backward_pass steps each weight inside backward, then
    the swapped blocks' host copies are refreshed): the saved MMDiT equals the one trained without swapping. The
    timestep and pooled-text embedders sum their gradients over every block, in an order swapping changes, so they
    match to float32 rounding only; the rest bit for bit is not promised either, hence the tolerance."""
    model_file = _deeper_model(tmp_path)
    saved = {}
    for swap in (0, 2):
        sections = {"training": {"max_train_steps": 3, "blocks_to_swap": swap},
                    "model": {"pretrained_model_name_or_path": str(model_file)},
                    "optimizer": {"optimizer_type": "Adafactor", "learning_rate": 1e-3, "lr_scheduler": "constant",
                                  "text_encoder_lr": 0.0, "max_grad_norm": 0.0, "fused_backward_pass": True,
                                  "optimizer_args": {"relative_step": False, "scale_parameter": False,
                                                     "warmup_init": False}},
                    "saving": {"output_name": "model", "save_model_as": "safetensors"}}
        out = train(sd3_config(tmp_path / f"swap{swap}" / "config.toml", tiny_models, method="dreambooth",
                               **sections))
        if swap:
            assert "block swap: 2 blocks" in (out / "train.log").read_text(encoding="utf-8")
        saved[swap] = load_file(str(out / "model.safetensors"))
    base = load_file(str(model_file))
    assert any(not torch.equal(saved[0][key], base[key]) for key in base)  # it trained
    for key in base:
        torch.testing.assert_close(saved[2][key], saved[0][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_sd3_finetuning_retention_removes_the_text_encoder_files_with_their_checkpoint(tiny_models, tmp_path):
    """saving.save_last_n_steps removes an older checkpoint together with the CLIP-L / CLIP-G files saved beside
    it, and keeps the newer ones' (the siblings are the run's own files too; before, they stayed behind)."""
    sections = {"training": {"max_train_steps": 3},
                "optimizer": {"learning_rate": 1e-3, "text_encoder_lr": 1e-4, "lr_scheduler": "constant"},
                "saving": {"output_name": "model", "save_model_as": "safetensors", "save_every_n_steps": 1,
                           "save_last_n_steps": 1}}
    out = train(sd3_config(tmp_path / "config.toml", tiny_models, method="dreambooth", **sections))
    names = {path.name for path in out.glob("*.safetensors")}
    # sd-scripts' rule: at step 3, saves older than 3 - 1 steps go (step 1), each with its siblings
    kept = {f"model{stem}{part}.safetensors" for stem in ("-step00000002", "-step00000003", "")
            for part in ("", "_clip_l", "_clip_g")}
    assert names == kept, sorted(names)
