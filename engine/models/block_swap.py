"""Block swapping and placement of a frozen denoiser on the device, one mechanism for every family (spec §1.7, §6.2,
§8.6): FLUX.1 / Chroma, SD3 / SD3.5 and the SD1 / SD2 / SDXL UNet.

* :class:`BlockSwapper` keeps the weights of the last K blocks on the CPU and brings each block's weights to the
  compute device only while the block runs, in the forward pass and again in the backward pass.
* :func:`place_denoiser` puts a denoiser on the device in the compute dtype, leaving fp8 weights
  (:func:`engine.models.flux.fp8.store_in_fp8`) as they are and the swapped blocks' weights on the CPU, so the full
  model never has to fit on the device.

Which blocks a model has, and how K is split among them, is a small registry keyed by the model's (or its params')
class (engine.models.swap_layouts): FLUX.1 / Chroma swap ``double_blocks`` and ``single_blocks``, SD3 / SD3.5
(MMDiT) ``joint_blocks``, a diffusers UNet its resnets and transformer blocks. Everything else is the same code for
every model.

Order in a run: load -> ``store_in_fp8`` (when asked) -> LoRA ``apply_to`` -> :func:`place_denoiser`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from engine.models.checkpointing import inside_checkpoint
from engine.models.flux.fp8 import is_float8
from engine.models.swap_layouts import (
    SWAP_LAYOUTS,
    SwapLayout,
    swap_layout,
    swap_limits,
    swap_split,
    swapped_block_names,
)

__all__ = ["MOVED_LAYERS", "SWAP_LAYOUTS", "BlockSwapper", "SwapLayout", "place_denoiser", "place_transformer",
           "swap_layout", "swap_limits", "swap_split", "swapped_block_names"]

# The layers whose weights move: nearly all of a block's bytes (Linear in the transformers' blocks, also Conv2d in
# the UNet's resnets). Biases, norm scales and buffers are small and stay on the device.
MOVED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(eq=False)
class _SwapBlock:
    """One swapped block: its Linear weights and their host copies.

    Frozen weights never change, so their host copy is kept for good. Trained weights (full fine-tuning) change
    only on the device, in the backward pass; ``dirty`` says the device copy is newer than the host copy.
    """

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    stores: list[Tensor]
    resident: bool = False
    holds: int = 0  # backward passes now running through this block (see _Ticket)
    dirty: bool = False


@dataclass(frozen=True, eq=False)
class _WeightRef:
    """A saved tensor that was (a view of) a swapped weight: rebuilt from the weight in the backward pass."""

    param: nn.Parameter
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(eq=False)
class _Ticket:
    """One call of a swapped block with gradients on: the backward pass holds the weights from the first gradient
    reaching the block's outputs until the last one leaves through its inputs (``pending`` input markers)."""

    block: _SwapBlock
    pending: int = 0
    active: bool = False


class _BackwardMarker(torch.autograd.Function):
    """Identity in the forward pass; its backward calls ``on_backward`` when the gradient reaches it.

    On a block's output it brings the block's weights in before the block's own backward (``_backward_starts``). On a
    block's input it runs once everything in the block that used the input is done (``_input_done``): when every
    input that needs a gradient has passed its marker, the block's backward is over but for the parts that feed no
    input (none that need a frozen weight in FLUX's blocks); a weight needed later anyway is brought back by the
    saved-tensor hook (:meth:`BlockSwapper._weight_references`), so the markers only time the memory.
    """

    @staticmethod
    def forward(ctx: Any, on_backward: Callable[[], None], x: Tensor) -> Tensor:
        ctx.on_backward = on_backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        ctx.on_backward()
        return None, grad


