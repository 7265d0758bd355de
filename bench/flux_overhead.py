"""The FLUX.1 side of `bench/train_overhead.py --family flux1`: the bench model, the engine's config, and the minimal
hand-written flow-matching LoRA loop it is compared with.

The bench transformer is larger than the tests' tiny one (hidden 64, 2 + 2 blocks), whose step is so short that the
engine's fixed cost per step would be most of it: FLUX.1 dev's architecture (guidance input, double and single
stream blocks, 3-axis RoPE) at hidden 256, 4 heads of 64 (RoPE axes 8/28/28), 4 double + 4 single blocks, 13.9 M
parameters, written as a BFL single file from `engine.models.flux.transformer.Flux` and perturbed like the tests'
(tests/flux_tiny.py). Its text inputs are 32 wide, so tests/flux_tiny.py's tiny CLIP-L, T5, T5 tokenizer and
16-channel AE go with it unchanged. Images: the tiny dataset (tools/make_tiny_model.py), 64 px without buckets, so
every batch of both loops is 16 image tokens + 32 T5 tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flux_tiny import _perturbed, tiny_flux_files
from timing import StepClock, minimal_update
from train_helpers import dataset_batch, write_config

RESOLUTION = 64
T5_LENGTH = 32
LORA_RANK = 4
SEED = 2100


def bench_params() -> Any:
    from engine.models.flux.params import FluxParams

    return FluxParams(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=256, num_heads=4, depth=4,
                      depth_single_blocks=4, axes_dim=(8, 28, 28), guidance_embed=True)


def write_bench_transformer(path: Path) -> Path:
    from safetensors.torch import save_file

    from engine.models.flux.transformer import Flux

    torch.manual_seed(SEED)
    model = _perturbed(Flux(bench_params()), SEED)
    save_file({key: tensor.contiguous() for key, tensor in model.state_dict().items()}, str(path))
    return path


def flux_models(folder: Path, dataset_img: Path) -> dict[str, Path]:
    """The bench transformer (written into `folder`) with the tiny dev files' encoders, AE and tokenizer (built
    under `folder` too unless $ATELIER_TINY_MODELS keeps them)."""
    return bench_files(folder, dataset_img, lambda: tiny_flux_files("dev"), "flux1",
                       lambda: write_bench_transformer(folder / "flux1-dev-bench.safetensors"))


def bench_files(folder: Path, dataset_img: Path, tiny_files: Callable[[], Mapping[str, Path]], family: str,
                write_model: Callable[[], Path]) -> dict[str, Path]:
    """A flow family's bench files: the tiny model's (built under `folder` unless $ATELIER_TINY_MODELS keeps them),
    the bench model written into `folder` as `family`, and the dataset."""
    os.environ.setdefault("ATELIER_TINY_MODELS", str(folder / "tiny"))
    files = dict(tiny_files())
    folder.mkdir(parents=True, exist_ok=True)
    files[family] = write_model()
    files["dataset_img"] = dataset_img
    return files


def flux_config(path: Path, models: dict[str, Path], steps: int, batch_size: int) -> Path:
    """The engine's run: the same LoRA, optimizer, data and caches as :func:`baseline_step_time`."""
    return lora_config(path, models, "flux1", steps, batch_size, clip_l=str(models["clip_l"]),
                       t5xxl=str(models["t5xxl"]), ae=str(models["ae"]))


def lora_config(path: Path, models: dict[str, Path], family: str, steps: int, batch_size: int,
                **model: Any) -> Path:
    """A flow family's bench run (FLUX's, SD3's): `model` (its component files) plus the T5 tokenizer and length,
    and the LoRA, optimizer, data and caches both hand-written loops mirror."""
    return write_config(
        path, models, family,
        model={"v_parameterization": False, **model, "tokenizer_cache_dir": str(models["t5_tokenizer"]),
               "t5xxl_max_token_length": T5_LENGTH},
        network={"network_dim": LORA_RANK, "network_alpha": float(LORA_RANK), "train_unet_only": True},
        dataset={"general": {"batch_size": batch_size, "resolution": RESOLUTION, "enable_bucket": False,
                             "bucket_reso_steps": 16}},
        optimizer={"learning_rate": 1e-4, "lr_scheduler": "constant"},
        training={"max_train_steps": steps, "cache_latents": True, "cache_text_encoder_outputs": True,
                  "mixed_precision": "no"},
    )


def cached_inputs(model: Any, image_dir: Path, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized AE/VAE latents, the text encoders' hidden states (FLUX: T5; SD3: CLIP-L + CLIP-G, then T5) and
    pooled outputs of the dataset's images and captions."""
    from engine.models.text_encoding import encode_captions

    pixels, captions = dataset_batch(image_dir, RESOLUTION)
    with torch.no_grad():
        latents = model.vae.normalize(model.vae.vae.encode(pixels).latent_dist.mean)
        encoded = encode_captions(model.text, captions, t5xxl_max_token_length=T5_LENGTH)
    return latents.to(device), encoded.hidden_states.to(device), encoded.pooled.to(device)


def baseline_step_time(models: dict[str, Path], steps: int, batch_size: int, warmup: int) -> dict[str, float]:
    """Seconds per step (timing.step_stats) of a minimal flow-matching LoRA loop: σ, x_σ, pack, forward, velocity
    MSE, backward, clip, AdamW. One generator for the whole loop (the engine seeds one per sample)."""
    from engine.models.loading import load_model
    from engine.train import flow

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(models["flux1"], family="flux1", clip_l=models["clip_l"], t5xxl=models["t5xxl"],
                       ae=models["ae"], tokenizer_cache_dir=models["t5_tokenizer"])
    latents, hidden, pooled = cached_inputs(model, models["dataset_img"], device)
    transformer = model.unet.to(device).requires_grad_(False)
    parameters, optimizer = lora_training(transformer, model.text.encoders, "flux1", device)
    settings = flow.FlowSettings()
    generator = torch.Generator().manual_seed(0)
    height, width = latents.shape[-2:]
    clock = StepClock()
    clock.mark()
    for _ in range(steps):
        index = torch.randint(0, latents.shape[0], (batch_size,), generator=generator)
        x0, txt, y = latents[index], hidden[index], pooled[index]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigmas = flow.sample_sigmas(batch_size, settings, (height, width), generator, device)
        packed = transformer(
            img=flow.pack_latents(flow.noisy_input(x0, noise, sigmas)),
            img_ids=flow.image_ids(batch_size, (height, width), device=device),
            txt=txt, txt_ids=flow.text_ids(batch_size, txt.shape[1], device=device), timesteps=sigmas, y=y,
            guidance=torch.full((batch_size,), settings.guidance_scale, device=device))
        prediction = flow.unpack_latents(packed, (height, width))
        loss = torch.nn.functional.mse_loss(prediction, flow.velocity_target(x0, noise))
        minimal_update(loss, parameters, optimizer, device, clock)
    return clock.stats(warmup)


def lora_training(unet: Any, encoders: Any, family: str, device: str) -> tuple[list[Any], Any]:
    """(the trained parameters, their AdamW) of the bench LoRA applied to `unet` (the loops' network and optimizer)."""
    from engine.networks.lora import create_lora_network

    network = create_lora_network(unet, encoders, family, dim=LORA_RANK, alpha=float(LORA_RANK),
                                  train_text_encoder=False)
    network.apply_to()
    network.to(device)
    parameters = [p for p in network.parameters() if p.requires_grad]
    return parameters, torch.optim.AdamW(parameters, lr=1e-4)
