"""Mixed precision of a run: the autocast its forward passes run under and the fp16 loss scaler, on a GPU and on the
CPU alike.

accelerate provides both only on a GPU: asked for fp16 on the CPU it neither autocasts nor scales, so a CPU run used
to train fp16 requests in float32 and the half-precision code (dtype casts, the scaler's skipped steps, fp16 weights)
ran nowhere without a GPU. torch itself autocasts to float16 and bfloat16 on the CPU and its GradScaler works there,
so the engine owns both: the tests then run the same mixed-precision paths on the CPU that a GPU run takes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PRECISION_DTYPES", "Precision", "make_precision", "trained_dtype"]

PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def trained_dtype(training: Any) -> torch.dtype:
    """The dtype trained weights are kept in: float32 under mixed precision (autocast computes in half), unless
    `training.full_fp16` / `full_bf16` asks for half weights too."""
    return torch.float16 if training.full_fp16 else torch.bfloat16 if training.full_bf16 else torch.float32


class HalfGradientScaler(torch.amp.GradScaler):
    """The fp16 scaler for `training.full_fp16`, whose trained weights and gradients are float16 themselves.

    torch refuses to unscale float16 gradients (the unscaled values may underflow); sd-scripts patches its scaler to
    allow them, and so do we: the weights are float16 anyway, so the gradients cannot be finer than they are.
    """

    def _unscale_grads_(self, optimizer: Any, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> dict:
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


@dataclass(frozen=True)
class Precision:
    """What `training.mixed_precision` means on the run's device.

    mode: "no" (float32), "fp16" or "bf16".
    device_type: "cuda" or "cpu", the autocast's device.
    scaler: the fp16 loss scaler (None without fp16).
    """

    mode: str
    device_type: str
    scaler: torch.amp.GradScaler | None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype autocast computes in and frozen weights are kept in (float32 without mixed precision)."""
        return PRECISION_DTYPES[self.mode]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast (a do-nothing context without mixed precision)."""
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def make_precision(mode: str, device: torch.device, *, full_fp16: bool = False) -> Precision:
    """The run's precision on `device`; fp16 gets a loss scaler (one that unscales float16 gradients with
    `full_fp16`)."""
    if mode not in PRECISION_DTYPES:
        raise ValueError(f"unknown mixed precision {mode!r}; expected one of {', '.join(PRECISION_DTYPES)}")
    scaler = None
    if mode == "fp16":
        scaler = (HalfGradientScaler if full_fp16 else torch.amp.GradScaler)(device.type)
    return Precision(mode=mode, device_type=device.type, scaler=scaler)