class BlockSwapper:
    """Keep the weights of the last ``blocks_to_swap`` blocks off the compute device except while they run.

    Which blocks swap is the model's layout (:func:`swap_split`, per :data:`SWAP_LAYOUTS`: sd-scripts' split for
    FLUX and SD3). Only the ``nn.Linear`` and ``nn.Conv2d`` weights of those blocks move (nearly all of a block's
    bytes); biases, norm scales and buffers stay where they are. By default only frozen weights move (LoRA): the
    host copy is kept for good and "moving back" just drops the device copy, so only host -> device copies happen
    (pinned memory, asynchronous, on the current stream).

    With ``trainable=True`` (full fine-tuning) the trained weights of the swapped blocks move too, as in
    sd-scripts, whose full fine-tuning swaps with --fused_backward_pass: each weight must be updated in the backward
    pass while it is on the device, by a post-accumulate-grad hook (``engine.train.fused_backward``). Autograd runs
    a weight's gradient accumulation, and so that hook, as soon as the gradient exists (AccumulateGrad nodes come
    first in its ready queue), before the gradient reaches the block's inputs, whose markers move the block out.
    A block whose backward pass has begun is marked changed, and moving it out copies its trained weights back to
    their host copies first. A gradient still on a swapped weight when its block moves out means no such update
    ran, and is refused (the optimizer would otherwise meet a host weight with a device gradient).

    Each swapped block's forward is wrapped: its weights come in, the block runs, they go out. With gradients on,
    the block's outputs and its inputs that need a gradient also get identity markers: the output marker's backward
    brings the weights in before the block's backward (and before a gradient checkpoint recomputes the block), and
    the last input marker's backward drops them once the block's backward is done. Outside a gradient checkpoint
    (engine.models.checkpointing, which saves nothing inside a block and recomputes it with the weights in),
    saved-tensor hooks keep a reference to each weight instead of its device copy and bring the weight in whenever
    the backward pass asks for it (:meth:`_weight_references`), so correctness never rests on the markers' timing.
    A forward pre-hook on the whole model first puts every swapped block off the device
    (:meth:`prepare_for_forward`), so each forward starts from the same layout, even after an interrupted step.

    ``swap_ins`` / ``swap_outs`` count block moves, ``bytes_in`` the bytes copied in.
    """

    def __init__(self, transformer: nn.Module, blocks_to_swap: int, *, device: torch.device | str,
                 offload_device: torch.device | str = "cpu", pin_memory: bool | None = None,
                 trainable: bool = False) -> None:
        self.transformer = transformer
        self.trainable = trainable
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.counts = swap_split(blocks_to_swap, transformer)
        self._blocks_to_swap = blocks_to_swap
        pin = self.device.type == "cuda" and self.offload_device.type == "cpu" if pin_memory is None else pin_memory
        self.blocks = [self._take(name, transformer.get_submodule(name), pin)
                       for name in swapped_block_names(transformer, blocks_to_swap)]
        self.swap_ins = self.swap_outs = self.bytes_in = 0
        self._hooks = [transformer.register_forward_pre_hook(lambda module, args: self.prepare_for_forward())]
        for block in self.blocks:
            block.module.forward = self._wrap(block)

    @property
    def blocks_to_swap(self) -> int:
        return self._blocks_to_swap

    @property
    def swapped_names(self) -> list[str]:
        return [block.name for block in self.blocks]

    def swapped_parameters(self) -> Iterator[nn.Parameter]:
        for block in self.blocks:
            yield from block.params

    def _take(self, name: str, module: nn.Module, pin: bool) -> _SwapBlock:
        """Move a block's Linear and Conv2d weights (the frozen ones unless ``trainable``) to their host copies (device
        memory freed as it goes)."""
        params = [layer.weight for layer in module.modules()
                  if isinstance(layer, MOVED_LAYERS) and (self.trainable or not layer.weight.requires_grad)]
        stores = []
        with torch.no_grad():
            for param in params:
                store = param.data.to(self.offload_device)
                if pin:
                    store = _pinned(store)
                param.data = store
                stores.append(store)
        return _SwapBlock(name=name, module=module, params=params, stores=stores)

    # -- moves

    def _swap_in(self, block: _SwapBlock) -> None:
        if block.resident:
            return
        for param, store in zip(block.params, block.stores, strict=True):
            # On one device (CPU tests) a copy still stands in for the transfer, so a use of the host copy while
            # the block is out would be a use of a different tensor than the one the block runs with.
            moved = store.to(self.device, non_blocking=True)
            param.data = store.clone() if moved is store else moved
            self.bytes_in += store.numel() * store.element_size()
        block.resident = True
        self.swap_ins += 1

    def _swap_out(self, block: _SwapBlock) -> None:
        for param, store in zip(block.params, block.stores, strict=True):
            if self.trainable and block.resident and param.grad is not None:
                raise RuntimeError(
                    f"training.blocks_to_swap: {block.name} trains and still holds a gradient when it leaves the "
                    "device; swapped trained blocks must be updated in the backward pass: turn on "
                    "optimizer.fused_backward_pass (Adafactor), or set training.blocks_to_swap to 0"
                )
            if block.dirty and param.requires_grad:
                with torch.no_grad():
                    store.copy_(param.data)  # the update happened on the device copy
            param.data = store
        if block.resident:
            self.swap_outs += 1
        block.resident = False
        block.dirty = False

    def prepare_for_forward(self) -> None:
        """Every swapped block off the device, nothing held (spec §6.2 step 1); runs before each model forward.

        Sampling and validation may call it explicitly too; it is cheap when the layout is already right.
        """
        for block in self.blocks:
            if not self.trainable and any(param.requires_grad for param in block.params):
                raise RuntimeError(
                    f"training.blocks_to_swap: a weight of {block.name} trains, and only frozen weights can be "
                    "swapped (LoRA training); set training.blocks_to_swap to 0 for full fine-tuning"
                )
            if not block.resident and any(param.data_ptr() != store.data_ptr()
                                          for param, store in zip(block.params, block.stores, strict=True)):
                # Someone moved the model (e.g. `.to(device)`) after placing it: the host copies are stale now.
                raise RuntimeError(
                    f"training.blocks_to_swap: the weights of {block.name} were moved after place_transformer; a "
                    "model whose blocks swap must not be moved again (a model that trains is placed in its training "
                    "dtype with trainable=True)"
                )
            block.holds = 0
            self._swap_out(block)

    # -- the wrapped block forward

    def _wrap(self, block: _SwapBlock) -> Any:
        original = block.module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            self._swap_in(block)
            if not torch.is_grad_enabled():
                try:
                    return original(*args, **kwargs)
                finally:
                    self._swap_out(block)
            ticket = _Ticket(block)

            def mark(value: Any) -> Any:
                if not (isinstance(value, Tensor) and value.requires_grad):
                    return value
                ticket.pending += 1
                return _BackwardMarker.apply(partial(self._input_done, ticket), value)

            args = tuple(mark(arg) for arg in args)
            kwargs = {key: mark(value) for key, value in kwargs.items()}
            try:
                if inside_checkpoint():
                    # Inside a checkpoint nothing is saved for backward; the recomputation runs with the weights in.
                    output = original(*args, **kwargs)
                else:
                    with torch.autograd.graph.saved_tensors_hooks(*self._weight_references(block)):
                        output = original(*args, **kwargs)
            finally:
                if block.holds == 0:  # not while a checkpoint recomputes the block inside its backward pass
                    self._swap_out(block)
            starts = partial(self._backward_starts, ticket)
            return _map_tensors(output, lambda x: _BackwardMarker.apply(starts, x) if x.requires_grad else x)

        return forward

    def _weight_references(self, block: _SwapBlock) -> tuple[Any, Any]:
        """Saved-tensor hooks that keep a reference to a swapped weight instead of its device copy.

        Autograd would otherwise keep each weight's device copy (or a view of it, as ``F.linear`` saves the
        transposed weight) from the forward pass to the backward pass, so nothing would leave the device. A tensor
        sharing a weight's storage is saved as (parameter, layout) and rebuilt from the weight brought back in.
        """
        owners = {param.untyped_storage().data_ptr(): param for param in block.params}

        def pack(tensor: Tensor) -> Any:
            param = owners.get(tensor.untyped_storage().data_ptr())
            if param is None or tensor.device != param.device or tensor.dtype != param.dtype:
                return tensor
            return _WeightRef(param, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())

        def unpack(packed: Any) -> Tensor:
            if not isinstance(packed, _WeightRef):
                return packed
            self._swap_in(block)  # normally in already (see _backward_starts); this makes it so in any case
            return packed.param.data.as_strided(packed.shape, packed.stride, packed.offset)

        return pack, unpack

    def _backward_starts(self, ticket: _Ticket) -> None:
        if ticket.active:
            return
        ticket.active = True
        if ticket.pending:  # else no marker will say when the block is done: it stays in until the next forward
            ticket.block.holds += 1
        self._swap_in(ticket.block)
        ticket.block.dirty = self.trainable  # trained weights are updated on the device during this backward pass

    def _input_done(self, ticket: _Ticket) -> None:
        ticket.pending -= 1
        if ticket.pending or not ticket.active:
            return
        ticket.active = False
        block = ticket.block
        block.holds = max(0, block.holds - 1)
        if block.holds == 0:
            self._swap_out(block)

    def close(self) -> None:
        """Remove the hooks and put every swapped weight on the compute device (for sampling without swapping)."""
        for handle in self._hooks:
            handle.remove()
        with torch.no_grad():
            for block in self.blocks:
                del block.module.forward
                if block.resident:
                    continue  # the device copy is current (and newer than the host copy when dirty)
                for param, store in zip(block.params, block.stores, strict=True):
                    param.data = store.to(self.device)
        self.blocks = []


