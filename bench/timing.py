"""Timing shared by the bench scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(function: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class StepClock:
    """Wall-clock and process CPU seconds at the end of each step of a loop.

    CPU time leaves out the time other processes held the cores (not their effect on caches and clocks), so on a
    shared, loaded machine it is a second view of the work done beside wall time.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def mark(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def stats(self, skip: int) -> dict[str, float]:
        return step_stats(self.wall, self.cpu, skip)


def step_stats(wall: list[float], cpu: list[float], skip: int) -> dict[str, float]:
    """Seconds per step from marks at each step's end, leaving out the first `skip` steps: the median wall and CPU
    time, and the fastest step's wall time (the least disturbed by other processes on a shared machine)."""
    walls, cpus = _intervals(wall, skip), _intervals(cpu, skip)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "fastest": min(walls)}


def _intervals(marks: list[float], skip: int) -> list[float]:
    return [b - a for a, b in zip(marks[skip:], marks[skip + 1:], strict=False)]


def minimal_update(loss: Any, parameters: list[Any], optimizer: Any, device: str, clock: StepClock) -> None:
    """The end of a hand-written baseline step: backward, clip to 1.0, step, zero, wait for the GPU, mark the time."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    clock.mark()
