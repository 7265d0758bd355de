"""Cross-field rules of the EMA section: settings that would do nothing, and an EMA that would never update.

Registered with the same `@rule` as the rules in :mod:`engine.config.rules`, which imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from engine.config.rule_registry import Problem, RuleContext, rule
from engine.config.sections_ema import EmaSection

if TYPE_CHECKING:
    from engine.config.schema import RunConfig


@rule
def ema_settings_need_ema(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    """The EMA's own settings do nothing while it is off: say so, rather than let a changed value look active."""
    ema = config.ema
    if ema.enabled:
        return
    defaults = EmaSection()
    changed = [name for name in EmaSection.model_fields if name != "enabled"
               and getattr(ema, name) != getattr(defaults, name)]
    if changed:
        yield Problem(f"ema.{changed[0]}", f"ema.{', ema.'.join(changed)} take effect only with ema.enabled = true; "
                      "turn the EMA on, or leave them at their defaults", severity="warning")


@rule
def ema_updates_within_the_run(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    """An EMA updated less often than the run is long would never average anything."""
    ema, steps = config.ema, config.training.max_train_steps
    if not ema.enabled or steps <= 0:
        return
    if ema.update_every_n_steps > steps:
        yield Problem("ema.update_every_n_steps", f"{ema.update_every_n_steps} is more than the run's "
                      f"{steps} steps (training.max_train_steps), so the EMA would never be updated; set it to at "
                      f"most {steps}")
        return
    updates = steps // ema.update_every_n_steps
    horizon = 1 / (1 - ema.decay)
    if updates < horizon:
        yield Problem("ema.decay", f"{ema.decay:g} averages over about {horizon:.0f} EMA updates, but the run makes "
                      f"only {updates}; the EMA will stay close to the early weights. Lower ema.decay (e.g. to "
                      f"{1 - 1 / max(updates / 4, 2):.3g}) or train longer", severity="warning")
