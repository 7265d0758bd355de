"""Backward, clipping and the optimizer step of one update, with fp16 loss scaling when the run has a scaler.

This is what accelerate's optimizer wrapper and `Accelerator.backward` / `clip_grad_norm_` do for the one
configuration the engine uses (one model per process, gradients averaged by the trainer itself, no DeepSpeed,
FSDP or XLA), without their per-call checks: the wrapper looks up whether the `lomo_optim` package is installed
twice per step (package metadata, ~0.3 ms), and its `zero_grad` inspects the optimizer's signature each time.

Nothing here reads a device value back to the host, except the fp16 scaler, which must know whether the
gradients overflowed before it decides to step (torch's GradScaler, one read per update, after backward).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["OptimizerUpdate", "seed_step_generators"]


class OptimizerUpdate:
    """Scaled backward passes and the update after them.

    Args:
        optimizer: the torch optimizer (not wrapped by accelerate).
        scaler: the accelerator's fp16 `GradScaler`, or None (float32, bf16).
        parameters: the trained parameters (clipped together).
        max_grad_norm: clip the global gradient norm to this (0: no clipping).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any, parameters: list[torch.nn.Parameter],
                 max_grad_norm: float):
        self.optimizer = optimizer
        self.scaler = scaler
        self.parameters = parameters
        self.max_grad_norm = max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (scaled up first with fp16, so small gradients do not underflow)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        """Unscale (fp16), clip, step (skipped by the scaler when a gradient overflowed), then clear the gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def seed_step_generators(seed: int, device: torch.device) -> None:
    """Seed the default generators a micro-batch draws from without an explicit generator (dropout in the network
    and the text encoders, VAE sampling): the CPU's and, on a GPU, the current device's.

    `torch.manual_seed` would also queue the seed for every backend that is not initialised (CUDA on a CPU
    machine, XPU and MTIA on a CUDA one), recording a stack trace each time: 0.3-0.5 ms a step, and a queue that
    grows for the whole run.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
