"""Cross-field rules of the dataset keys that act only in some combinations (issue 14, "no dead keys").

* `network_multiplier` scales a network's output per dataset, so a method without a network cannot use it.
* `custom_attributes` takes `diff_output_preservation` only (the one attribute sd-scripts reads), and that needs a
  network whose multiplier can be set to 0 (LoRA and LyCORIS).
* `face_crop_aug_range` crops around a face box each step, only with buckets off (as sd-scripts) and never from
  cached latents.
* `alpha_mask` (masked loss) is not built yet: a value other than the default is refused, so no run claims to do
  what it does not.

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
# Dataset-level keys of features that belong to a later issue, with the value that means "off".
_NOT_BUILT_DATASET_KEYS: dict[str, tuple[Any, str]] = {}


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
def features_not_built_yet(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    for key, (default, feature) in _NOT_BUILT_DATASET_KEYS.items():
        for path in _dataset_level_paths(config, context, key, default):
            yield Problem(path, f"{feature} is not built yet in Atelier, so this setting would do nothing; set it "
                          f"back to {'unset' if default is None else default}")
    for subset in _subsets(context):
        if subset.params.get("alpha_mask"):
            yield Problem(f"{subset.path}.alpha_mask", "masked loss (the alpha channel as a loss mask) is not built "
                          "yet in Atelier, so this setting would do nothing; set it back to false")


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
