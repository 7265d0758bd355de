#!/usr/bin/env python
"""SD3.5 medium LoRA training on CUDA: it/s and peak VRAM of the real-size MMDiT, per memory setting (issue 13).

    python bench/sd3_gpu.py [--out DIR] [--configs 1024:bf16:0,1024:fp8:0,...] [--steps 6] [--warmup 2]
                            [--deadline-s 420] [--tiny]

The driver (a process per configuration, timing, peak memory, the files) is bench/gpu_driver.py, shared with
bench/flux_gpu.py; its docstring says what a configuration measures. This file is SD3's part:
- the model: `MMDiT(SD35_MEDIUM)` (24 joint blocks, hidden 1536, 24 heads, qk-norm, image-only attn2 in blocks
  0-12, position table 384 x 384; 2.24 B parameters) with random weights, made on the meta device and materialised
  on the GPU in bf16 (`gpu_driver.random_model`: qk-norm weights 1), and the stored position table `pos_embed`
  refilled with the sincos table `MMDiT.__init__` computes (`engine.models.sd3.pos_embed.sincos_pos_embed`);
- the LoRA: kohya rank 16 with SD3's default targets (every linear layer of each joint block's `context_block`
  and `x_block`, engine.networks.lora_sd3's names), three empty stand-ins in the places of CLIP-L, CLIP-G and T5;
  `blocks_to_swap` K swaps the last K joint blocks (at most 22);
- a step: batch 1, random 16-channel latents of the resolution (1024 px -> 128x128 latent -> 4096 image tokens),
  text-encoder-shaped random context (77 CLIP-L/G + 256 T5 tokens x 4096) and pooled vector (2048), the objective
  of `engine.train.sd3_objective` (spec 8.4) with `SD3Settings`' defaults (sd-scripts': uniform u, training_shift
  1.0): t = floor(1000 u), σ = t/1000, x_σ, the MMDiT on (x_σ, t, y, context) under bf16 autocast, x̂0 = x_σ − σ·p,
  the x0 MSE in float32 times the scheme's weight (1), backward, gradient clipping at 1.0, AdamW step. No text
  encoders or VAE (T5-XXL alone is ~9.5 GB in bf16 while it encodes).

Results: DIR/sd3_gpu.jsonl (one JSON line per configuration), DIR/sd3_gpu.md (the table, printed last) and
DIR/sd3_gpu.log (the children's output).

`--tiny` runs the same code on the CPU with a tiny SD3.5 medium (`tiny_params("5-medium")` at depth 4 so that
blocks can swap: hidden 256, 4 heads, attn2 in blocks 0-1, text width 64) over {32, 64} px x {bf16, fp8} x
{swap 0, 2}, so the script is tested where no GPU is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gpu_driver
from gpu_driver import Bench, Config

# Issue 13's figure first (1024 px, bf16), then the 12 GB preset's fp8 base, then 512 px; swapping after those
# (the medium presets do not swap). A deadline cuts from the end.
DEFAULT_CONFIGS = "1024:bf16:0,1024:fp8:0,512:bf16:0,1024:bf16:12,512:fp8:0"
TINY_CONFIGS = "64:bf16:0,64:fp8:0,64:fp8:2,32:bf16:2"
CLIP_TOKENS = 77  # CLIP-L and CLIP-G side by side, padded to T5's width
T5_TOKENS = 256  # model.t5xxl_max_token_length's SD3 default
# Per-configuration limits in seconds: start-up, materialising 4.5 GB and the 384² position table (~15 s), and
# (warm-up + timed) steps of a 2.2 B model (well under a second each on an H200); swapping pins host
# memory for 12 blocks (1.9 GiB in bf16).
TIMEOUT_S = {1024: 90, 512: 60}
SWAP_EXTRA_S = 30


def model_params(tiny: bool) -> Any:
    from dataclasses import replace

    from engine.models.sd3.params import SD35_MEDIUM, tiny_params

    return replace(tiny_params("5-medium"), depth=4, attn2_layers=(0, 1)) if tiny else SD35_MEDIUM


def random_mmdit(params: Any, device: str, dtype: Any, seed: int) -> Any:
    """`MMDiT(params)` with random weights straight on `device` in `dtype`, qk-norm weights 1, and its `pos_embed`
    buffer (empty after materialising) refilled with the sincos table the module computes on construction."""
    import torch

    from engine.models.sd3.mmdit import MMDiT
    from engine.models.sd3.pos_embed import sincos_pos_embed

    model = gpu_driver.random_model(lambda: MMDiT(params), device, dtype, seed,
                                    is_scale=lambda name: name.endswith((".ln_q.weight", ".ln_k.weight")))
    # Computed where it goes: on the GPU in float64 the 384² table takes a moment, on a loaded host CPU it took 46 s
    # (the same values up to float64 rounding, before the cast to float32 and bf16).
    with torch.no_grad(), torch.device(device):
        model.pos_embed.copy_(sincos_pos_embed(params.hidden_size, params.pos_embed_max_size))
    return model


def prepare(config: Config, tiny: bool, device: str) -> dict[str, Any]:
    """The model, LoRA, optimizer and fixed inputs of one configuration, placed as a run places them."""
    import torch

    params = model_params(tiny)
    dtype = torch.bfloat16
    model = random_mmdit(params, device, dtype, seed=0)
    state = gpu_driver.lora_and_place(model, 3, "sd3", config, device)  # CLIP-L, CLIP-G, T5: stand-ins
    latent = config.resolution // 8
    generator = torch.Generator().manual_seed(1)
    state["inputs"] = {
        "x0": torch.randn(1, params.in_channels, latent, latent, generator=generator).to(device),
        "context": torch.randn(1, CLIP_TOKENS + T5_TOKENS, params.context_in_dim, generator=generator
                               ).to(device, dtype),
        "y": torch.randn(1, params.adm_in_channels, generator=generator).to(device, dtype),
    }
    state["generator"] = generator
    return state


def train_step(state: dict[str, Any], device: str) -> float:
    """One SD3 LoRA step (engine.train.sd3_objective.SD3Objective's maths, spec 8.4); returns the loss."""
    import torch

    from engine.train.flow import loss_weighting
    from engine.train.sd3_objective import SD3Settings, noisy_input, sample_timesteps, sigmas_of, x0_prediction

    model, inputs, generator = state["model"], state["inputs"], state["generator"]
    x0, context, y = inputs["x0"], inputs["context"], inputs["y"]
    settings = SD3Settings()
    noise = torch.randn(x0.shape, generator=generator).to(device)  # ε first, then u (sd-scripts' order)
    timesteps = sample_timesteps(1, settings, generator, device)
    sigmas = sigmas_of(timesteps)
    noisy = noisy_input(x0, noise, sigmas)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        # t stays float32, as the objective passes it.
        pred = model(x=noisy.to(torch.bfloat16), t=timesteps, y=y, context=context)
    prediction = x0_prediction(pred.float(), noisy.float(), sigmas)
    per_sample = ((prediction - x0.float()) ** 2).mean(dim=(1, 2, 3))
    loss = (loss_weighting(settings.weighting_scheme, sigmas) * per_sample).mean()
    return gpu_driver.finish_step(state, loss)


def record_fields(config: Config) -> dict[str, Any]:
    return {"text_tokens": CLIP_TOKENS + T5_TOKENS, "image_tokens": (config.resolution // 16) ** 2}


BENCH = Bench(
    name="sd3_gpu", script=Path(__file__).resolve(), title="SD3.5 medium architecture, random weights",
    tiny_title="tiny SD3.5 medium on the CPU (a test of the script)",
    inputs=f"text {CLIP_TOKENS} + {T5_TOKENS} tokens (CLIP-L/G + T5) and a pooled CLIP vector",
    default_configs=DEFAULT_CONFIGS, tiny_configs=TINY_CONFIGS, timeout_s=TIMEOUT_S, swap_extra_s=SWAP_EXTRA_S,
    prepare=prepare, train_step=train_step, record_fields=record_fields)


def main(argv: list[str] | None = None) -> int:
    return gpu_driver.main(BENCH, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
