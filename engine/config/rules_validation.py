"""Rules of the validation loss: keep_best and the validate_* settings need images held out for validation.

Whether the held-out set is empty is only known once the folders are scanned (a split of 0.1 over three images
holds out none); the dataset scan refuses that, and a split that leaves a subset no training image, with the
subset's path. These rules see the config alone: they catch the settings that cannot work whatever the folders.

Registered with the same `@rule` as the rules in :mod:`engine.config.rules`, which imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from engine.config.rule_registry import Problem, RuleContext, rule

if TYPE_CHECKING:
    from engine.config.schema import RunConfig


def holds_out_images(context: RuleContext) -> bool:
    """Whether some subset gives images to validation: a split above 0 for a training subset, or validation_only."""
    for dataset in context.datasets:
        split = dataset.params.get("validation_split") or 0.0
        for subset in dataset.subsets:
            if subset.params.get("validation_only") or (split > 0 and not subset.params.get("is_reg")):
                return True
    return False


@rule
def validation_needs_held_out_images(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if config.dataset.config_file and context.dataset_file is None:
        return  # the dataset file is not read yet; its caller checks again once it is
    if holds_out_images(context):
        return
    hint = ("set dataset.general.validation_split (e.g. 0.1) or mark a subset validation_only, so that some images "
            "are held out")
    if config.saving.keep_best:
        yield Problem("saving.keep_best", f"keeps the checkpoint with the lowest validation loss, and no images are "
                      f"held out for validation; {hint}, or turn keep_best off")
    if config.validation.validate_every_n_steps:
        yield Problem("validation.validate_every_n_steps", f"has no effect: no images are held out for "
                      f"validation; {hint}", "warning")


@rule
def keep_best_needs_saves(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    saving = config.saving
    if saving.keep_best and not (saving.save_every_n_epochs or saving.save_every_n_steps):
        yield Problem("saving.keep_best", "only the final file is saved, so there is no earlier checkpoint to keep; "
                      "set save_every_n_epochs or save_every_n_steps, or turn keep_best off", "warning")
