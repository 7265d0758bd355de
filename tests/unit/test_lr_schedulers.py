"""The scheduler registry: every lr_scheduler name builds, the curves follow their formulas, and resume is exact."""

from __future__ import annotations

import math
from typing import Any, get_args

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

from engine.config.choices import LrScheduler
from engine.config.sections_training import OptimizerSection
from engine.train.lr_schedulers import SCHEDULER_NAMES, build_lr_scheduler, warmup_steps
from engine.train.optimizers import OptimizerConfigError, build_optimizer

BASE_LRS = (1e-2, 1e-3)
# The lr_scheduler_args each schedule cannot do without.
NEEDED_ARGS: dict[str, dict[str, Any]] = {
    "cosine_with_min_lr": {"min_lr_ratio": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 0.25},
    "piecewise_constant": {"step_rules": "1:3,0.5:6,0.1"},
}
NO_WARMUP = {"constant", "piecewise_constant", "adafactor"}


def _section(scheduler: str, **settings: Any) -> OptimizerSection:
    settings.setdefault("lr_scheduler_args", NEEDED_ARGS.get(scheduler, {}))
    optimizer_type = "Adafactor" if scheduler == "adafactor" else "AdamW"
    return OptimizerSection(optimizer_type=optimizer_type, learning_rate=BASE_LRS[0], lr_scheduler=scheduler,
                            **settings)


def _optimizer(section: OptimizerSection) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    groups = [{"params": [param], "lr": lr} for param, lr in zip(params, BASE_LRS, strict=True)]
    return build_optimizer(section, groups).optimizer


def _step(optimizer: torch.optim.Optimizer, scheduler: LRScheduler) -> None:
    optimizer.zero_grad()
    sum((p ** 2).sum() for group in optimizer.param_groups for p in group["params"]).backward()
    optimizer.step()
    scheduler.step()


def _curve(section: OptimizerSection, total: int, steps: int | None = None, **options: Any) -> list[list[float]]:
    """The group lrs in effect at each optimizer step 0, 1, ... (stepping the scheduler num_processes times)."""
    optimizer = _optimizer(section)
    scheduler = build_lr_scheduler(section, optimizer, total, **options)
    curve = []
    for _ in range(total if steps is None else steps):
        curve.append([float(group["lr"]) for group in optimizer.param_groups])
        optimizer.step()
        for _ in range(options.get("num_processes", 1)):
            scheduler.step()
    return curve


def _expect(curve: list[list[float]], factor) -> None:
    for step, lrs in enumerate(curve):
        expected = [base * factor(step) for base in BASE_LRS]
        assert lrs == pytest.approx(expected, abs=1e-12), f"step {step}"


def test_the_registry_covers_the_literal():
    assert set(SCHEDULER_NAMES) == set(get_args(LrScheduler))


@pytest.mark.parametrize("name", get_args(LrScheduler))
def test_every_scheduler_builds_and_resumes_exactly(name: str):
    section = _section(name, lr_warmup_steps=0 if name in NO_WARMUP else 2)
    optimizer = _optimizer(section)
    scheduler = build_lr_scheduler(section, optimizer, 12)
    assert isinstance(scheduler, LRScheduler)
    for _ in range(5):
        _step(optimizer, scheduler)
    saved_weights = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    _step(optimizer, scheduler)

    resumed_optimizer = _optimizer(section)
    resumed = build_lr_scheduler(section, resumed_optimizer, 12)
    with torch.no_grad():  # a resume restores the trained weights too; Adafactor's lr depends on them
        for param, saved in zip((p for g in resumed_optimizer.param_groups for p in g["params"]), saved_weights,
                                strict=True):
            param.copy_(saved)
    resumed_optimizer.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved_scheduler)
    _step(resumed_optimizer, resumed)
    assert [float(lr) for lr in resumed.get_last_lr()] == [float(lr) for lr in scheduler.get_last_lr()]
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_linear_warms_up_from_zero_then_decays_to_zero():
    total, warmup = 20, 4
    curve = _curve(_section("linear", lr_warmup_steps=warmup), total)
    _expect(curve, lambda s: s / warmup if s < warmup else (total - s) / (total - warmup))


def test_constant_with_warmup_reaches_the_lr_after_the_warmup():
    curve = _curve(_section("constant_with_warmup", lr_warmup_steps=5), 12)
    _expect(curve, lambda s: min(s / 5, 1.0))


