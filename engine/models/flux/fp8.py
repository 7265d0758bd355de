"""fp8 weight storage for a frozen FLUX transformer (spec §1.7, §6.2).

:func:`store_in_fp8` keeps every ``nn.Linear`` weight of the transformer as ``float8_e4m3fn`` (1 byte a parameter)
and computes in bf16/fp16: each such layer's forward up-casts its weight just for the matmul. It must run before a
LoRA network wraps the layers, because the LoRA keeps the layer's forward (ours) and calls it.

Order in a run: load -> :func:`store_in_fp8` (when asked) -> LoRA ``apply_to`` ->
:func:`engine.models.block_swap.place_denoiser`.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fp8_storage_dtype", "is_float8", "is_stored_in_fp8", "store_in_fp8"]

# The only float8 kind sd-scripts (and so every FLUX fp8 checkpoint we expect) uses; the others are refused.
FP8_KIND = "float8_e4m3fn"
COMPUTE_DTYPES = (torch.bfloat16, torch.float16)


def fp8_storage_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``; RuntimeError naming the setting when this torch has no such dtype."""
    dtype = getattr(torch, FP8_KIND, None)
    if dtype is None:
        raise RuntimeError(
            f"model.fp8_base needs torch.{FP8_KIND} (torch 2.1 or newer), and this torch {torch.__version__} "
            "has none: update torch, or turn model.fp8_base / model.fp8_base_unet off"
        )
    return dtype


def is_float8(dtype: torch.dtype) -> bool:
    return "float8" in str(dtype)


def _check_float8_kinds(transformer: nn.Module) -> None:
    """Refuse tensors stored in another float8 kind (e5m2, the fnuz kinds), naming a few, before changing anything."""
    wanted = fp8_storage_dtype()
    tensors = [*transformer.named_parameters(), *transformer.named_buffers()]
    wrong = [f"{name} ({str(t.dtype).removeprefix('torch.')})" for name, t in tensors
             if is_float8(t.dtype) and t.dtype != wanted]
    if wrong:
        shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ValueError(
            f"the FLUX transformer has float8 weights of a kind fp8 training does not support: {shown}. Only "
            f"{FP8_KIND} is supported (as in sd-scripts); use an {FP8_KIND} or bf16/fp16 model file"
        )


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmul runs in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _Fp8Linear(torch.autograd.Function):
    """``F.linear`` with a weight up-cast from fp8 for the matmul only.

    The backward pass saves the fp8 weight itself (1 byte a parameter) and up-casts it again, instead of keeping the
    up-cast copy alive from the forward pass to the backward pass, which would cost 2 bytes a parameter of the whole
    model until the backward pass (more than the fp8 storage saves). The weight is frozen: it gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def _fp8_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    if self.weight.requires_grad:
        raise RuntimeError("an fp8-stored weight cannot train: model.fp8_base is for LoRA training of a frozen model")
    return _Fp8Linear.apply(x, self.weight, self.bias, _compute_dtype(x))


def _has_fp8_forward(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fp8_linear_forward


def is_stored_in_fp8(transformer: nn.Module) -> bool:
    """True once :func:`store_in_fp8` has run on this model."""
    return any(_has_fp8_forward(module) for module in transformer.modules())


def store_in_fp8(transformer: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every ``nn.Linear`` weight as float8_e4m3fn and compute in ``compute_dtype``; returns the layer count.

    Biases, norm scales and buffers go to ``compute_dtype``. Weights already in e4m3fn (an fp8 model file) are kept
    as they are; other float8 kinds are refused. The model stays on its device.

    Call it before the LoRA network is applied: the LoRA keeps the layer's forward at ``apply_to`` time.

    Raises:
        RuntimeError: torch has no float8_e4m3fn, or a layer's forward is already wrapped (a LoRA was applied).
        ValueError: ``compute_dtype`` is not bf16/fp16, or some tensor is in another float8 kind.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"fp8 storage computes in bfloat16 or float16, not {compute_dtype}: set training.mixed_precision to "
            "bf16 or fp16 with model.fp8_base"
        )
    storage = fp8_storage_dtype()
    _check_float8_kinds(transformer)
    wrapped = [name for name, module in transformer.named_modules()
               if isinstance(module, nn.Linear) and "forward" in module.__dict__ and not _has_fp8_forward(module)]
    if wrapped:
        raise RuntimeError(
            f"store_in_fp8: {wrapped[0]} (and {len(wrapped) - 1} more) already has its forward replaced, most likely "
            "by a LoRA network: store the weights in fp8 before the network's apply_to"
        )
    count = 0
    with torch.no_grad():
        for module in transformer.modules():
            linear = isinstance(module, nn.Linear)
            for name, param in module.named_parameters(recurse=False):
                target = storage if linear and name == "weight" else compute_dtype
                if param.is_floating_point() and param.dtype != target:
                    param.data = param.data.to(target)
                if target is storage:
                    param.requires_grad_(False)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point() and buffer.dtype != compute_dtype:
                    module._buffers[name] = buffer.to(compute_dtype)
            if linear:
                module.forward = types.MethodType(_fp8_linear_forward, module)
                count += 1
    return count
