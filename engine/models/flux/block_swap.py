"""Block swapping and placement of a frozen FLUX or SD3 transformer on the device (spec §1.7, §6.2, §8.6).

* :class:`BlockSwapper` keeps the weights of the last K blocks on the CPU and brings each block's weights to the
  compute device only while the block runs, in the forward pass and again in the backward pass.
* :func:`place_transformer` puts a frozen transformer on the device in the compute dtype, leaving fp8 weights
  (:func:`engine.models.flux.fp8.store_in_fp8`) as they are and the swapped blocks' weights on the CPU, so the full
  model never has to fit on the device.

Which block lists a model has, and how sd-scripts splits K among them, is a small registry keyed by the model's
params class (:data:`SWAP_LAYOUTS`): FLUX.1 / Chroma swap ``double_blocks`` and ``single_blocks``, SD3 / SD3.5
(MMDiT) ``joint_blocks``. Everything else is the same code for every model.

Order in a run: load -> ``store_in_fp8`` (when asked) -> LoRA ``apply_to`` -> :func:`place_transformer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from engine.models.flux.fp8 import is_float8

__all__ = ["SWAP_LAYOUTS", "BlockSwapper", "SwapLayout", "place_transformer", "swap_layout", "swap_limits",
           "swap_split", "swapped_block_names"]


@dataclass(frozen=True)
class SwapLayout:
    """How one kind of transformer swaps blocks.

    ``lists(params)`` gives the model's block lists as ((attribute, number of blocks, label), ...); ``split(K)`` how
    many blocks of each list sd-scripts swaps for ``blocks_to_swap`` K (always the last ones of each list).
    """

    lists: Callable[[Any], tuple[tuple[str, int, str], ...]]
    split: Callable[[int], tuple[int, ...]]


def _flux_split(blocks_to_swap: int) -> tuple[int, ...]:
    double = blocks_to_swap // 2  # sd-scripts' FLUX split: a single block is half a double block's size
    return double, 2 * (blocks_to_swap - double)


# Keyed by the model's params class name (FluxParams for FLUX.1 and Chroma, SD3Params for SD3 / SD3.5).
SWAP_LAYOUTS: dict[str, SwapLayout] = {
    "FluxParams": SwapLayout(lambda params: (("double_blocks", params.depth, "double"),
                                             ("single_blocks", params.depth_single_blocks, "single")), _flux_split),
    # One offloader over joint_blocks (spec §8.6): 22 of 24 blocks for SD3 / SD3.5 medium, 36 of 38 for SD3.5 large.
    "SD3Params": SwapLayout(lambda params: (("joint_blocks", params.depth, "joint"),), lambda count: (count,)),
}


def swap_layout(params: Any) -> SwapLayout:
    """The registry entry for a model's params; ValueError naming training.blocks_to_swap for other models."""
    layout = SWAP_LAYOUTS.get(type(params).__name__)
    if layout is None:
        raise ValueError(f"training.blocks_to_swap: block swapping is not available for this model "
                         f"({type(params).__name__}); set training.blocks_to_swap to 0")
    return layout


def swap_split(blocks_to_swap: int, params: Any) -> tuple[int, ...]:
    """How many of the last blocks of each list swap for ``blocks_to_swap`` K, as sd-scripts splits it.

    FLUX (a FluxParams): (double, single) = (K // 2, 2 * (K - K // 2)) (spec §6.2); SD3 (an SD3Params): (K,) of
    ``joint_blocks`` (spec §8.6). At most N - 2 blocks of each list swap (17 of FLUX's 19 double blocks and 36 of
    its 38 single blocks, so K <= 35; K <= depth - 2 for SD3).

    Raises:
        ValueError: K is negative or above :func:`swap_limits` (the message names training.blocks_to_swap).
    """
    if blocks_to_swap < 0:
        raise ValueError(f"training.blocks_to_swap must not be negative, got {blocks_to_swap}")
    limit = swap_limits(params)
    if blocks_to_swap > limit:
        lists = " and ".join(f"{count} {label}" for _, count, label in swap_layout(params).lists(params))
        raise ValueError(
            f"training.blocks_to_swap {blocks_to_swap} is too many for this model ({lists} blocks): at most "
            f"{limit}; lower it"
        )
    return swap_layout(params).split(blocks_to_swap)