def test_cosine_is_half_way_down_at_half_the_run():
    total = 20
    curve = _curve(_section("cosine"), total)
    _expect(curve, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    assert curve[total // 2] == pytest.approx([lr / 2 for lr in BASE_LRS])


def test_polynomial_follows_its_power():
    total, warmup, power, lr_end = 20, 2, 2.0, 1e-7
    curve = _curve(_section("polynomial", lr_warmup_steps=warmup, lr_scheduler_power=power), total)
    lr_init = BASE_LRS[0]  # transformers scales by the optimizer's default lr (learning_rate)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        remaining = 1 - (step - warmup) / (total - warmup)
        return ((lr_init - lr_end) * remaining ** power + lr_end) / lr_init

    _expect(curve, factor)


def test_cosine_with_restarts_restarts_num_cycles_minus_one_times():
    total, cycles = 30, 3
    curve = _curve(_section("cosine_with_restarts", lr_scheduler_num_cycles=cycles), total)
    _expect(curve, lambda s: 0.5 * (1 + math.cos(math.pi * ((cycles * s / total) % 1.0))))
    restarts = [s for s in range(1, total) if curve[s][0] > curve[s - 1][0]]
    assert restarts == [total // cycles * k for k in range(1, cycles)]


def test_cosine_with_min_lr_ends_at_the_ratio():
    total = 20
    curve = _curve(_section("cosine_with_min_lr", lr_scheduler_args={"min_lr_ratio": 0.1}), total, total + 1)
    _expect(curve, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / total)))
    with pytest.raises(OptimizerConfigError, match=r"lr_scheduler_args\.min_lr_ratio"):
        build_lr_scheduler(_section("cosine_with_min_lr", lr_scheduler_args={}), _optimizer(_section("cosine")), 9)


def test_a_fraction_warmup_is_that_share_of_the_run():
    section = _section("linear", lr_warmup_steps=0.25)
    assert warmup_steps(section, 20) == 5
    assert warmup_steps(_section("linear", lr_warmup_steps=7), 20) == 7
    curve = _curve(section, 20)
    _expect(curve, lambda s: s / 5 if s < 5 else (20 - s) / 15)


def test_steps_count_optimizer_steps_when_stepped_once_per_process():
    total, warmup, processes = 10, 3, 2
    curve = _curve(_section("linear", lr_warmup_steps=warmup), total, num_processes=processes)
    _expect(curve, lambda s: s / warmup if s < warmup else (total - s) / (total - warmup))


def test_inverse_sqrt_halves_at_four_times_the_timescale():
    warmup = 3
    curve = _curve(_section("inverse_sqrt", lr_warmup_steps=warmup), 13)
    _expect(curve, lambda s: s / warmup if s < warmup else 1 / math.sqrt(s / warmup))
    assert curve[4 * warmup] == pytest.approx([lr / 2 for lr in BASE_LRS])


def test_warmup_stable_decay_holds_then_decays_over_the_decay_steps():
    total, warmup = 20, 2
    curve = _curve(_section("warmup_stable_decay", lr_warmup_steps=warmup,
                            lr_scheduler_args={"num_decay_steps": 0.25}), total)
    decay_start = total - 5

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if step < decay_start:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - decay_start) / 5))

    _expect(curve, factor)
    with pytest.raises(OptimizerConfigError, match=r"lr_scheduler_args\.num_decay_steps"):
        build_lr_scheduler(_section("warmup_stable_decay", lr_scheduler_args={}), _optimizer(_section("cosine")), 9)


@pytest.mark.parametrize("processes", [1, 2])
def test_piecewise_constant_follows_its_step_rules(processes: int):
    curve = _curve(_section("piecewise_constant"), 9, num_processes=processes)
    _expect(curve, lambda s: 1.0 if s < 3 else 0.5 if s < 6 else 0.1)


def test_schedule_free_optimizers_get_a_constant_schedule():
    section = _section("cosine", lr_warmup_steps=3)
    curve = _curve(section, 10, schedule_free=True)
    _expect(curve, lambda s: 1.0)


def test_constant_with_a_warmup_says_to_use_constant_with_warmup():
    section = _section("constant", lr_warmup_steps=10)
    with pytest.raises(OptimizerConfigError, match="optimizer.lr_warmup_steps.*constant_with_warmup"):
        build_lr_scheduler(section, _optimizer(section), 100)
    _expect(_curve(_section("constant"), 6), lambda s: 1.0)


def test_relative_step_adafactor_always_gets_the_adafactor_schedule():
    from transformers.optimization import AdafactorSchedule

    section = OptimizerSection(optimizer_type="Adafactor", lr_scheduler="cosine")
    assert isinstance(build_lr_scheduler(section, _optimizer(section), 10), AdafactorSchedule)
    warm = OptimizerSection(optimizer_type="Adafactor", lr_scheduler="cosine", lr_warmup_steps=2)
    with pytest.raises(OptimizerConfigError, match="optimizer.lr_warmup_steps.*relative_step"):
        build_lr_scheduler(warm, _optimizer(warm), 10)


