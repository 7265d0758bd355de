"""Adafactor's fused backward pass (`optimizer.fused_backward_pass`; sd-scripts' --fused_backward_pass, spec §6.2).

Each trained tensor is updated by the optimizer as soon as its gradient is complete, inside a post-accumulate-grad
hook, and its gradient is freed at once: the gradients of a whole FLUX transformer (24 GB in bf16) never exist
together. The update is the optimizer's own `step()` run over that one tensor, so it is exactly the unfused
Adafactor update with two differences, as in sd-scripts (library/adafactor_fused.py):

* gradient clipping (`optimizer.max_grad_norm`) applies to each tensor on its own, not to the global norm;
* bf16 weights (`training.full_bf16`) are updated in float32 and rounded back stochastically, so that updates
  smaller than bf16's resolution still move the weights on average (round-to-nearest would drop them).

The config rules allow it only with Adafactor, one micro-batch per update and no fp16 loss scaling. The training
loop must not step, clip or zero the optimizer itself while the hooks are attached; it still steps the schedule.
"""

from __future__ import annotations

from typing import Any

import torch

# Optimizer classes whose `step()` updates each parameter from its own gradient and state alone, so stepping one
# parameter at a time is the same update (a global quantity such as a norm over all parameters would break that).
FUSABLE_OPTIMIZERS = ("transformers.optimization.Adafactor",)


class FusedBackward:
    """Post-accumulate-grad hooks that step `optimizer` one parameter at a time during the backward pass.

    Args:
        optimizer: the torch optimizer (or accelerate's wrapper around it).
        max_grad_norm: clip each gradient tensor to this norm first (0: no clipping).
        world_size: processes training together; above 1 each gradient is averaged across them before its step.
    """

    def __init__(self, optimizer: Any, *, max_grad_norm: float, world_size: int = 1):
        self.optimizer: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)
        name = f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}"
        if name not in FUSABLE_OPTIMIZERS:
            raise ValueError(f"optimizer.fused_backward_pass: {name} cannot be stepped per tensor; use "
                             "optimizer_type = 'Adafactor' or turn fused_backward_pass off")
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self._handles = []
        # The group is looked up by index at each step: load_state_dict (a resume) replaces the group dicts.
        for index, group in enumerate(self.optimizer.param_groups):
            for parameter in group["params"]:
                if parameter.requires_grad:
                    self._handles.append(parameter.register_post_accumulate_grad_hook(self._hook(index)))

    def _hook(self, group_index: int) -> Any:
        def step_when_ready(parameter: torch.Tensor) -> None:
            self.step(parameter, self.optimizer.param_groups[group_index])
        return step_when_ready

    def step(self, parameter: torch.Tensor, group: dict[str, Any]) -> None:
        """Average, clip and apply `parameter`'s gradient, then free it."""
        if parameter.grad is None:
            return
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(parameter.grad)
            parameter.grad.div_(self.world_size)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([parameter], self.max_grad_norm)
        step_parameter(self.optimizer, parameter, group)
        parameter.grad = None

    def remove(self) -> None:
        """Detach the hooks (the optimizer then steps as usual)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def step_parameter(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, group: dict[str, Any]) -> None:
    """One `optimizer.step()` over `parameter` alone, with its group's settings; bf16 rounds stochastically."""
    if parameter.dtype != torch.bfloat16:
        _step_alone(optimizer, parameter, group)
        return
    # Step a float32 stand-in holding the parameter's state, then round into the bf16 weight: the float32 values
    # are exactly what Adafactor computes for a bf16 weight before its own round-to-nearest copy.
    stand_in = parameter.detach().float()
    stand_in.grad = parameter.grad.float()
    state = optimizer.state
    if parameter in state:
        state[stand_in] = state.pop(parameter)
    try:
        _step_alone(optimizer, stand_in, group)
    finally:
        if stand_in in state:
            state[parameter] = state.pop(stand_in)
    with torch.no_grad():
        copy_stochastic_(parameter, stand_in)


def _step_alone(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, group: dict[str, Any]) -> None:
    groups = optimizer.param_groups
    optimizer.param_groups = [{**group, "params": [parameter]}]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor) -> None:
    """Round float32 `source` into bf16 `target`, up or down with probabilities that make the result unbiased.

    bf16 is float32 with the low 16 bits dropped: adding 16 random bits before dropping them rounds away from zero
    with probability (dropped part) / 2^16 (sd-scripts' copy_stochastic_).
    """
    noise = torch.randint_like(source, dtype=torch.int32, low=0, high=1 << 16)
    noise.add_(source.view(dtype=torch.int32))
    noise.bitwise_and_(-65536)  # clear the low 16 bits
    target.copy_(noise.view(dtype=torch.float32))
