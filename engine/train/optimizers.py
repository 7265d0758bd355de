"""The optimizer registry: sd-scripts' optimizer names, or a dotted class path, to a ready torch optimizer.

Every name of `engine.config.choices.OPTIMIZERS` has a recipe here (the class and the few defaults sd-scripts
adds), so `optimizer_type` behaves as it does in kohya's `train_util.get_optimizer`. The class's module is
imported only when the recipe is used: a missing optional package is an error only for the person who picked it,
and that error names the package and the extra that installs it. A dotted class path is imported only from the
packages of `engine.config.choices.CLASS_PATH_PACKAGES` (importing a module runs its code).

`optimizer_args` are checked against the class's constructor before anything is built, because a misspelt key
(`weight_decy`) would otherwise be a TypeError deep inside the optimizer, or worse, silently swallowed by a
`**kwargs`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config.choices import (
    BITSANDBYTES,
    DADAPTATION,
    LION,
    OPTIMIZERS,
    PRODIGY,
    SCHEDULEFREE,
    OptionalPackage,
    class_path_problem,
    module_package,
)
from engine.config.sections_training import TORCH_OPTIMIZERS, OptimizerSection, torch_class_name

_ARGS_PATH = "optimizer.optimizer_args"
# Arguments the builder passes itself; a user who sets them in optimizer_args is told where they belong.
_RESERVED = {
    "params": "the trained parameters are chosen by the method",
    "lr": "set it with optimizer.learning_rate (and unet_lr / text_encoder_lr)",
}
# D-Adaptation and Prodigy find the step size themselves; a learning rate this low is almost always a mistake.
ADAPTIVE_LR_FLOOR = 0.1


class OptimizerConfigError(ValueError):
    """Optimizer or scheduler settings that cannot be built; the message starts with the config path to change."""


@dataclass
class BuiltOptimizer:
    """An optimizer and what a run records about it.

    Attributes:
        optimizer: the torch optimizer, already in train mode if it is schedule-free.
        name: the class path, e.g. 'torch.optim.adamw.AdamW' (sd-scripts' `optimizer_name`).
        description: sd-scripts' `ss_optimizer` metadata: the class path plus '(k=v,...)' when arguments were given.
        schedule_free: the optimizer needs no learning-rate schedule and must be switched with
            `set_train_mode` / `set_eval_mode` around sampling and saving.
        warnings: things the user should read (their settings were adjusted or look wrong).
    """

    optimizer: torch.optim.Optimizer
    name: str
    description: str
    schedule_free: bool
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Setup:
    """What a recipe's `prepare` step may adjust before the optimizer is built, as sd-scripts does per name."""

    section: OptimizerSection
    groups: list[dict[str, Any]]
    kwargs: dict[str, Any]
    lr: float | None
    warnings: list[str]


@dataclass(frozen=True)
class _Recipe:
    """How to build one optimizer name.

    `defaults` are added unless the user set them and show in the description (sd-scripts logs them the same way);
    `fixed` are always passed and cannot be overridden (SGDNesterov is Nesterov by definition).
    """

    module: str
    attr: str
    package: OptionalPackage | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    prepare: Callable[[_Setup], None] | None = None


def _one_adaptive_lr(setup: _Setup) -> None:
    """D-Adaptation and Prodigy: warn about a low lr, and give every group the first group's lr.

    These optimizers share one step-size estimate across groups and raise at the first step when the groups'
    learning rates differ (only 0 is allowed besides the common value), so the first lr is used throughout, as
    sd-scripts' warning says. Groups at 0 (frozen) keep 0.
    """
    first = setup.groups[0].get("lr", setup.lr)
    if first is not None and first <= ADAPTIVE_LR_FLOOR:
        setup.warnings.append(f"{setup.section.optimizer_type} finds its own step size and expects a learning rate "
                              f"around 1.0, not {first:g}")
    distinct = {group.get("lr", setup.lr) for group in setup.groups} - {0.0}
    if len(distinct) > 1:
        setup.warnings.append(f"{setup.section.optimizer_type} uses one learning rate for everything it trains: "
                              f"{first:g}, the first one; the other group learning rates are ignored")
        for group in setup.groups:
            if group.get("lr", setup.lr) != 0.0:
                group["lr"] = first
    setup.lr = first


def _adafactor(setup: _Setup) -> None:
    """Adafactor as sd-scripts runs it: relative_step on unless turned off, then it sets its own step size."""
    kwargs = setup.kwargs
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        setup.warnings.append("Adafactor: warmup_init needs relative_step, so relative_step is set to true")
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        _relative_step_notes(setup)
    else:
        _manual_step_notes(setup)


def _relative_step_notes(setup: _Setup) -> None:
    dropped = [group.pop("lr") for group in setup.groups if "lr" in group]
    note = ("Adafactor with relative_step computes its own learning rate: the adafactor scheduler is used instead "
            f"of lr_scheduler '{setup.section.lr_scheduler}', and learning_rate ({setup.section.learning_rate:g}) "
            "is only the value logged before the first step")
    if dropped:
        note += "; the group learning rates (unet_lr, text_encoder_lr) are ignored"
    setup.warnings.append(note)
    setup.lr = None  # Adafactor refuses an lr together with relative_step


def _manual_step_notes(setup: _Setup) -> None:
    if setup.section.max_grad_norm != 0.0:
        setup.warnings.append("Adafactor clips its updates itself; max_grad_norm adds gradient clipping on top "
                              "(consider max_grad_norm = 0)")
    if setup.section.lr_scheduler != "constant_with_warmup":
        setup.warnings.append("Adafactor without relative_step works best with lr_scheduler = "
                              "'constant_with_warmup'")
    if setup.kwargs.get("clip_threshold", 1.0) != 1.0:
        setup.warnings.append("Adafactor works best with clip_threshold = 1.0")


def _recipes() -> dict[str, _Recipe]:
    bnb, dadapt, experimental = "bitsandbytes.optim", "dadaptation", "dadaptation.experimental"
    nesterov: dict[str, Mapping[str, Any]] = {"defaults": {"momentum": 0.9}, "fixed": {"nesterov": True}}
    return {
        "AdamW": _Recipe("torch.optim", "AdamW"),
        "AdamW8bit": _Recipe(bnb, "AdamW8bit", BITSANDBYTES),
        "PagedAdamW": _Recipe(bnb, "PagedAdamW", BITSANDBYTES),
        "PagedAdamW8bit": _Recipe(bnb, "PagedAdamW8bit", BITSANDBYTES),
        "PagedAdamW32bit": _Recipe(bnb, "PagedAdamW32bit", BITSANDBYTES),
        "Lion": _Recipe("lion_pytorch", "Lion", LION),
        "Lion8bit": _Recipe(bnb, "Lion8bit", BITSANDBYTES),
        "PagedLion8bit": _Recipe(bnb, "PagedLion8bit", BITSANDBYTES),
        "SGDNesterov": _Recipe("torch.optim", "SGD", **nesterov),
        "SGDNesterov8bit": _Recipe(bnb, "SGD8bit", BITSANDBYTES, **nesterov),
        "DAdaptation": _Recipe(experimental, "DAdaptAdamPreprint", DADAPTATION, prepare=_one_adaptive_lr),
        "DAdaptAdamPreprint": _Recipe(experimental, "DAdaptAdamPreprint", DADAPTATION, prepare=_one_adaptive_lr),
        "DAdaptAdaGrad": _Recipe(dadapt, "DAdaptAdaGrad", DADAPTATION, prepare=_one_adaptive_lr),
        "DAdaptAdam": _Recipe(dadapt, "DAdaptAdam", DADAPTATION, prepare=_one_adaptive_lr),
        "DAdaptAdan": _Recipe(dadapt, "DAdaptAdan", DADAPTATION, prepare=_one_adaptive_lr),
        "DAdaptAdanIP": _Recipe(experimental, "DAdaptAdanIP", DADAPTATION, prepare=_one_adaptive_lr),
        "DAdaptLion": _Recipe(dadapt, "DAdaptLion", DADAPTATION, prepare=_one_adaptive_lr),
        "DAdaptSGD": _Recipe(dadapt, "DAdaptSGD", DADAPTATION, prepare=_one_adaptive_lr),
        "Prodigy": _Recipe("prodigyopt", "Prodigy", PRODIGY, prepare=_one_adaptive_lr),
        "Adafactor": _Recipe("transformers.optimization", "Adafactor", prepare=_adafactor),
        "AdamWScheduleFree": _Recipe("schedulefree", "AdamWScheduleFree", SCHEDULEFREE),
        "RAdamScheduleFree": _Recipe("schedulefree", "RAdamScheduleFree", SCHEDULEFREE),
        "SGDScheduleFree": _Recipe("schedulefree", "SGDScheduleFree", SCHEDULEFREE),
    }


OPTIMIZER_RECIPES: dict[str, _Recipe] = _recipes()


def is_schedule_free(optimizer_type: str) -> bool:
    """sd-scripts' rule: a registry name marked schedule-free, or any class name ending in 'schedulefree'."""
    info = OPTIMIZERS.get(optimizer_type)
    return info.schedule_free if info is not None else optimizer_type.lower().endswith("schedulefree")


def build_optimizer(section: OptimizerSection, param_groups: list[dict[str, Any]]) -> BuiltOptimizer:
    """Build the optimizer named by `section.optimizer_type` over `param_groups`.

    Args:
        section: the optimizer settings; `learning_rate` is the lr of groups that give none.
        param_groups: torch parameter groups (`{"params": [...], "lr": ...}`); they are copied, never changed.

    Raises:
        OptimizerConfigError: an unknown optimizer_args key, a missing package, or a class path that is not an
            optimizer.
    """
    if not param_groups:
        raise ValueError("build_optimizer needs at least one parameter group")
    recipe = OPTIMIZER_RECIPES.get(section.optimizer_type) or _dotted_recipe(section.optimizer_type)
    optimizer_class = _import_class(section.optimizer_type, recipe)
    setup = _Setup(section, [dict(group) for group in param_groups], dict(section.optimizer_args),
                   section.learning_rate, [])
    fixed_reasons = {key: f"{section.optimizer_type} always uses {key}={value}" for key, value in recipe.fixed.items()}
    check_arguments(optimizer_class, setup.kwargs, path=_ARGS_PATH, taken={**_RESERVED, **fixed_reasons})
    for key, value in recipe.defaults.items():
        setup.kwargs.setdefault(key, value)
    if recipe.prepare is not None:
        recipe.prepare(setup)
    kwargs = tuples_where_expected(optimizer_class, setup.kwargs)
    try:
        optimizer = optimizer_class(setup.groups, lr=setup.lr, **recipe.fixed, **kwargs)
    except (TypeError, ValueError) as error:
        raise OptimizerConfigError(f"{_ARGS_PATH}: {optimizer_class.__name__} rejected {kwargs}: {error}") from error
    schedule_free = is_schedule_free(section.optimizer_type)
    if schedule_free:
        set_train_mode(optimizer)
    name = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    arguments = ",".join(f"{key}={value}" for key, value in kwargs.items())
    description = f"{name}({arguments})" if arguments else name
    return BuiltOptimizer(optimizer, name, description, schedule_free, setup.warnings)


def _dotted_recipe(class_path: str) -> _Recipe:
    """A recipe for 'package.module.Class', the form sd-scripts accepts for optimizers outside its list, or for a
    bare torch.optim class name ('RMSprop'), which sd-scripts looks up in torch.optim."""
    module, _, attr = class_path.rpartition(".")
    if not module:
        torch_name = torch_class_name(class_path, TORCH_OPTIMIZERS)
        if torch_name is not None:
            return _Recipe("torch.optim", torch_name)
        raise OptimizerConfigError(f"optimizer.optimizer_type: unknown optimizer {class_path!r}; choose one of "
                                   f"{', '.join(OPTIMIZERS)}, a torch.optim class ({', '.join(TORCH_OPTIMIZERS)}), "
                                   "or give a full class path such as 'torch.optim.RAdam'")
    return _Recipe(module, attr)


def _import_class(optimizer_type: str, recipe: _Recipe) -> type[torch.optim.Optimizer]:
    # Checked again here, not only by validate: a section built in code or copied around skips the config's
    # validation (model_construct, model_copy), and importing a module runs its code.
    problem = class_path_problem(f"{recipe.module}.{recipe.attr}")
    if problem is not None:
        raise OptimizerConfigError(f"optimizer.optimizer_type: {problem}")
    try:
        module = importlib.import_module(recipe.module)
    except ModuleNotFoundError as error:
        raise OptimizerConfigError(f"optimizer.optimizer_type: {optimizer_type} cannot be imported: "
                                   f"{_missing_module_hint(error.name or recipe.module)}") from error
    optimizer_class = getattr(module, recipe.attr, None)
    if optimizer_class is None:
        raise OptimizerConfigError(f"optimizer.optimizer_type: {recipe.module} has no {recipe.attr!r}")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise OptimizerConfigError(f"optimizer.optimizer_type: {recipe.module}.{recipe.attr} is not a torch "
                                   "optimizer class")
    return optimizer_class


def _missing_module_hint(missing: str) -> str:
    """Name the package to install, or, when the package is there, the module path that is wrong."""
    package = module_package(missing)
    if package.is_installed():
        return f"there is no module {missing!r}; check the class path"
    return f"it needs the '{package.module}' package, which is not installed; {package.install_hint()}"


def accepted_arguments(function: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments `function` (or a class's constructor) accepts; None if it takes any (**kwargs)."""
    parameters = inspect.signature(function).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [parameter.name for parameter in parameters if parameter.kind in keyword_kinds]


def check_arguments(function: Callable[..., Any], given: Collection[str], *, path: str,
                    taken: Mapping[str, str]) -> None:
    """Refuse keys of `given` that `function` does not accept, or that the builder passes itself.

    Args:
        function: the class or function the keys go to; its signature says what it accepts.
        given: the user's keys.
        path: the config path of the table the keys came from, e.g. 'optimizer.optimizer_args'.
        taken: arguments the builder fills itself, each with where the user sets it instead.

    Raises:
        OptimizerConfigError: naming `<path>.<key>` and listing the keys that are accepted.
    """
    accepted = accepted_arguments(function)
    allowed = None if accepted is None else [name for name in accepted if name not in taken]
    name = getattr(function, "__name__", str(function))
    for key in given:
        if key in taken:
            why = taken[key]
        elif allowed is not None and key not in allowed:
            why = f"{name} has no argument {key!r}"
        else:
            continue
        listing = "any keyword" if allowed is None else (", ".join(allowed) or "none")
        raise OptimizerConfigError(f"{path}.{key}: not accepted ({why}); accepted keys: {listing}")


def tuples_where_expected(function: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Turn TOML lists into tuples for arguments declared or defaulted as tuples (betas, eps pairs).

    TOML has no tuples, and some optimizers index or compare their betas as tuples, so a list would break them.
    """
    parameters = inspect.signature(function).parameters
    converted = {}
    for key, value in kwargs.items():
        parameter = parameters.get(key)
        wants_tuple = parameter is not None and (isinstance(parameter.default, tuple)
                                                 or "tuple" in str(parameter.annotation).lower())
        converted[key] = tuple(value) if isinstance(value, list) and wants_tuple else value
    return converted


def set_train_mode(optimizer: Any) -> None:
    """Switch a schedule-free optimizer to its training weights before training steps; others have no modes.

    Duck-typed, so it also works through accelerate's wrapper, which forwards train()/eval() to the optimizer.
    """
    _call_if_present(optimizer, "train")


def set_eval_mode(optimizer: Any) -> None:
    """Switch a schedule-free optimizer to its averaged weights before sampling, saving or validation."""
    _call_if_present(optimizer, "eval")


def _call_if_present(optimizer: Any, method: str) -> None:
    switch = getattr(optimizer, method, None)
    if callable(switch):
        switch()
