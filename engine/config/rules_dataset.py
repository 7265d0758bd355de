"""Cross-field rules of the dataset keys that act only in some combinations (issue 14, "no dead keys").

* `network_multiplier` scales a network's output per dataset, so a method without a network cannot use it.
* `custom_attributes` takes `diff_output_preservation` only (the one attribute sd-scripts reads), and that needs a
  network whose multiplier can be set to 0 (LoRA and LyCORIS).
* `face_crop_aug_range` crops around a face box each step, only with buckets off (as sd-scripts) and never from
  cached latents.
* `training.masked_loss` needs a subset that gives masks (`conditioning_data_dir`, or `alpha_mask`), else it
  would do nothing.

Registered with the same `@rule` as the rules in :mod:`engine.config.rules`, which imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from engine.config.rule_registry import Problem, RuleContext, rule

if TYPE_CHECKING:
    from engine.config.schema import RunConfig

# custom_attributes keys that something in the engine reads (engine.train.network_scaling).
KNOWN_CUSTOM_ATTRIBUTES = ("diff_output_preservation",)
# Methods whose trained part is a network with a multiplier (LoRA and every LyCORIS type).
NETWORK_METHODS = ("lora",)


def _subsets(context: RuleContext) -> Iterator[Any]:
    for dataset in context.datasets:
        yield from dataset.subsets


def _dataset_level_paths(config: RunConfig, context: RuleContext, key: str, default: Any) -> Iterator[str]:
    """The config paths where a dataset-level key is set to something other than `default`."""
    general = getattr(config.dataset.general, key)
    if general != default:
        yield f"dataset.general.{key}"
    for dataset in context.datasets:
        value = dataset.params.get(key)
        if value != default and value != general:
            yield f"{dataset.path}.{key}"


@rule
def masked_loss_needs_masks(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if not config.training.masked_loss or (config.dataset.config_file and context.dataset_file is None):
        return  # off, or the dataset file is not read yet (checked again when it is)
    if not any(subset.params.get("conditioning_data_dir") or subset.params.get("alpha_mask")
               for subset in _subsets(context)):
        yield Problem("training.masked_loss", "no subset gives masks, so this would do nothing: set "
                      "conditioning_data_dir to a folder of masks named like the images (or alpha_mask = true for "
                      "images with transparency) in an inline or file dataset, or turn masked_loss off")


@rule
def network_multiplier_needs_a_network(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if config.method in NETWORK_METHODS:
        return
    for path in _dataset_level_paths(config, context, "network_multiplier", 1.0):
        yield Problem(path, f"scales a LoRA/LyCORIS network per dataset, and method {config.method!r} trains no "
                      "network; set it back to 1.0 or use method 'lora'")


@rule
def custom_attributes_are_known(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    for subset in _subsets(context):
        attributes = subset.params.get("custom_attributes") or {}
        path = subset.source_of("custom_attributes")
        for key in attributes:
            if key not in KNOWN_CUSTOM_ATTRIBUTES:
                yield Problem(path, f"unknown attribute {key!r}; Atelier reads only "
                              f"{', '.join(KNOWN_CUSTOM_ATTRIBUTES)}; remove it")
        if "diff_output_preservation" not in attributes:
            continue
        value = attributes["diff_output_preservation"]
        if not isinstance(value, bool):
            yield Problem(path, f"diff_output_preservation must be true or false, not {value!r}")
        elif value and config.method not in NETWORK_METHODS:
            yield Problem(path, "diff_output_preservation trains towards the base model's own prediction (the "
                          f"network at multiplier 0), and method {config.method!r} has no network; use method "
                          "'lora' or remove it")


@rule
def face_crop_runs_without_buckets(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    # A value set once in [general] is inherited by every dataset: say it once.
    yield from dict.fromkeys(_face_crop_problems(config, context))


def _face_crop_problems(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    for dataset in context.datasets:
        for subset in dataset.subsets:
            if subset.params.get("face_crop_aug_range") is None:
                continue
            path = subset.source_of("face_crop_aug_range")
            low, high = subset.params["face_crop_aug_range"]
            if not 0 < low <= high:
                yield Problem(path, f"give [min, max] with 0 < min <= max (face size multiples), not [{low}, {high}]")
            if dataset.params.get("enable_bucket"):
                yield Problem(path, "face-crop augmentation only runs with buckets off (as in sd-scripts); set "
                              f"enable_bucket = false for {dataset.path} or remove face_crop_aug_range")
            if config.training.cache_latents:
                yield Problem(path, "face-crop augmentation crops each image anew every step, so it cannot be "
                              "used with cached latents; set training.cache_latents = false or remove it")
