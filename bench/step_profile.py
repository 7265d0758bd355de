#!/usr/bin/env python
"""Where the engine's training step spends its time: phase timings and torch.profiler's busiest operators.

    .venv/bin/python bench/step_profile.py [--family sd1] [--batch-size 1] [--steps 80] [--threads 1] [--rows 15]

The same tiny LoRA run as bench/train_overhead.py (cached latents and text-encoder outputs, AdamW), built and run in
this process. Two passes over the same session settings:
1. phases: the step's parts are timed with perf_counter wrappers around the runner's and the trainer's methods
   (forward and loss, backward, the update, the loss read, events, the data loader as what is left); medians in ms
   after a warm-up, and each part's share of the median step;
2. torch.profiler over 10 steps (CPU, and CUDA activity when there is a GPU): the operators with the most self CPU
   time and, on a GPU, the fraction of each step's wall time the GPU spent in kernels ("GPU busy").
The wrappers call the real methods and change nothing they do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import train_overhead  # noqa: E402

WARMUP_STEPS = 5
PROFILED_STEPS = 10


def trainer_for(config_path: Path) -> tuple[Any, Any]:
    from accelerate.state import AcceleratorState

    from engine.config.io import load_config
    from engine.rundir.control import ControlChannel
    from engine.train.build import build_session
    from engine.train.reporting import RunLog
    from engine.train.trainer import Trainer

    AcceleratorState._reset_state(True)
    run_dir = config_path.parent / f"run-{time.time_ns()}"
    log = RunLog(run_dir)
    session = build_session(load_config(config_path), config_path.parent, run_dir, log)
    return Trainer(session, ControlChannel(run_dir)), log


def timed(owner: Any, name: str, into: list[float], after: Callable[[], None] | None = None) -> None:
    """Replace owner.name by a wrapper that appends each call's seconds to `into` (and calls `after`)."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = original(*args, **kwargs)
        into.append(time.perf_counter() - start)
        if after is not None:
            after()
        return result

    setattr(owner, name, wrapper)


def phases(config_path: Path) -> dict[str, float]:
    """Median ms per step of each part (per optimizer step; one micro-batch per step here)."""
    import engine.train.trainer as trainer_module

    trainer, log = trainer_for(config_path)
    runner, times = trainer.runner, defaultdict(list)
    check = trainer_module.checked_loss
    step_marks: list[float] = []
    timed(runner.objective, "loss", times["forward and loss"])
    timed(runner.optimizer_update, "backward", times["backward"])
    timed(runner, "micro_batch", times["micro-batch"])
    timed(runner, "update", times["update (clip, step, schedule)"])
    timed(trainer_module, "checked_loss", times["loss read and check"])
    timed(trainer, "_report", times["progress event"], after=lambda: step_marks.append(time.perf_counter()))
    timed(trainer, "_between_steps", times["control, saves, samples"])
    try:
        trainer.run()
    finally:
        log.close()
        trainer_module.checked_loss = check
    medians = {name: statistics.median(values[WARMUP_STEPS:]) * 1000 for name, values in times.items()}
    medians["step"] = statistics.median(b - a for a, b in zip(step_marks[WARMUP_STEPS:], step_marks[WARMUP_STEPS + 1:],
                                                               strict=False)) * 1000
    inside = medians.pop("micro-batch")
    medians["micro-batch rest (latents, conditioning, seeding)"] = inside - medians["forward and loss"] - \
        medians["backward"]
    accounted = sum(value for name, value in medians.items() if name != "step")
    medians["data loader and loop (the rest)"] = medians["step"] - accounted
    return medians


def profile(config_path: Path, rows: int) -> str:
    from torch.profiler import ProfilerActivity, schedule

    trainer, log = trainer_for(config_path)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    steps: list[float] = []
    plan = schedule(wait=WARMUP_STEPS, warmup=2, active=PROFILED_STEPS, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=plan) as profiler:
        timed(trainer, "_report", [], after=lambda: (steps.append(time.perf_counter()), profiler.step()))
        try:
            trainer.run()
        finally:
            log.close()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=rows)
    if torch.cuda.is_available():
        kernel_us = sum(event.self_device_time_total for event in profiler.key_averages())
        active = steps[WARMUP_STEPS + 2:WARMUP_STEPS + 2 + PROFILED_STEPS + 1]
        wall_us = (active[-1] - active[0]) * 1e6 if len(active) > 1 else float("nan")
        table += f"\nGPU busy: {kernel_us / wall_us:.1%} of the profiled steps' wall time\n"
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sd1", choices=("sd1", "sd2", "sdxl"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=15, help="operators listed from the profile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temporary:
        config, _ = train_overhead.sd_setup(Path(temporary), args)
        figures = phases(config)
        step = figures.pop("step")
        print(f"\n{args.family}, batch {args.batch_size}, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
              f"torch threads {torch.get_num_threads()}: median step {step:.2f} ms")
        for name, value in sorted(figures.items(), key=lambda item: -item[1]):
            print(f"  {name:52s} {value:7.3f} ms  {value / step:6.1%}")
        print()
        print(profile(config, args.rows))


if __name__ == "__main__":
    main()
