"""The learning-rate scheduler registry: every `lr_scheduler` name to a torch `LRScheduler`, as sd-scripts builds it.

The schedules are transformers' own functions (the table behind `transformers.get_scheduler`), diffusers'
`piecewise_constant` and transformers' `AdafactorSchedule`, called with the arguments sd-scripts'
`get_scheduler_fix` passes. Each is a plain `LambdaLR`, so `state_dict()` / `load_state_dict()` resume it exactly.

Step counts are in scheduler steps. When the scheduler is prepared by accelerate it is stepped once per process
for every optimizer step, so sd-scripts multiplies the run length by `num_processes`; we multiply every step count
the user gives (warm-up, decay, step_rules, timescale) the same way, so that "100 warm-up steps" means 100
optimizer steps on any number of GPUs (sd-scripts leaves whole-number warm-ups unscaled).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from engine.config.choices import class_path_problem
from engine.config.sections_training import TORCH_LR_SCHEDULERS, OptimizerSection, torch_class_name
from engine.train.optimizers import OptimizerConfigError, check_arguments, tuples_where_expected

_ARGS_PATH = "optimizer.lr_scheduler_args"
_TYPE_PATH = "optimizer.lr_scheduler_type"
# Resuming goes through state_dict(), never last_epoch, so it is not offered either.
_ALWAYS_TAKEN = {"optimizer": "the trained optimizer is passed by the trainer",
                 "last_epoch": "resuming restores the scheduler's state instead"}


@dataclass(frozen=True)
class _Context:
    """What a schedule is built from: the settings and the run length, both in scheduler steps."""

    section: OptimizerSection
    optimizer: Optimizer
    total: int
    warmup: int
    num_processes: int

    def steps(self, value: int | float) -> int:
        """A user's step count (whole steps, or a fraction < 1 of the run) in scheduler steps."""
        return int(value * self.total) if isinstance(value, float) else value * self.num_processes


@dataclass(frozen=True)
class _Recipe:
    """How one `lr_scheduler` name is built.

    Attributes:
        load: imports and returns the schedule function or class (lazily: transformers and diffusers are heavy).
        fill: the arguments computed from the section, which the user cannot also set in lr_scheduler_args.
        adapt: turns the user's lr_scheduler_args into the function's (aliases, step counts).
        required: lr_scheduler_args keys of which the schedule needs one, and an example setting.
        no_warmup: why a warm-up cannot be used and what to do instead; None if the schedule has one.
    """

    load: Callable[[], Callable[..., LRScheduler]]
    fill: Callable[[_Context], dict[str, Any]]
    adapt: Callable[[dict[str, Any], _Context], dict[str, Any]] | None = None
    required: tuple[tuple[str, ...], str] | None = None
    no_warmup: str | None = None


def _transformers(name: str) -> Callable[[], Callable[..., LRScheduler]]:
    def load() -> Callable[..., LRScheduler]:
        from transformers import SchedulerType
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]

    return load


def _diffusers_piecewise() -> Callable[..., LRScheduler]:
    from diffusers.optimization import get_piecewise_constant_schedule

    return get_piecewise_constant_schedule


def _adafactor_schedule() -> Callable[..., LRScheduler]:
    from transformers.optimization import AdafactorSchedule

    return AdafactorSchedule


def _nothing(ctx: _Context) -> dict[str, Any]:
    return {}


def _warmup(ctx: _Context) -> dict[str, Any]:
    return {"num_warmup_steps": ctx.warmup}


def _warmup_and_total(ctx: _Context) -> dict[str, Any]:
    return {"num_warmup_steps": ctx.warmup, "num_training_steps": ctx.total}


def _restarts(ctx: _Context) -> dict[str, Any]:
    return {**_warmup_and_total(ctx), "num_cycles": ctx.section.lr_scheduler_num_cycles}


def _power(ctx: _Context) -> dict[str, Any]:
    return {**_warmup_and_total(ctx), "power": ctx.section.lr_scheduler_power}


def _half_cycles(ctx: _Context) -> dict[str, Any]:
    """sd-scripts passes num_cycles / 2 here: one cycle is a half cosine from the top down to the minimum."""
    return {**_warmup_and_total(ctx), "num_cycles": ctx.section.lr_scheduler_num_cycles / 2}


def _decay(ctx: _Context) -> dict[str, Any]:
    # The stable phase is what warm-up and decay leave, as in sd-scripts: None lets transformers derive it.
    return {**_half_cycles(ctx), "num_stable_steps": None}


def _adafactor_initial_lr(ctx: _Context) -> dict[str, Any]:
    if not uses_adafactor_schedule(ctx.optimizer):
        raise OptimizerConfigError("optimizer.lr_scheduler: the adafactor scheduler only follows the Adafactor "
                                   "optimizer with relative_step = true; pick another scheduler")
    return {"initial_lr": ctx.section.learning_rate}


