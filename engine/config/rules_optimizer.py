"""Cross-field rules of the optimizer section's class options (sd-scripts' --lr_scheduler_type).

Registered with the same `@rule` as the rules in :mod:`engine.config.rules`, which imports this module so that
`check()` runs them all. Which classes may be named at all is the fields' own validation (allowed packages, checked
without importing anything).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from engine.config.choices import module_package
from engine.config.rule_registry import Problem, RuleContext, rule

if TYPE_CHECKING:
    from engine.config.schema import RunConfig


@rule
def scheduler_class_has_no_warmup(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    """sd-scripts refuses a warm-up with --lr_scheduler_type: the class gets only its own arguments."""
    optimizer = config.optimizer
    if optimizer.lr_scheduler_type and optimizer.lr_warmup_steps:
        yield Problem("optimizer.lr_warmup_steps", f"lr_scheduler_type {optimizer.lr_scheduler_type} has no warm-up; "
                      "set lr_warmup_steps = 0, or clear lr_scheduler_type to use lr_scheduler's warm-up")


@rule
def scheduler_class_package_installed(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    """A scheduler class path's package must be installed (a bare name is torch's), like an optimizer's."""
    name = config.optimizer.lr_scheduler_type
    if not context.check_packages or "." not in name:
        return
    package = module_package(name)
    if not package.is_installed():
        yield Problem("optimizer.lr_scheduler_type", f"{name} needs the '{package.module}' package, which is not "
                      f"installed; {package.install_hint()}")
