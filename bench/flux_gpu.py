#!/usr/bin/env python
"""FLUX.1 dev LoRA training on CUDA: it/s and peak VRAM of the real-size transformer, per memory setting (issue 12).

    python bench/flux_gpu.py [--out DIR] [--configs 1024:bf16:0,1024:fp8:18,...] [--steps 6] [--warmup 2]
                             [--deadline-s 420] [--tiny]

The driver (a process per configuration, timing, peak memory, the files) is bench/gpu_driver.py, shared with
bench/sd3_gpu.py; its docstring says what a configuration measures. This file is FLUX.1's part:
- the model: `Flux(FLUX_DEV)` (19 double + 38 single blocks, hidden 3072, 11.9 B parameters) with random weights,
  made on the meta device and materialised on the GPU in bf16 (`gpu_driver.random_model`: norm scales 1);
- the LoRA: kohya rank 16 with FLUX.1's default targets (every linear layer of the double and single blocks);
  `blocks_to_swap` K swaps K // 2 double and 2 (K - K // 2) single blocks, as sd-scripts splits it;
- a step: batch 1, random 16-channel latents of the resolution (1024 px -> 128x128 latent -> 4096 packed tokens),
  T5-shaped random text (512 tokens x 4096) and CLIP-L pooled vector (768), guidance 3.5, σ drawn as
  `engine.train.flow` does, x_σ, the transformer under bf16 autocast, the velocity MSE in float32, backward,
  gradient clipping at 1.0, AdamW step (T5-XXL alone is ~9.5 GB in bf16 while it encodes: not built here).

Results: DIR/flux_gpu.jsonl (one JSON line per configuration), DIR/flux_gpu.md (the table, printed last) and
DIR/flux_gpu.log (the children's output).

`--tiny` runs the same code on the CPU with a tiny FLUX (hidden 64, 2 heads, 4 + 4 blocks, text width 32) over
{32, 64} px x {bf16, fp8} x {swap 0, 2}, so the script is tested where no GPU is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gpu_driver
from gpu_driver import Bench, Config

# The configurations issue 12 asks for, most important first (a deadline cuts from the end).
DEFAULT_CONFIGS = ("1024:bf16:0,1024:fp8:0,1024:fp8:18,1024:bf16:18,"
                   "512:bf16:0,512:fp8:0,512:fp8:18,512:bf16:18")
TINY_CONFIGS = "64:bf16:0,64:fp8:0,64:fp8:2,64:bf16:2,32:bf16:0,32:fp8:2"
T5_TOKENS = 512
GUIDANCE = 3.5
# Per-configuration limits in seconds: start-up and materialising (~20 s) plus (warm-up + timed) steps; swapping
# also pins ~10 GiB of host memory for the swapped weights (its speed on the device machine is unknown).
TIMEOUT_S = {1024: 150, 512: 100}
SWAP_EXTRA_S = 45


def model_params(tiny: bool) -> Any:
    from engine.models.flux.params import FLUX_DEV, FluxParams

    if not tiny:
        return FLUX_DEV
    return FluxParams(hidden_size=64, num_heads=2, depth=4, depth_single_blocks=4, context_in_dim=32,
                      vec_in_dim=32, axes_dim=(4, 14, 14))


def random_flux(params: Any, device: str, dtype: Any, seed: int) -> Any:
    """`Flux(params)` with random weights straight on `device` in `dtype` (its norms' `.scale` 1; no buffers)."""
    from engine.models.flux.transformer import Flux

    return gpu_driver.random_model(lambda: Flux(params), device, dtype, seed,
                                   is_scale=lambda name: name.endswith(".scale"))


def prepare(config: Config, tiny: bool, device: str) -> dict[str, Any]:
    """The model, LoRA, optimizer and fixed inputs of one configuration, placed as a run places them."""
    import torch

    params = model_params(tiny)
    dtype = torch.bfloat16
    model = random_flux(params, device, dtype, seed=0)
    # FLUX.1 has two text encoders (CLIP-L, T5): empty stand-ins fill their places.
    state = gpu_driver.lora_and_place(model, 2, "flux1", config, device)
    latent = config.resolution // 8
    generator = torch.Generator().manual_seed(1)
    state["inputs"] = {
        "x0": torch.randn(1, params.in_channels // 4, latent, latent, generator=generator).to(device),
        "txt": torch.randn(1, T5_TOKENS, params.context_in_dim, generator=generator).to(device, dtype),
        "y": torch.randn(1, params.vec_in_dim, generator=generator).to(device, dtype),
    }
    state["generator"] = generator
    return state


def train_step(state: dict[str, Any], device: str) -> float:
    """One flow-matching LoRA step (engine.train.objectives.FlowObjective's maths); returns the loss."""
    import torch

    from engine.train import flow

    model, inputs, generator = state["model"], state["inputs"], state["generator"]
    x0, txt, y = inputs["x0"], inputs["txt"], inputs["y"]
    height, width = x0.shape[-2:]
    dtype = torch.bfloat16
    noise = torch.randn(x0.shape, generator=generator).to(device)
    sigmas = flow.sample_sigmas(1, flow.FlowSettings(), (height, width), generator, device)
    noisy = flow.noisy_input(x0, noise, sigmas)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        packed = model(img=flow.pack_latents(noisy).to(dtype),
                       img_ids=flow.image_ids(1, (height, width), device=device, dtype=dtype),
                       txt=txt, txt_ids=flow.text_ids(1, txt.shape[1], device=device, dtype=dtype),
                       timesteps=sigmas.to(dtype), y=y,
                       guidance=torch.full((1,), GUIDANCE, device=device, dtype=dtype))
    prediction = flow.unpack_latents(packed.float(), (height, width))
    loss = torch.nn.functional.mse_loss(prediction, flow.velocity_target(x0, noise).float())
    return gpu_driver.finish_step(state, loss)


def record_fields(config: Config) -> dict[str, Any]:
    return {"t5_tokens": T5_TOKENS, "image_tokens": (config.resolution // 16) ** 2}


BENCH = Bench(
    name="flux_gpu", script=Path(__file__).resolve(), title="FLUX.1 dev architecture, random weights",
    tiny_title="tiny FLUX on the CPU (a test of the script)", inputs=f"T5 {T5_TOKENS} tokens",
    default_configs=DEFAULT_CONFIGS, tiny_configs=TINY_CONFIGS, timeout_s=TIMEOUT_S, swap_extra_s=SWAP_EXTRA_S,
    prepare=prepare, train_step=train_step, record_fields=record_fields)


def main(argv: list[str] | None = None) -> int:
    return gpu_driver.main(BENCH, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
