"""The plan's parts: one item of memory, where it lives, and why."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GIB", "PlanItem", "dtype_name"]

GIB = 1024**3


@dataclass(frozen=True)
class PlanItem:
    name: str
    bytes: int
    where: str  # "gpu" or "host"
    detail: str = ""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
