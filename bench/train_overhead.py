#!/usr/bin/env python
"""Training overhead: the engine's time per step over a minimal hand-written loop doing the same work.

    .venv/bin/python bench/train_overhead.py [--steps 60] [--runs 3] [--batch-size 4] [--family sd1]

Both sides train the same kohya LoRA (dim 8, UNet only) on the tiny offline model, with the same AdamW, cached
latents and cached text-encoder outputs, batch 4 at 64 px, float32 on this machine's device:
- engine: `python -m engine train` in this process (scan, caches, sampler, per-step seeding, noise and loss
  pipeline, gradient clipping, events and log); its step time is the median gap between `progress` events,
  after the first 5 steps;
- baseline: a loop over the same latents and embeddings: noise, timesteps, add_noise, UNet forward, MSE,
  backward, clip, AdamW step. Median step time after the first 5.
Runs alternate baseline / engine in one process; the ratio is the median of the per-run ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from train_helpers import write_config  # noqa: E402

from engine.config.io import load_config  # noqa: E402

WARMUP_STEPS = 5


def build_models(folder: Path) -> dict[str, Path]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "tools" / "make_tiny_model.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder.build_all(folder)


def engine_step_time(config_path: Path) -> float:
    from accelerate.state import AcceleratorState

    from engine.train.run import run_training

    AcceleratorState._reset_state(True)
    config = load_config(config_path)
    run_dir = config_path.parent / f"run-{time.time_ns()}"
    code = run_training(config, config_path.parent, run_dir=run_dir)
    assert code == 0, f"engine run failed, see {run_dir}/train.log"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    times = [event["time"] for event in events if event["type"] == "progress"]
    return statistics.median(b - a for a, b in zip(times[WARMUP_STEPS:], times[WARMUP_STEPS + 1:], strict=False))


def baseline_step_time(models: dict[str, Path], family: str, steps: int, batch_size: int) -> float:
    from diffusers import DDPMScheduler

    from engine.models.loading import load_model
    from engine.models.text_encoding import encode_captions
    from engine.networks.lora import create_lora_network

    model = load_model(models[family], family=family)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    pixels = torch.rand(8, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = model.vae.vae.encode(pixels).latent_dist.mean.to(device) * model.vae.scaling_factor
        encoded = encode_captions(model.text, ["sks dog, red square"] * 8, clip_skip=1, max_token_length=75)
    hidden = encoded.hidden_states.to(device)
    unet = model.unet.to(device).requires_grad_(False)
    network = create_lora_network(unet, model.text.encoders, family, dim=8, alpha=8.0, train_text_encoder=False)
    network.apply_to()
    network.to(device)
    parameters = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        index = torch.randint(0, 8, (batch_size,))
        x0, states = latents[index], hidden[index]
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 1000, (batch_size,), device=device)
        prediction = unet(scheduler.add_noise(x0, noise, timesteps), timesteps, encoder_hidden_states=states).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del step
    return statistics.median(times[WARMUP_STEPS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--family", default="sd1", choices=("sd1", "sd2", "sdxl"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        models = build_models(folder / "models")
        config = write_config(
            folder / "config.toml", models, args.family,
            network={"network_dim": 8, "network_alpha": 8.0, "train_unet_only": True},
            dataset={"general": {"batch_size": args.batch_size}},
            optimizer={"learning_rate": 1e-4, "lr_scheduler": "constant"},
            training={"max_train_steps": args.steps, "cache_latents": True, "cache_text_encoder_outputs": True,
                      "mixed_precision": "no"},
        )
        ratios, engine_times, baseline_times = [], [], []
        for run in range(args.runs):
            baseline = baseline_step_time(models, args.family, args.steps, args.batch_size)
            engine = engine_step_time(config)
            ratios.append(engine / baseline)
            engine_times.append(engine)
            baseline_times.append(baseline)
            print(f"run {run + 1}: engine {engine * 1000:.1f} ms/step, baseline {baseline * 1000:.1f} ms/step, "
                  f"ratio {engine / baseline:.3f}", flush=True)
    print(f"median ratio {statistics.median(ratios):.3f} (runs: {', '.join(f'{r:.3f}' for r in ratios)}); "
          f"engine {statistics.median(engine_times) * 1000:.1f} ms/step, "
          f"baseline {statistics.median(baseline_times) * 1000:.1f} ms/step; "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
