#!/usr/bin/env python
"""Training overhead: the engine's time per step over a minimal hand-written loop doing the same work.

    .venv/bin/python bench/train_overhead.py [--steps 60] [--runs 3] [--batch-size 4] [--family sd1] [--threads N]

SD families: both sides train the same kohya LoRA (dim 8, UNet only) on the tiny offline model, with the same AdamW,
cached latents and cached text-encoder outputs, batch 4 at 64 px, float32 on this machine's device:
- engine: `python -m engine train` in this process (scan, caches, sampler, per-step seeding, noise and loss
  pipeline, gradient clipping, events and log); its step time is the median gap between `progress` events,
  after the first 5 steps;
- baseline: a loop over the same latents and embeddings: noise, timesteps, add_noise, UNet forward, MSE,
  backward, clip, AdamW step. Median step time after the first 5.
`--family flux1`: the same comparison for flow matching on a FLUX.1 dev transformer (bench/flux_overhead.py says
which: larger than the tests' tiny one), LoRA rank 4, batch 2 (unless --batch-size), 64 px, T5 length 32; the
baseline draws σ, forms x_σ, packs, runs the transformer, takes the velocity MSE, backward, clip, AdamW.
`--family sd3`: the same for SD3's objective on an SD3.5 medium MMDiT (bench/sd3_overhead.py says which: larger
than the tests' tiny one), LoRA rank 4, batch 2 (unless --batch-size), 64 px, T5 length 32; the baseline draws ε and
t with the run's flow settings, forms x_σ, runs the MMDiT, takes x̂0 = x_σ − σ·p and the weighted x0 MSE, backward,
clip, AdamW.
Runs alternate baseline / engine in one process; the ratio is the median of the per-run ratios. Besides the median
wall-clock step (the headline figure), the median process CPU time per step (the engine's read at each `progress`
event) and the fastest step are compared: on a shared, loaded machine they are less disturbed by other processes.
`--threads N` sets torch's CPU threads for both sides (on a shared, loaded CPU, 1 avoids threads waiting on each
other, which swamps small models' steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from timing import StepClock, minimal_update, step_stats  # noqa: E402
from train_helpers import write_config  # noqa: E402

from engine.config.io import load_config  # noqa: E402

WARMUP_STEPS = 5


def build_models(folder: Path, only: list[str] | None = None) -> dict[str, Path]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "tools" / "make_tiny_model.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder.build_all(folder, only)


@contextmanager
def progress_cpu_marks(marks: list[float]) -> Iterator[None]:
    """Note the process CPU time at each `progress` event the engine writes (the events carry wall time only).
    Wraps RunLog.event for the duration and changes nothing it does."""
    from engine.train.reporting import RunLog

    original = RunLog.event

    def event(self: RunLog, type_: str, **fields: object) -> object:
        if type_ == "progress":
            marks.append(time.process_time())
        return original(self, type_, **fields)

    RunLog.event = event
    try:
        yield
    finally:
        RunLog.event = original


def engine_step_time(config_path: Path) -> dict[str, float]:
    """Seconds per step of `run_training` (timing.step_stats); wall time from the `progress` events' times."""
    from accelerate.state import AcceleratorState

    from engine.train.run import run_training

    AcceleratorState._reset_state(True)
    config = load_config(config_path)
    run_dir = config_path.parent / f"run-{time.time_ns()}"
    cpu: list[float] = []
    with progress_cpu_marks(cpu):
        code = run_training(config, config_path.parent, run_dir=run_dir)
    assert code == 0, f"engine run failed, see {run_dir}/train.log"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    wall = [event["time"] for event in events if event["type"] == "progress"]
    return step_stats(wall, cpu, WARMUP_STEPS)


def baseline_step_time(models: dict[str, Path], family: str, steps: int, batch_size: int) -> dict[str, float]:
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
    # SDXL: the pooled text embedding and the size ids (original 64x64, no crop, target 64x64) of every image.
    pooled = encoded.pooled.to(device) if encoded.pooled is not None else None
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * batch_size, dtype=torch.float32, device=device)
    unet = model.unet.to(device).requires_grad_(False)
    network = create_lora_network(unet, model.text.encoders, family, dim=8, alpha=8.0, train_text_encoder=False)
    network.apply_to()
    network.to(device)
    parameters = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    clock = StepClock()
    clock.mark()
    for step in range(steps):
        index = torch.randint(0, 8, (batch_size,))
        x0, states = latents[index], hidden[index]
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 1000, (batch_size,), device=device)
        extra = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": pooled[index], "time_ids": time_ids}}
        prediction = unet(scheduler.add_noise(x0, noise, timesteps), timesteps, encoder_hidden_states=states,
                          **extra).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        minimal_update(loss, parameters, optimizer, device, clock)
        del step
    return clock.stats(WARMUP_STEPS)


