"""The optimizer registry builds every optimizer name as sd-scripts does, honours group lrs, and refuses bad input."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from engine.config.choices import OPTIMIZERS
from engine.config.sections_training import OptimizerSection
from engine.train.optimizers import (
    OPTIMIZER_RECIPES,
    BuiltOptimizer,
    OptimizerConfigError,
    build_optimizer,
    set_eval_mode,
    set_train_mode,
)

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

STEPS = 6  # RAdamScheduleFree only starts moving after its first few (rectification) steps


def _params() -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return (torch.nn.Parameter(torch.randn(4, 3, generator=generator)),
            torch.nn.Parameter(torch.randn(5, generator=generator)))


def _train(built: BuiltOptimizer, params: tuple[torch.nn.Parameter, ...], steps: int = STEPS) -> None:
    """A few steps of a quadratic loss, whose gradients differ per element and per step."""
    for _ in range(steps):
        built.optimizer.zero_grad()
        sum((p ** 2).sum() + p.sum() for p in params).backward()
        built.optimizer.step()


def _alone(name: str, lr: float, index: int, **args: Any) -> torch.Tensor:
    """Parameter `index` trained on its own by an optimizer whose base learning rate is `lr` (no group lr)."""
    params = _params()
    built = build_optimizer(OptimizerSection(optimizer_type=name, learning_rate=lr, optimizer_args=args),
                            [{"params": [params[index]]}])
    _train(built, (params[index],))
    return params[index].detach()


def _adaptive(name: str) -> bool:
    return OPTIMIZERS[name].adaptive_lr


def test_the_registry_has_a_recipe_for_every_optimizer_name():
    assert set(OPTIMIZER_RECIPES) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_builds_and_steps_with_two_groups(name: str):
    lr_first, lr_second = (1.0, 0.5) if _adaptive(name) else (1e-2, 1e-3)
    params = _params()
    before = [p.detach().clone() for p in params]
    built = build_optimizer(OptimizerSection(optimizer_type=name, learning_rate=lr_first),
                            [{"params": [params[0]], "lr": lr_first}, {"params": [params[1]], "lr": lr_second}])
    _train(built, params)
    for param, start in zip(params, before, strict=True):
        assert not torch.equal(param.detach(), start), f"{name} did not change the parameters"
    assert built.schedule_free == OPTIMIZERS[name].schedule_free
    assert built.name == f"{type(built.optimizer).__module__}.{type(built.optimizer).__name__}"
    assert built.description.startswith(built.name)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if not _adaptive(n) and n != "Adafactor"])
def test_group_learning_rates_are_honoured(name: str):
    """Each group trains exactly as if it were alone with its own learning rate."""
    params = _params()
    build = build_optimizer(OptimizerSection(optimizer_type=name, learning_rate=1e-2),
                            [{"params": [params[0]], "lr": 1e-2}, {"params": [params[1]], "lr": 1e-3}])
    _train(build, params)
    torch.testing.assert_close(params[0].detach(), _alone(name, 1e-2, 0))
    torch.testing.assert_close(params[1].detach(), _alone(name, 1e-3, 1))
    assert not torch.allclose(_alone(name, 1e-2, 1), _alone(name, 1e-3, 1)), "the lr makes no difference"


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if _adaptive(n)])
def test_adaptive_optimizers_use_the_first_learning_rate_and_warn(name: str):
    params = _params()
    groups = [{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.5}]
    built = build_optimizer(OptimizerSection(optimizer_type=name, learning_rate=2.0), groups)
    assert [group["lr"] for group in built.optimizer.param_groups] == [1.0, 1.0]
    assert groups[1]["lr"] == 0.5, "the caller's groups must not be changed"
    assert any("first" in warning for warning in built.warnings)
    low = build_optimizer(OptimizerSection(optimizer_type=name, learning_rate=1e-4), [{"params": [params[0]]}])
    assert any("around 1.0" in warning for warning in low.warnings)


def test_sgd_nesterov_defaults_to_momentum_0_9_and_is_always_nesterov():
    built = build_optimizer(OptimizerSection(optimizer_type="SGDNesterov"), [{"params": list(_params())}])
    assert built.optimizer.defaults["nesterov"] is True
    assert built.optimizer.defaults["momentum"] == 0.9
    assert built.description == "torch.optim.sgd.SGD(momentum=0.9)"
    own = build_optimizer(OptimizerSection(optimizer_type="SGDNesterov", optimizer_args={"momentum": 0.5}),
                          [{"params": list(_params())}])
    assert own.optimizer.defaults["momentum"] == 0.5
    with pytest.raises(OptimizerConfigError, match=r"optimizer\.optimizer_args\.nesterov.*always"):
        build_optimizer(OptimizerSection(optimizer_type="SGDNesterov", optimizer_args={"nesterov": False}),
                        [{"params": list(_params())}])


def test_optimizer_args_reach_the_optimizer_and_lists_become_tuples():
    args = {"weight_decay": 0.05, "betas": [0.8, 0.95]}
    built = build_optimizer(OptimizerSection(optimizer_args=args), [{"params": list(_params())}])
    assert built.optimizer.defaults["weight_decay"] == 0.05
    assert built.optimizer.defaults["betas"] == (0.8, 0.95)
    assert isinstance(built.optimizer.defaults["betas"], tuple)
    assert built.description == f"{built.name}(weight_decay=0.05,betas={(0.8, 0.95)})"


def test_an_unknown_optimizer_arg_names_its_path_and_the_accepted_keys():
    with pytest.raises(OptimizerConfigError) as caught:
        build_optimizer(OptimizerSection(optimizer_args={"weight_decy": 0.1}), [{"params": list(_params())}])
    message = str(caught.value)
    assert message.startswith("optimizer.optimizer_args.weight_decy")
    assert "weight_decay" in message and "betas" in message
    assert "params" not in message.split("accepted keys:")[1]
    with pytest.raises(OptimizerConfigError, match=r"optimizer_args\.lr.*learning_rate"):
        build_optimizer(OptimizerSection(optimizer_args={"lr": 0.1}), [{"params": list(_params())}])


def test_a_bad_value_is_a_config_error():
    with pytest.raises(OptimizerConfigError, match="optimizer.optimizer_args"):
        build_optimizer(OptimizerSection(optimizer_args={"betas": [1.5, 0.9]}), [{"params": list(_params())}])


@pytest.mark.parametrize("path", ["torch.optim.RAdam", "bitsandbytes.optim.AdEMAMix8bit"])
def test_a_dotted_class_path_builds_that_class(path: str):
    params = _params()
    before = params[0].detach().clone()
    built = build_optimizer(OptimizerSection(optimizer_type=path, learning_rate=1e-2),
                            [{"params": [params[0]], "lr": 1e-2}, {"params": [params[1]], "lr": 1e-3}])
    module, _, attr = path.rpartition(".")
    assert type(built.optimizer) is getattr(sys.modules[module], attr)
    assert [group["lr"] for group in built.optimizer.param_groups] == [1e-2, 1e-3]
    assert not built.schedule_free
    _train(built, params)
    assert not torch.equal(params[0].detach(), before)


def test_a_dotted_schedule_free_class_is_schedule_free():
    built = build_optimizer(OptimizerSection(optimizer_type="schedulefree.SGDScheduleFree"),
                            [{"params": list(_params())}])
    assert built.schedule_free
    assert built.optimizer.param_groups[0]["train_mode"]


def test_a_missing_package_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch):
    # An allowed package that is not installed (a None entry in sys.modules makes it unimportable here).
    monkeypatch.setitem(sys.modules, "came_pytorch", None)
    with pytest.raises(OptimizerConfigError) as caught:
        build_optimizer(OptimizerSection(optimizer_type="came_pytorch.CAME"), [{"params": list(_params())}])
    message = str(caught.value)
    assert message.startswith("optimizer.optimizer_type")
    assert "'came_pytorch' package" in message and "pip install came-pytorch" in message


def test_a_missing_known_package_names_its_extra(monkeypatch: pytest.MonkeyPatch):
    # A None entry in sys.modules is Python's own way to make a module unimportable.
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(OptimizerConfigError, match=r"prodigyopt.*pip install -e \.\[optimizers\]"):
        build_optimizer(OptimizerSection(optimizer_type="Prodigy", learning_rate=1.0), [{"params": list(_params())}])


@pytest.mark.parametrize(("path", "expected"), [("torch.nn.Linear", "not a torch optimizer class"),
                                                ("torch.optim.NoSuchOptimizer", "has no 'NoSuchOptimizer'"),
                                                ("torch.optim.AdamW.inner", "no module 'torch.optim.AdamW'")])
def test_a_class_path_that_is_no_optimizer_is_refused(path: str, expected: str):
    with pytest.raises(OptimizerConfigError, match=expected):
        build_optimizer(OptimizerSection(optimizer_type=path), [{"params": list(_params())}])


def test_adafactor_relative_step_drops_group_lrs_and_says_so():
    params = _params()
    groups = [{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-4}]
    built = build_optimizer(OptimizerSection(optimizer_type="Adafactor", learning_rate=1e-3), groups)
    assert built.optimizer.defaults["relative_step"] is True
    assert all(group["lr"] is None for group in built.optimizer.param_groups)
    assert groups[0]["lr"] == 1e-3, "the caller's groups must not be changed"
    assert built.description == "transformers.optimization.Adafactor(relative_step=True)"
    assert any("adafactor scheduler" in w and "ignored" in w for w in built.warnings)


def test_adafactor_without_relative_step_honours_group_lrs():
    args = {"relative_step": False, "scale_parameter": False}
    params = _params()
    built = build_optimizer(OptimizerSection(optimizer_type="Adafactor", learning_rate=1e-2, optimizer_args=args),
                            [{"params": [params[0]], "lr": 1e-2}, {"params": [params[1]], "lr": 1e-3}])
    assert not any("adafactor scheduler" in warning for warning in built.warnings)
    assert any("max_grad_norm" in warning for warning in built.warnings)
    _train(built, params)
    torch.testing.assert_close(params[0].detach(), _alone("Adafactor", 1e-2, 0, **args))
    torch.testing.assert_close(params[1].detach(), _alone("Adafactor", 1e-3, 1, **args))


def test_adafactor_warmup_init_turns_relative_step_on():
    args = {"relative_step": False, "warmup_init": True}
    built = build_optimizer(OptimizerSection(optimizer_type="Adafactor", optimizer_args=args),
                            [{"params": list(_params())}])
    assert built.optimizer.defaults["relative_step"] is True
    assert any("warmup_init" in warning for warning in built.warnings)


def test_schedule_free_modes_swap_the_weights_and_back():
    params = _params()
    built = build_optimizer(OptimizerSection(optimizer_type="AdamWScheduleFree", learning_rate=1e-2),
                            [{"params": list(params)}])
    _train(built, params)
    training = params[0].detach().clone()
    set_eval_mode(built.optimizer)
    assert not built.optimizer.param_groups[0]["train_mode"]
    assert not torch.allclose(params[0].detach(), training), "eval mode uses the averaged weights"
    set_train_mode(built.optimizer)
    assert built.optimizer.param_groups[0]["train_mode"]
    torch.testing.assert_close(params[0].detach(), training)


def test_modes_do_nothing_for_other_optimizers():
    params = _params()
    built = build_optimizer(OptimizerSection(), [{"params": list(params)}])
    state = [p.detach().clone() for p in params]
    set_eval_mode(built.optimizer)
    set_train_mode(built.optimizer)
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, state, strict=True))


@pytest.mark.parametrize("name", ["torch.optim.RMSprop", "RMSprop", "rmsprop"])
def test_rmsprop_by_class_path_or_bare_torch_name_builds_and_steps(name: str):
    params = _params()
    before = [param.detach().clone() for param in params]
    section = OptimizerSection(optimizer_type=name, learning_rate=1e-2)
    built = build_optimizer(section, [{"params": list(params)}])
    assert type(built.optimizer) is torch.optim.RMSprop
    assert built.name == "torch.optim.rmsprop.RMSprop"
    _train(built, params)
    assert all(not torch.equal(param.detach(), old) for param, old in zip(params, before, strict=True))


def test_every_bare_torch_name_is_a_torch_optimizer_class():
    from engine.config.sections_training import TORCH_OPTIMIZERS

    for name in TORCH_OPTIMIZERS:
        found = getattr(torch.optim, name, None)
        assert isinstance(found, type) and issubclass(found, torch.optim.Optimizer), name


def test_a_registry_name_wins_over_torchs_class_of_that_name():
    # torch.optim has an Adafactor too; 'Adafactor' stays sd-scripts' (transformers') Adafactor.
    built = build_optimizer(OptimizerSection(optimizer_type="Adafactor"), [{"params": list(_params())}])
    assert built.name == "transformers.optimization.Adafactor"


def test_an_unknown_bare_name_is_refused_listing_torchs_names():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"unknown optimizer 'RMSpropp'.*RMSprop"):
        OptimizerSection(optimizer_type="RMSpropp")