def test_the_adafactor_schedule_needs_relative_step_adafactor():
    section = _section("adafactor").model_copy(update={"optimizer_type": "AdamW"})
    with pytest.raises(OptimizerConfigError, match="optimizer.lr_scheduler.*relative_step"):
        build_lr_scheduler(section, _optimizer(section), 10)


def test_bad_scheduler_args_name_their_path_and_the_accepted_keys():
    section = _section("polynomial", lr_scheduler_args={"lr_ending": 0.0})
    with pytest.raises(OptimizerConfigError) as caught:
        build_lr_scheduler(section, _optimizer(section), 10)
    assert str(caught.value).startswith("optimizer.lr_scheduler_args.lr_ending")
    assert "lr_end" in str(caught.value)
    restarts = _section("cosine_with_restarts", lr_scheduler_args={"num_cycles": 4})
    with pytest.raises(OptimizerConfigError, match=r"lr_scheduler_args\.num_cycles"):
        build_lr_scheduler(restarts, _optimizer(restarts), 10)


def test_scheduler_args_reach_the_schedule():
    total, lr_end = 10, 1e-3
    curve = _curve(_section("polynomial", lr_scheduler_args={"lr_end": lr_end}), total, total + 1)
    assert curve[-1] == pytest.approx([base * lr_end / BASE_LRS[0] for base in BASE_LRS])


# --- lr_scheduler_type: a scheduler class, as sd-scripts' --lr_scheduler_type ---------------------------------------

@pytest.mark.parametrize("name", ["CosineAnnealingLR", "cosineannealinglr",
                                  "torch.optim.lr_scheduler.CosineAnnealingLR"])
def test_a_scheduler_class_follows_its_own_formula(name: str):
    total = 8
    section = _section("linear", lr_scheduler_type=name, lr_scheduler_args={"T_max": total, "eta_min": 0.0})
    curve = _curve(section, total, total + 1)
    _expect(curve, lambda step: (1 + math.cos(math.pi * step / total)) / 2)


def test_a_scheduler_class_resumes_exactly():
    section = _section("cosine", lr_scheduler_type="StepLR", lr_scheduler_args={"step_size": 2, "gamma": 0.5})
    optimizer = _optimizer(section)
    scheduler = build_lr_scheduler(section, optimizer, 10)
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR
    for _ in range(3):
        _step(optimizer, scheduler)
    saved = (optimizer.state_dict(), scheduler.state_dict())
    resumed_optimizer = _optimizer(section)
    resumed_optimizer.load_state_dict(saved[0])
    resumed = build_lr_scheduler(section, resumed_optimizer, 10)
    resumed.load_state_dict(saved[1])
    for _ in range(3):
        _step(optimizer, scheduler)
        _step(resumed_optimizer, resumed)
        assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert scheduler.get_last_lr() == pytest.approx([base * 0.5 ** 3 for base in BASE_LRS])


def test_a_scheduler_class_refuses_unknown_args_and_a_warmup():
    section = _section("cosine", lr_scheduler_type="StepLR", lr_scheduler_args={"step_sise": 2})
    with pytest.raises(OptimizerConfigError, match=r"^optimizer\.lr_scheduler_args\.step_sise.*step_size"):
        build_lr_scheduler(section, _optimizer(section), 10)
    warm = _section("cosine", lr_scheduler_type="StepLR", lr_scheduler_args={"step_size": 2}, lr_warmup_steps=2)
    with pytest.raises(OptimizerConfigError, match=r"^optimizer\.lr_warmup_steps"):
        build_lr_scheduler(warm, _optimizer(warm), 10)


@pytest.mark.parametrize(("name", "expected"), [("torch.optim.lr_scheduler.ReduceLROnPlateau", "steps on its own"),
                                                ("torch.nn.Linear", "not a learning-rate scheduler"),
                                                ("torch.optim.lr_scheduler.NoSuch", "not a learning-rate")])
def test_a_class_path_that_is_no_usable_scheduler_is_refused(name: str, expected: str):
    section = _section("cosine", lr_scheduler_type=name)
    with pytest.raises(OptimizerConfigError, match=rf"^optimizer\.lr_scheduler_type: .*{expected}"):
        build_lr_scheduler(section, _optimizer(section), 10)


def test_every_bare_scheduler_name_is_a_torch_scheduler_class():
    from engine.config.sections_training import TORCH_LR_SCHEDULERS

    for name in TORCH_LR_SCHEDULERS:
        found = getattr(torch.optim.lr_scheduler, name, None)
        assert isinstance(found, type) and issubclass(found, LRScheduler), name