Setup = tuple[Path, Callable[[], dict[str, float]]]  # the engine's config; the baseline (timing.step_stats)


def sd_setup(folder: Path, args: argparse.Namespace) -> Setup:
    batch_size = args.batch_size or 4
    models = build_models(folder / "models")
    config = write_config(
        folder / "config.toml", models, args.family,
        network={"network_dim": 8, "network_alpha": 8.0, "train_unet_only": True},
        dataset={"general": {"batch_size": batch_size}},
        optimizer={"learning_rate": 1e-4, "lr_scheduler": "constant"},
        training={"max_train_steps": args.steps, "cache_latents": True, "cache_text_encoder_outputs": True,
                  "mixed_precision": "no"},
    )
    return config, lambda: baseline_step_time(models, args.family, args.steps, batch_size)


def flux_setup(folder: Path, args: argparse.Namespace) -> Setup:
    import flux_overhead

    batch_size = args.batch_size or 2
    dataset = build_models(folder / "models", ["dataset"])["dataset_img"]
    models = flux_overhead.flux_models(folder / "flux", dataset)
    config = flux_overhead.flux_config(folder / "config.toml", models, args.steps, batch_size)
    return config, lambda: flux_overhead.baseline_step_time(models, args.steps, batch_size, WARMUP_STEPS)


def sd3_setup(folder: Path, args: argparse.Namespace) -> Setup:
    import sd3_overhead

    batch_size = args.batch_size or 2
    dataset = build_models(folder / "models", ["dataset"])["dataset_img"]
    models = sd3_overhead.sd3_models(folder / "sd3", dataset)
    config = sd3_overhead.sd3_config(folder / "config.toml", models, args.steps, batch_size)
    return config, lambda: sd3_overhead.baseline_step_time(models, config, args.steps, batch_size, WARMUP_STEPS)


SETUPS: dict[str, Callable[[Path, argparse.Namespace], Setup]] = {"flux1": flux_setup, "sd3": sd3_setup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 (SD), 2 (flux1, sd3)")
    parser.add_argument("--family", default="sd1", choices=("sd1", "sd2", "sdxl", "flux1", "sd3"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        config, baseline_run = SETUPS.get(args.family, sd_setup)(folder, args)
        figures = {name: Figures() for name in MEASURES}
        for run in range(args.runs):
            baseline = baseline_run()
            engine = engine_step_time(config)
            for name, measure in figures.items():
                measure.add(engine[name], baseline[name])
            print(f"run {run + 1}: " + "; ".join(f"{MEASURES[name]} {measure.line(-1)}"
                                               for name, measure in figures.items()), flush=True)
    for name, measure in figures.items():
        print(f"{MEASURES[name]}: median ratio {measure.summary()}")
    print(f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads {torch.get_num_threads()}")

MEASURES = {"wall": "median wall", "cpu": "median CPU", "fastest": "fastest step"}


class Figures:
    """Engine and baseline seconds per step of each run, and their ratios."""

    def __init__(self) -> None:
        self.engine: list[float] = []
        self.baseline: list[float] = []

    def add(self, engine: float, baseline: float) -> None:
        self.engine.append(engine)
        self.baseline.append(baseline)

    def ratios(self) -> list[float]:
        return [e / b for e, b in zip(self.engine, self.baseline, strict=True)]

    def line(self, run: int) -> str:
        return (f"engine {self.engine[run] * 1000:.1f} ms, baseline {self.baseline[run] * 1000:.1f} ms, "
                f"ratio {self.ratios()[run]:.3f}")

    def summary(self) -> str:
        ratios = self.ratios()
        overhead = statistics.median(e - b for e, b in zip(self.engine, self.baseline, strict=True))
        return (f"{statistics.median(ratios):.3f} (runs: {', '.join(f'{r:.3f}' for r in ratios)}); "
                f"engine {statistics.median(self.engine) * 1000:.1f} ms/step, "
                f"baseline {statistics.median(self.baseline) * 1000:.1f} ms/step, "
                f"overhead {overhead * 1000:+.2f} ms/step (median of the runs' differences)")

if __name__ == "__main__":
    main()
