"""engine.train.update: the update the step runner does itself since it stopped using accelerate's optimizer wrapper
(issue 18): fp16 loss scaling with unscale-before-clip and skipped overflow steps, and the step's seeding."""

from __future__ import annotations

import copy

import torch

from engine.train.update import OptimizerUpdate, seed_step_generators


def _model_and_batch() -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4), torch.randn(16, 8)


def _loss(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return (model(inputs) ** 2).mean() * 50  # large enough that clipping at 1.0 applies


def _trained(scaler: torch.amp.GradScaler | None, steps: int = 3) -> torch.nn.Linear:
    model, inputs = _model_and_batch()
    parameters = list(model.parameters())
    update = OptimizerUpdate(torch.optim.AdamW(parameters, lr=0.1), scaler, parameters, max_grad_norm=1.0)
    for _ in range(steps):
        update.backward(_loss(model, inputs))
        update.step()
        assert all(parameter.grad is None for parameter in parameters)  # cleared for the next update
    return model


def test_loss_scaling_trains_as_the_unscaled_update_with_clipping():
    by_hand, inputs = _model_and_batch()
    optimizer = torch.optim.AdamW(by_hand.parameters(), lr=0.1)
    for _ in range(3):
        _loss(by_hand, inputs).backward()
        torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    plain = _trained(None)
    scaled = _trained(torch.amp.GradScaler("cpu", init_scale=2.0**12))
    for expected, ours, with_scaler in zip(by_hand.parameters(), plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(ours, expected)
        # Scaling by a power of two and back is exact, so the scaled update clips the same gradient.
        torch.testing.assert_close(with_scaler, expected, rtol=1e-6, atol=1e-7)


def test_an_overflowing_gradient_skips_the_step_and_lowers_the_scale():
    model, inputs = _model_and_batch()
    before = copy.deepcopy(model.state_dict())
    parameters = list(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    update = OptimizerUpdate(torch.optim.AdamW(parameters, lr=0.1), scaler, parameters, max_grad_norm=1.0)
    update.backward(_loss(model, inputs) * float("inf"))
    update.step()
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())
    assert scaler.get_scale() == 2.0**11


def test_step_seeding_repeats_the_default_generators_draws():
    seed_step_generators(1234, torch.device("cpu"))
    first = torch.rand(5), torch.nn.functional.dropout(torch.ones(64), p=0.5)
    seed_step_generators(1234, torch.device("cpu"))
    assert torch.equal(torch.rand(5), first[0])
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), p=0.5), first[1])