def _min_lr_ratio(args: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """Accept sd-scripts' name `min_lr_ratio` (--lr_scheduler_min_lr_ratio) for transformers' `min_lr_rate`."""
    if "min_lr_ratio" in args:
        args = dict(args)
        args["min_lr_rate"] = args.pop("min_lr_ratio")
    return args


def _decay_steps(args: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    if isinstance(args.get("num_decay_steps"), int | float):
        args = {**args, "num_decay_steps": ctx.steps(args["num_decay_steps"])}
        if ctx.warmup + args["num_decay_steps"] > ctx.total:
            raise OptimizerConfigError(f"{_ARGS_PATH}.num_decay_steps: warm-up and decay together are longer than "
                                       "the run; shorten one of them")
    return args


def _timescale(args: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    if isinstance(args.get("timescale"), int):
        args = {**args, "timescale": ctx.steps(args["timescale"])}
    return args


def _step_rules(args: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """Scale the step boundaries of diffusers' 'multiplier:steps,...,last_multiplier' rules to scheduler steps."""
    rules = args.get("step_rules")
    if not isinstance(rules, str) or ctx.num_processes == 1:
        return args
    *bounded, last = rules.split(",")
    try:
        scaled = [f"{value}:{int(steps) * ctx.num_processes}" for value, steps in (rule.split(":") for rule in bounded)]
    except ValueError as error:
        raise OptimizerConfigError(f"{_ARGS_PATH}.step_rules: {rules!r} is not of the form "
                                   "'1:100,0.5:200,0.1' (multiplier:until step, ..., last multiplier)") from error
    return {**args, "step_rules": ",".join([*scaled, last])}


_RECIPES: dict[str, _Recipe] = {
    "constant": _Recipe(_transformers("constant"), _nothing,
                        no_warmup="use lr_scheduler = 'constant_with_warmup' or set lr_warmup_steps = 0"),
    "constant_with_warmup": _Recipe(_transformers("constant_with_warmup"), _warmup),
    "linear": _Recipe(_transformers("linear"), _warmup_and_total),
    "cosine": _Recipe(_transformers("cosine"), _warmup_and_total),
    "cosine_with_restarts": _Recipe(_transformers("cosine_with_restarts"), _restarts),
    "cosine_with_min_lr": _Recipe(_transformers("cosine_with_min_lr"), _half_cycles, _min_lr_ratio,
                                  required=(("min_lr_ratio", "min_lr"), "min_lr_ratio = 0.1")),
    "polynomial": _Recipe(_transformers("polynomial"), _power),
    "inverse_sqrt": _Recipe(_transformers("inverse_sqrt"), _warmup, _timescale),
    "warmup_stable_decay": _Recipe(_transformers("warmup_stable_decay"), _decay, _decay_steps,
                                   required=(("num_decay_steps",), "num_decay_steps = 0.2")),
    "piecewise_constant": _Recipe(_diffusers_piecewise, _nothing, _step_rules,
                                  required=(("step_rules",), "step_rules = '1:500,0.1'"),
                                  no_warmup="write the warm-up into step_rules, or set lr_warmup_steps = 0"),
    "adafactor": _Recipe(_adafactor_schedule, _adafactor_initial_lr,
                         no_warmup="Adafactor with relative_step sets its own learning rate; set lr_warmup_steps = "
                                   "0 (optimizer_args warmup_init = true is its own warm-up), or set optimizer_args "
                                   "relative_step = false to use lr_scheduler"),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_RECIPES)


def warmup_steps(section: OptimizerSection, total_steps: int) -> int:
    """The warm-up in steps: `lr_warmup_steps` as is when whole, or that fraction of `total_steps`."""
    value = section.lr_warmup_steps
    return int(value * total_steps) if isinstance(value, float) else value


def uses_adafactor_schedule(optimizer: Optimizer) -> bool:
    """True for transformers' Adafactor with relative_step: it computes its own lr, which only that schedule shows."""
    # An Adafactor instance means its module is loaded already; looking there spares importing transformers.
    module = sys.modules.get("transformers.optimization")
    return module is not None and isinstance(optimizer, module.Adafactor) and bool(optimizer.defaults["relative_step"])


def build_lr_scheduler(section: OptimizerSection, optimizer: Optimizer, total_steps: int, *,
                       num_processes: int = 1, schedule_free: bool = False) -> LRScheduler:
    """Build the learning-rate schedule for a run of `total_steps` optimizer steps.

    Args:
        section: the optimizer settings (lr_scheduler, warm-up, cycles, power, lr_scheduler_args).
        optimizer: the built optimizer; its group lrs are the peaks the schedule scales.
        total_steps: optimizer steps in the run (max_train_steps).
        num_processes: how many times the scheduler is stepped per optimizer step (accelerate steps a prepared
            scheduler once per process).
        schedule_free: the optimizer schedules itself (`BuiltOptimizer.schedule_free`); it gets a constant
            schedule so the loop and the saved state look the same as for any other optimizer.

    Raises:
        OptimizerConfigError: a warm-up the schedule cannot do, or lr_scheduler_args that do not fit.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, not {total_steps}")
    if schedule_free:
        return _transformers("constant")()(optimizer)
    if section.lr_scheduler_type:  # before the Adafactor rule below, in sd-scripts' order
        return build_class_scheduler(section, optimizer)
    # sd-scripts hands a relative-step Adafactor to its own schedule whatever lr_scheduler says (and warns).
    name = "adafactor" if uses_adafactor_schedule(optimizer) else section.lr_scheduler
    recipe = _RECIPES[name]
    context = _Context(section, optimizer, total_steps * num_processes,
                       warmup_steps(section, total_steps) * num_processes, num_processes)
    if context.warmup and recipe.no_warmup is not None:
        raise OptimizerConfigError(f"optimizer.lr_warmup_steps: the {name} scheduler has no warm-up; "
                                   f"{recipe.no_warmup}")
    schedule = recipe.load()
    filled = recipe.fill(context)
    args = _user_arguments(name, recipe, context)
    check_arguments(schedule, args, path=_ARGS_PATH,
                    taken={**_ALWAYS_TAKEN, **{key: f"set by the {name} scheduler's settings" for key in filled}})
    try:
        return schedule(optimizer, **filled, **args)
    except (TypeError, ValueError) as error:
        raise OptimizerConfigError(f"optimizer.lr_scheduler: {name} could not be built: {error}") from error


def _user_arguments(name: str, recipe: _Recipe, context: _Context) -> dict[str, Any]:
    """lr_scheduler_args, checked for the keys the schedule needs and converted to the function's arguments."""
    args = dict(context.section.lr_scheduler_args)
    if recipe.required is not None and not any(key in args for key in recipe.required[0]):
        keys, example = recipe.required
        raise OptimizerConfigError(f"{_ARGS_PATH}.{keys[0]}: the {name} scheduler needs {' or '.join(keys)}, e.g. "
                                   f"lr_scheduler_args = {{{example}}}")
    return recipe.adapt(args, context) if recipe.adapt is not None else args


def build_class_scheduler(section: OptimizerSection, optimizer: Optimizer) -> LRScheduler:
    """sd-scripts' --lr_scheduler_type: the named class built as `cls(optimizer, **lr_scheduler_args)`.

    No warm-up (sd-scripts refuses one here too) and no step scaling: the arguments are the class's own, in
    scheduler steps.

    Raises:
        OptimizerConfigError: a warm-up, a class path outside the allowed packages or that is not a scheduler, or
            arguments the class does not take.
    """
    if section.lr_warmup_steps:
        raise OptimizerConfigError(f"optimizer.lr_warmup_steps: lr_scheduler_type {section.lr_scheduler_type} has no "
                                   "warm-up; set lr_warmup_steps = 0 (or write the warm-up into the class's "
                                   "arguments if it has one)")
    scheduler_class = scheduler_class_for(section.lr_scheduler_type)
    args = tuples_where_expected(scheduler_class, dict(section.lr_scheduler_args))
    check_arguments(scheduler_class, args, path=_ARGS_PATH, taken=_ALWAYS_TAKEN)
    try:
        return scheduler_class(optimizer, **args)
    except (TypeError, ValueError, KeyError) as error:
        raise OptimizerConfigError(f"{_ARGS_PATH}: {scheduler_class.__name__} could not be built from {args}: "
                                   f"{error}") from error


def scheduler_class_for(name: str) -> type[LRScheduler]:
    """The scheduler class of a bare torch.optim.lr_scheduler name or an allowed class path; imports only the
    allowed packages' modules (checked again here: a section built in code skips the config's validation)."""
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    bare = torch_class_name(name, TORCH_LR_SCHEDULERS)
    module_name, _, attr = f"torch.optim.lr_scheduler.{bare}".rpartition(".") if bare else name.rpartition(".")
    problem = class_path_problem(f"{module_name}.{attr}")
    if problem is not None:
        raise OptimizerConfigError(f"{_TYPE_PATH}: {problem}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise OptimizerConfigError(f"{_TYPE_PATH}: {name} cannot be imported: there is no module "
                                   f"{error.name or module_name!r}; check the class path") from error
    found = getattr(module, attr, None)
    if not (isinstance(found, type) and issubclass(found, LRScheduler)) or issubclass(found, ReduceLROnPlateau):
        raise OptimizerConfigError(f"{_TYPE_PATH}: {name} is not a learning-rate scheduler class that steps on its "
                                   f"own; use one of {', '.join(TORCH_LR_SCHEDULERS)} or another LRScheduler "
                                   "class path")
    return found
