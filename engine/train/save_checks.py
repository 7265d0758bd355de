"""What a save checks before it writes anything, so that every checkpoint a run lists is a usable one.

Trained weights (and, for a state, optimizer tensors) that hold NaN, infinity or values too large for
saving.save_precision stop the run instead of being saved (:class:`NonFiniteWeights`), and the disk must have room
for the whole save (:func:`save_bytes`, given to engine.files.ensure_free_space).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class NonFiniteWeights(RuntimeError):
    """What a save would write holds NaN, infinity, or values beyond what save_precision can store."""

    def __init__(self, step: int, what: str, names: list[str]):
        super().__init__(f"the {what} became non-finite (NaN, infinity, or too large for saving.save_precision) at "
                         f"step {step}, in {', '.join(names)}")
        self.step = step


def refuse_non_finite(step: int, trained: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None,
                      save_precision: str) -> None:
    """Raise NonFiniteWeights naming the first bad tensors of the trained weights, else of the optimizer state."""
    from engine.networks.network_file import save_dtype

    bad = non_finite_tensors(trained, save_dtype(save_precision))
    if bad:
        raise NonFiniteWeights(step, "trained weights", bad)
    if optimizer_state is not None:
        bad = non_finite_tensors(optimizer_state)
        if bad:
            raise NonFiniteWeights(step, "optimizer state", [f"state {name}" for name in bad])


def save_bytes(method: Any, trained: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None,
               save_precision: str) -> int:
    """The size of a save in advance: the model file (the trained tensors, or every module of a full-model save,
    in save_precision), plus, with `optimizer_state`, the state folder's trained tensors and optimizer tensors."""
    from engine.networks.network_file import save_dtype

    dtype = save_dtype(save_precision)
    components = getattr(method, "components", None)  # full models save the whole pipeline
    tensors = list(trained.values()) if components is None else [
        tensor for part in components().values() if isinstance(part, torch.nn.Module)
        for tensor in part.state_dict().values()]
    needed = sum(tensor.numel() * (dtype.itemsize if dtype is not None and tensor.is_floating_point()
                                   else tensor.element_size()) for tensor in tensors)
    if optimizer_state is not None:
        needed += tensor_bytes(trained) + tensor_bytes(optimizer_state)
    return needed


def iter_tensors(value: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with where it is ("state[3]['exp_avg']")."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_tensors(item, f"{where}[{key!r}]" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from iter_tensors(item, f"{where}[{index}]")


def non_finite_tensors(value: Any, save_dtype: torch.dtype | None = None, limit: int = 3) -> list[str]:
    """Names of (up to `limit`) floating-point tensors in `value` holding NaN or infinity, or, with `save_dtype`,
    values beyond its range (a float32 weight of 1e5 becomes infinity in an fp16 file).

    Two reductions per tensor (NaN propagates through max and min) and one transfer per device: no copy of the
    model is made, so checking costs one pass over it.
    """
    named = [(name, tensor.detach()) for name, tensor in iter_tensors(value)
             if tensor.is_floating_point() and tensor.numel()]
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, tensor) in enumerate(named):
        by_device.setdefault(tensor.device, []).append(index)
    bad: list[int] = []
    for indices in by_device.values():
        flags = torch.stack([_within_range(named[index][1], save_dtype) for index in indices]).cpu()
        bad.extend(index for index, good in zip(indices, flags.tolist(), strict=True) if not good)
    return [named[index][0] for index in sorted(bad)[:limit]]


def _within_range(tensor: torch.Tensor, save_dtype: torch.dtype | None) -> torch.Tensor:
    largest = torch.finfo(tensor.dtype).max
    if save_dtype is not None and save_dtype.is_floating_point:
        largest = min(largest, torch.finfo(save_dtype).max)
    return (tensor.amax() <= largest) & (tensor.amin() >= -largest)


def tensor_bytes(value: Any) -> int:
    return sum(tensor.numel() * tensor.element_size() for _, tensor in iter_tensors(value))