def _pinned(tensor: Tensor) -> Tensor:
    """A page-locked copy for asynchronous host -> device copies; the plain tensor where pinning fails (WSL limits)."""
    try:
        return tensor.pin_memory()
    except RuntimeError:
        return tensor


def _map_tensors(output: Any, function: Any) -> Any:
    """Apply ``function`` to the floating tensors of a block's output (a tensor or a tuple of them)."""
    if isinstance(output, Tensor):
        return function(output) if output.is_floating_point() else output
    if isinstance(output, tuple):
        return tuple(_map_tensors(item, function) for item in output)
    return output


# ------------------------------------------------------------------------------------------------- placement


def place_denoiser(transformer: nn.Module, device: torch.device | str, dtype: torch.dtype, *,
                   blocks_to_swap: int = 0, trainable: bool = False) -> BlockSwapper | None:
    """Put a denoiser (FLUX or SD3 transformer, diffusers UNet) on ``device`` for training; returns the swapper (None
    without swapping).

    Floating tensors go to ``dtype`` except fp8-stored weights (:func:`~engine.models.flux.fp8.store_in_fp8`), which
    keep their 1 byte a parameter; the weights of the ``blocks_to_swap`` swapped blocks go to the CPU instead of the
    device. Tensors move one at a time, so the whole model never needs to fit on the device at once. Call after the
    LoRA is applied. A transformer that trains (full fine-tuning) is placed in the dtype its weights train in, with
    ``trainable=True`` when blocks swap (see :class:`BlockSwapper`), and must not be moved again afterwards.
    """
    device = torch.device(device)
    if blocks_to_swap:
        swap_split(blocks_to_swap, transformer)  # refuse a bad count before moving anything
    with torch.no_grad():
        for module in transformer.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype=_target_dtype(param, dtype))
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device=device, dtype=_target_dtype(buffer, dtype))
    swapper = BlockSwapper(transformer, blocks_to_swap, device=device, trainable=trainable) if blocks_to_swap else None
    _move_parameters(transformer, device, set() if swapper is None else set(map(id, swapper.swapped_parameters())))
    return swapper


def _move_parameters(model: nn.Module, device: torch.device, swapped: set[int]) -> None:
    """Every parameter but the swapped ones to ``device``, one at a time."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or id(param) in swapped:
                    continue
                moved = param.data.to(device)
                if torch._has_compatible_shallow_copy_type(param.data, moved):
                    param.data = moved
                else:  # the meta device (the tests' stand-in for a GPU) cannot back a CPU parameter: a new one
                    module._parameters[name] = nn.Parameter(moved, requires_grad=param.requires_grad)


# The name FLUX and SD3 code (and their tests) know it by.
place_transformer = place_denoiser


def _target_dtype(tensor: Tensor, dtype: torch.dtype) -> torch.dtype:
    return tensor.dtype if not tensor.is_floating_point() or is_float8(tensor.dtype) else dtype

