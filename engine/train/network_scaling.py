"""Per-sample network strength in training: datasets' `network_multiplier` and differential output preservation.

* `network_multiplier` ([general] / [[datasets]]): each sample's LoRA/LyCORIS output is scaled by its dataset's
  multiplier. The dataset puts it in every batch (`batch["network_multiplier"]`, as sd-scripts' `network_multipliers`),
  and the step sets it on the network before the forward pass and back to 1 after the backward pass (after, so a
  gradient checkpoint that recomputes the forward in backward sees the same strengths).
* `custom_attributes.diff_output_preservation` (a subset's): the target of those samples is the model's own
  prediction with the network at multiplier 0, i.e. the base model's, so the network learns to leave them as the
  base model has them (sd-scripts train_network.py).

A batch never mixes datasets (engine.data.sampler), so its multipliers are usually one value, which every network
takes as a float; kohya LoRA modules also take one value per sample (engine.networks.lora_modules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.train.setup import Session

__all__ = ["apply_batch_multipliers", "preserved_target", "reset_multipliers"]


def _network(session: Session) -> Any:
    network = getattr(session.method, "network", None)
    return network if hasattr(network, "set_multiplier") else None


def apply_batch_multipliers(session: Session, batch: dict[str, Any]) -> None:
    """Set each sample's dataset multiplier on the network (a float when the batch has one value)."""
    from engine.transfer import to_device

    network = _network(session)
    values = batch.get("network_multiplier")  # host floats, one per sample (engine.train.dataset.collate)
    if network is None:
        return
    if values is None:
        network.set_multiplier(1.0)
    elif all(value == values[0] for value in values):
        network.set_multiplier(float(values[0]))
    else:
        network.set_multiplier(to_device(torch.tensor(values, dtype=torch.float32), session.device))


def reset_multipliers(session: Session) -> None:
    """Full strength again, for sampling and for the next batch."""
    network = _network(session)
    if network is not None:
        network.set_multiplier(1.0)


def preserved_target(session: Session, batch: dict[str, Any], target: torch.Tensor,
                     predict: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`target`, with the rows of diff_output_preservation samples replaced by `predict()` at multiplier 0.

    `predict` must repeat the step's forward on the same inputs and return the prediction in the target's terms
    (the objective's post-processing applied). It runs without gradients; the batch's multipliers are restored
    afterwards, before the backward pass.
    """
    chosen = [index for index, flag in enumerate(batch.get("diff_output_preservation") or []) if flag]
    if not chosen:
        return target
    network = _network(session)
    if network is None:
        raise ValueError("custom_attributes.diff_output_preservation needs a trained network (method 'lora'); "
                         "remove it from the subset")
    network.set_multiplier(0.0)
    try:
        with torch.no_grad():
            prior = predict()
    finally:
        apply_batch_multipliers(session, batch)
    rows = torch.tensor(chosen, device=target.device)
    target = target.clone()
    target[rows] = prior[rows].to(target)
    return target