def swap_limits(params: Any) -> int:
    """The largest ``blocks_to_swap`` a model takes: every list keeps at least two blocks on the device.

    35 for FLUX.1 / Chroma (19 double and 38 single blocks); 22 for 24-block SD3 / SD3.5 medium, 36 for SD3.5 large.
    """
    layout = swap_layout(params)
    most = [count - 2 for _, count, _ in layout.lists(params)]
    limit = 0
    while all(swapped <= top for swapped, top in zip(layout.split(limit + 1), most, strict=True)):
        limit += 1
    return limit


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

    Which blocks swap is sd-scripts' split (:func:`swap_split`, per :data:`SWAP_LAYOUTS`). Only the ``nn.Linear``
    weights of those blocks move (nearly all of a block's bytes); biases, norm scales and buffers stay where they
    are. By default only frozen weights move (LoRA): the host copy is kept for good and "moving back" just drops the
    device copy, so only host -> device copies happen (pinned memory, asynchronous, on the current stream).

    With ``trainable=True`` (full fine-tuning) the trained Linear weights of the swapped blocks move too, as in
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
    the last input marker's backward drops them once the block's backward is done. Without checkpointing,
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
        self.counts = swap_split(blocks_to_swap, transformer.params)
        self._blocks_to_swap = blocks_to_swap
        pin = self.device.type == "cuda" and self.offload_device.type == "cpu" if pin_memory is None else pin_memory
        self.blocks = []
        for (attribute, _, _), count in zip(swap_layout(transformer.params).lists(transformer.params), self.counts,
                                            strict=True):
            block_list = getattr(transformer, attribute)
            self.blocks += [self._take(f"{attribute}.{index}", block_list[index], pin)
                            for index in range(len(block_list) - count, len(block_list))]
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
        """Move a block's Linear weights (the frozen ones unless ``trainable``) to their host copies (device memory
        freed as it goes)."""
        params = [layer.weight for layer in module.modules()
                  if isinstance(layer, nn.Linear) and (self.trainable or not layer.weight.requires_grad)]
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
                if getattr(self.transformer, "gradient_checkpointing", False):
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


def place_transformer(transformer: nn.Module, device: torch.device | str, dtype: torch.dtype, *,
                      blocks_to_swap: int = 0, trainable: bool = False) -> BlockSwapper | None:
    """Put a FLUX or SD3 transformer on ``device`` for training; returns the swapper (None without swapping).

    Floating tensors go to ``dtype`` except fp8-stored weights (:func:`~engine.models.flux.fp8.store_in_fp8`), which
    keep their 1 byte a parameter; the weights of the ``blocks_to_swap`` swapped blocks go to the CPU instead of the
    device. Tensors move one at a time, so the whole model never needs to fit on the device at once. Call after the
    LoRA is applied. A transformer that trains (full fine-tuning) is placed in the dtype its weights train in, with
    ``trainable=True`` when blocks swap (see :class:`BlockSwapper`), and must not be moved again afterwards.
    """
    device = torch.device(device)
    if blocks_to_swap:
        swap_split(blocks_to_swap, transformer.params)  # refuse a bad count before moving anything
    with torch.no_grad():
        for module in transformer.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype=_target_dtype(param, dtype))
                if not blocks_to_swap:
                    param.data = param.data.to(device)
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device=device, dtype=_target_dtype(buffer, dtype))
    if not blocks_to_swap:
        return None
    swapper = BlockSwapper(transformer, blocks_to_swap, device=device, trainable=trainable)
    swapped = {id(param) for param in swapper.swapped_parameters()}
    with torch.no_grad():
        for param in transformer.parameters():
            if id(param) not in swapped:
                param.data = param.data.to(device)
    return swapper


def _target_dtype(tensor: Tensor, dtype: torch.dtype) -> torch.dtype:
    return tensor.dtype if not tensor.is_floating_point() or is_float8(tensor.dtype) else dtype


def swapped_block_names(params: Any, blocks_to_swap: int) -> Sequence[str]:
    """The block names :class:`BlockSwapper` would swap (for the doctor and logs), without a model."""
    counts = swap_split(blocks_to_swap, params)
    return [f"{attribute}.{index}" for (attribute, total, _), count in zip(swap_layout(params).lists(params), counts,
                                                                          strict=True)
            for index in range(total - count, total)]
