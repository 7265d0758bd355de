"""The SD3 side of `bench/train_overhead.py --family sd3`: the bench model, the engine's config, and the minimal
hand-written SD3 LoRA loop it is compared with.

The bench MMDiT is larger than the tests' tiny one (2 joint blocks, hidden 128), whose step is so short that the
engine's fixed cost per step would be most of it: SD3.5 medium's architecture (qk-norm, image-only attn2 in the
first blocks, adaLN joint blocks, the stored sincos position table) at depth 4, so hidden 256 and 4 heads of 64,
attn2 in blocks 0-1, 9.93 M parameters, written as a SAI single file (`model.diffusion_model.*` from
`engine.models.sd3.mmdit.MMDiT`, perturbed like the tests', plus tests/sd3_tiny.py's 16-channel VAE as
`first_stage_model.*`). Its text inputs are 64 wide (context) and 64 (pooled), so tests/sd3_tiny.py's tiny CLIP-L,
CLIP-G, T5 and T5 tokenizer go with it unchanged. Images: the tiny dataset (tools/make_tiny_model.py), 64 px
without buckets, so every batch of both loops is 16 image tokens + 77 + 32 text tokens.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flux_overhead import bench_files, cached_inputs, lora_config, lora_training
from flux_tiny import _perturbed
from sd3_tiny import SAI_PREFIX, tiny_sd3_files, tiny_vae
from timing import StepClock, minimal_update

SEED = 2150


def bench_params() -> Any:
    from engine.models.sd3.params import tiny_params

    return replace(tiny_params("5-medium"), depth=4, attn2_layers=(0, 1))


def write_bench_model(path: Path) -> Path:
    """The bench MMDiT and the tiny VAE as one SAI single file."""
    from safetensors.torch import save_file

    from engine.models.ldm_keys import vae_to_ldm
    from engine.models.sd3.mmdit import MMDiT

    torch.manual_seed(SEED)
    model = _perturbed(MMDiT(bench_params()), SEED)
    state = {SAI_PREFIX + key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    state.update({key: tensor.contiguous() for key, tensor in vae_to_ldm(tiny_vae().state_dict()).items()})
    save_file(state, str(path))
    return path


def sd3_models(folder: Path, dataset_img: Path) -> dict[str, Path]:
    """The bench model (written into `folder`) with the tiny SD3.5 medium files' encoders and tokenizer (built under
    `folder` too unless $ATELIER_TINY_MODELS keeps them)."""
    return bench_files(folder, dataset_img, lambda: tiny_sd3_files("5-medium"), "sd3",
                       lambda: write_bench_model(folder / "sd3.5-medium-bench.safetensors"))


def sd3_config(path: Path, models: dict[str, Path], steps: int, batch_size: int) -> Path:
    """The engine's run: the same LoRA, optimizer, data and caches as :func:`baseline_step_time`."""
    return lora_config(path, models, "sd3", steps, batch_size, clip_l=str(models["clip_l"]),
                       clip_g=str(models["clip_g"]), t5xxl=str(models["t5xxl"]))


def baseline_step_time(models: dict[str, Path], config_path: Path, steps: int, batch_size: int,
                       warmup: int) -> dict[str, float]:
    """Seconds per step (timing.step_stats) of a minimal SD3 LoRA loop (spec 8.4 with the run's flow settings): ε,
    t, σ, x_σ, forward, x̂0 = x_σ − σ·p, weighted x0 MSE, backward, clip, AdamW. One generator for the whole loop
    (the engine seeds one per sample)."""
    from engine.config.io import load_config
    from engine.models.loading import load_model
    from engine.train.flow import loss_weighting
    from engine.train.sd3_objective import SD3Settings, noisy_input, sample_timesteps, sigmas_of, x0_prediction

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = SD3Settings.from_config(load_config(config_path))
    model = load_model(models["sd3"], family="sd3", clip_l=models["clip_l"], clip_g=models["clip_g"],
                       t5xxl=models["t5xxl"], tokenizer_cache_dir=models["t5_tokenizer"])
    latents, context, pooled = cached_inputs(model, models["dataset_img"], device)
    mmdit = model.unet.to(device).requires_grad_(False)
    parameters, optimizer = lora_training(mmdit, model.text.encoders, "sd3", device)
    generator = torch.Generator().manual_seed(0)
    clock = StepClock()
    clock.mark()
    for _ in range(steps):
        index = torch.randint(0, latents.shape[0], (batch_size,), generator=generator)
        x0, ctx, y = latents[index], context[index], pooled[index]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        timesteps = sample_timesteps(batch_size, settings, generator, device)
        sigmas = sigmas_of(timesteps)
        noisy = noisy_input(x0, noise, sigmas)
        prediction = x0_prediction(mmdit(x=noisy, t=timesteps, y=y, context=ctx), noisy, sigmas)
        per_sample = ((prediction - x0) ** 2).mean(dim=(1, 2, 3))
        loss = (loss_weighting(settings.weighting_scheme, sigmas) * per_sample).mean()
        minimal_update(loss, parameters, optimizer, device, clock)
    return clock.stats(warmup)
