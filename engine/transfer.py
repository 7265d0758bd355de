"""Moving a step's CPU tensors to the device without making the host wait for it.

A plain `tensor.to("cuda")` from ordinary CPU memory waits for everything already queued on the GPU before it
returns (torch synchronises the stream after the copy), so each one stalls the host that should be queueing the
next kernels. From page-locked ("pinned") memory with `non_blocking=True` the copy is queued like a kernel. The
data loader pins its batches on a GPU (`pin_memory`); what the step draws itself (noise, timesteps) is pinned here.
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device` (in `dtype` if given); CPU to CUDA copies go from pinned memory without a host wait."""
    if tensor.device == device and (dtype is None or tensor.dtype == dtype):
        return tensor
    if tensor.device != device and tensor.device.type == "cpu" and device.type == "cuda":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        tensor = tensor.to(device, non_blocking=True)
    return tensor.to(device, dtype) if dtype is not None else tensor.to(device)
