"""Gradient checkpointing of one block, optionally with its activations parked on the CPU (cpu_offload_checkpointing).

One function for every denoiser: FLUX.1 / Chroma and SD3 call :func:`checkpoint_block` for each of their blocks, a
diffusers UNet gets :func:`unet_checkpointing` as its ``gradient_checkpointing_func`` (diffusers then checkpoints each
resnet and each transformer block through it). Both modes behave the same for every family:

* plain: ``torch.utils.checkpoint`` (non-reentrant); the block's inputs are kept, everything inside is recomputed in
  the backward pass.
* offloaded: the block's "streams" (the activations that flow from block to block) enter the checkpoint as CPU
  copies, so the checkpoint keeps only those and the device originals can be freed; the recomputation moves them back.
  Inputs every block shares (conditioning, text states, masks) stay where they are: one copy serves all blocks.

:func:`inside_checkpoint` says whether a block runs inside such a checkpoint, in its forward pass or in the
recomputation: the block swapper (engine.models.block_swap) then leaves saving to the checkpoint.

:func:`offload_host` names another device for the offloaded streams: the memory plan traces a step on the CPU with
fake tensors and has the meta device stand for the host, so that the copies are new storages it can count.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_block", "inside_checkpoint", "offload_host", "unet_checkpointing"]

_INSIDE = contextvars.ContextVar("inside_checkpoint", default=False)
_HOST: contextvars.ContextVar[str] = contextvars.ContextVar("offload_host", default="cpu")


@contextmanager
def offload_host(device: torch.device | str) -> Iterator[None]:
    """Offloaded streams wait on `device` instead of the CPU while this is active (see the module docstring)."""
    token = _HOST.set(str(device))
    try:
        yield
    finally:
        _HOST.reset(token)


def inside_checkpoint() -> bool:
    """True while a block runs inside :func:`checkpoint_block` (its forward pass or its recomputation)."""
    return _INSIDE.get()


@contextmanager
def _marked() -> Iterator[None]:
    token = _INSIDE.set(True)
    try:
        yield
    finally:
        _INSIDE.reset(token)


def checkpoint_block(block: Callable[..., Any], *args: Any, streams: int = 0) -> Any:
    """``block(*args)`` checkpointed; its first ``streams`` arguments wait on the CPU until the recomputation.

    ``streams`` 0 is plain checkpointing. A stream that is None or not a tensor is passed as it is.
    """
    def run(*inputs: Any) -> Any:
        with _marked():
            return block(*inputs)

    if not streams:
        return checkpoint(run, *args, use_reentrant=False)
    device = next((arg.device for arg in args[:streams] if isinstance(arg, Tensor)), None)

    def on_device(*inputs: Any) -> Any:
        moved = tuple(_to(stream, device, non_blocking=True) for stream in inputs[:streams])
        return run(*moved, *inputs[streams:])

    return checkpoint(on_device, *(_to(stream, torch.device(_HOST.get())) for stream in args[:streams]),
                      *args[streams:], use_reentrant=False)


def _to(value: Any, device: torch.device | None, non_blocking: bool = False) -> Any:
    if not isinstance(value, Tensor) or device is None:
        return value
    return value.to(device, non_blocking=non_blocking)


def unet_checkpointing(cpu_offload: bool) -> Callable[..., Any]:
    """A diffusers ``gradient_checkpointing_func``: diffusers calls it as ``(module, *args)`` for each resnet
    (hidden states, time embedding) and each transformer block (hidden states, mask, text states, ...). The hidden
    states are the stream; the time embedding and the text states are shared by every block and stay."""
    streams = 1 if cpu_offload else 0

    def checkpointed(module: torch.nn.Module, *args: Any) -> Any:
        return checkpoint_block(module, *args, streams=streams)

    return checkpointed
