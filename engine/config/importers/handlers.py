"""Keys that need more than a rename, shared by the sd-scripts and kohya_ss importers.

Each handler reads a group of related keys at once (they decide together), marks them done on the `Source`, and
mirrors what sd-scripts does with them, so an imported run behaves like the original.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.config.choices import NETWORK_TYPES
from engine.config.importers import flux, sd3
from engine.config.importers.common import NOT_SUPPORTED, parse_kv_args, put_table, same_value
from engine.config.importers.sd_scripts_keys import LYCORIS_OPTION_DEFAULTS, NETWORK_ARG_PATHS
from engine.config.importers.source import Source
from engine.config.paths import set_path

SD_SCRIPTS_DEFAULT_STEPS = 1600


def positive_int(source: Source, key: str) -> int:
    """The key as a whole number, 0 when missing, blank or unreadable (sd-scripts treats those as unset)."""
    try:
        return max(0, int(float(source.get(key) or 0)))
    except (TypeError, ValueError):
        return 0


# --- run length --------------------------------------------------------------------------------------------------


def set_run_length(source: Source, epochs: int, steps: int) -> None:
    """Write exactly one of epochs/steps; our config refuses both, sd-scripts lets epochs win."""
    set_path(source.result.overlay, "training.max_train_epochs", epochs)
    set_path(source.result.overlay, "training.max_train_steps", 0 if epochs else steps)


def run_length(source: Source) -> None:
    """sd-scripts: max_train_epochs overrides max_train_steps; with neither it trains 1600 steps."""
    epochs, steps = positive_int(source, "max_train_epochs"), positive_int(source, "max_train_steps")
    for key in ("max_train_epochs", "max_train_steps"):
        if key in source.data and not positive_int(source, key):
            source.unset(key)
    if epochs:
        source.put("max_train_epochs", "training.max_train_epochs", epochs)
        if steps:
            source.skip("max_train_steps", "max_train_epochs is also set, and sd-scripts trains by epochs then")
            source.note(f"run length: {epochs} epochs; max_train_steps = {steps} is not imported: sd-scripts "
                        "trains by epochs when both are given, and Atelier takes only one")
    elif steps:
        source.put("max_train_steps", "training.max_train_steps", steps)
    else:
        steps = SD_SCRIPTS_DEFAULT_STEPS
        source.note(f"neither max_train_epochs nor max_train_steps is set: keeping sd-scripts' default of {steps} "
                    "steps")
    set_run_length(source, epochs, steps)


# --- attention ---------------------------------------------------------------------------------------------------

_ATTENTION_TEXT = {"xformers": "xformers", "sdpa": "sdpa", "none": "none"}


def _attention_choice(key: str, value: Any) -> str | None:
    if isinstance(value, str) and key == "xformers":  # the kohya_ss GUI's CrossAttention dropdown
        return _ATTENTION_TEXT.get(value.strip().lower(), "?")
    if value is True:
        # mem_eff_attn is sd-scripts' own memory-efficient attention; PyTorch's SDPA does the same job faster.
        return {"xformers": "xformers", "sdpa": "sdpa", "mem_eff_attn": "sdpa"}[key]
    return None


def attention(source: Source) -> None:
    """xformers / sdpa / mem_eff_attn flags -> training.attention; sd-scripts checks mem_eff_attn first."""
    winner = None
    for key in ("mem_eff_attn", "xformers", "sdpa"):
        if key not in source.data:
            continue
        choice = _attention_choice(key, source.data[key])
        if choice is None:
            source.unset(key)
        elif choice == "?":
            source.skip(key, "unknown attention choice; use xformers, sdpa or none")
        elif winner is not None:
            source.skip(key, f"{winner} is also set and takes precedence in sd-scripts")
        else:
            winner = key
            source.put(key, "training.attention", choice)
            if key == "mem_eff_attn":
                source.note("mem_eff_attn (sd-scripts' memory-efficient attention) is replaced by PyTorch's SDPA "
                            "attention, which saves memory the same way")


# --- optimizer ---------------------------------------------------------------------------------------------------

_LEGACY_OPTIMIZER_FLAGS = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}


def optimizer(source: Source, name_key: str) -> None:
    """The optimizer name (with sd-scripts' legacy flags) and the `k=v` argument lists of optimizer and scheduler."""
    chosen = source.given(name_key)
    if chosen:
        source.put(name_key, "optimizer.optimizer_type")
    elif name_key in source.data:
        source.unset(name_key)
    for flag, name in _LEGACY_OPTIMIZER_FLAGS.items():
        if not source.given(flag) or source.get(flag) is False:
            source.unset(flag)
        elif chosen:
            source.skip(flag, f"{name_key} is also set; the old flag is superseded by it")
        else:
            chosen = source.put(flag, "optimizer.optimizer_type", name)
    for key, path in (("optimizer_args", "optimizer.optimizer_args"),
                      ("lr_scheduler_args", "optimizer.lr_scheduler_args")):
        kv_args(source, key, path)


def kv_args(source: Source, key: str, path: str) -> None:
    if not source.given(key):
        source.unset(key)
        return
    source.done.add(key)
    try:
        items = parse_kv_args(source.get(key))
    except ValueError as error:
        source.skip(key, f"cannot be read as key=value arguments: {error}")
        return
    put_table(source.result, path, items, key)


# --- images, model family, caches --------------------------------------------------------------------------------

_FOLDER_KEYS = {"train_data_dir": "dataset.train_data_dir", "reg_data_dir": "dataset.reg_data_dir"}


def dataset_source(source: Source) -> None:
    """dataset_config, fine-tuning metadata, or the legacy folders; sd-scripts ignores the others for the first."""
    with_config = source.given("dataset_config")
    if with_config:
        source.put("dataset_config", "dataset.config_file")
    elif "dataset_config" in source.data:
        source.unset("dataset_config")
    if not with_config and source.given("in_json"):
        images = ("train_data_dir", source.get("train_data_dir")) if source.given("train_data_dir") else None
        finetune_dataset(source, ("in_json", source.get("in_json")), images)
        if source.given("reg_data_dir"):
            source.skip("reg_data_dir", "fine-tuning (in_json) uses no regularization images")
    ignored = []
    for key in ("in_json", *_FOLDER_KEYS):
        if key in source.done:
            continue
        if not source.given(key):
            source.unset(key)
        elif with_config:
            source.skip(key, "dataset_config is set, and sd-scripts ignores this key then")
            ignored.append(key)
        else:
            source.put(key, _FOLDER_KEYS[key])
    if ignored:
        source.note(f"{', '.join(ignored)} not imported: with dataset_config set, sd-scripts (and kohya_ss) ignore "
                    "them, and Atelier takes one source of images")


def finetune_dataset(source: Source, metadata: tuple[str, str], images: tuple[str, str] | None) -> None:
    """Fine-tuning metadata as the one dataset sd-scripts builds from --in_json and --train_data_dir itself.

    Written inline ([[dataset.datasets]]) because the subset then carries metadata_file and is plainly
    fine-tuning style, whatever the method.
    """
    subset = {"metadata_file": str(metadata[1])}
    keys = [metadata[0]]
    if images is not None:
        subset["image_dir"] = str(images[1])
        keys.append(images[0])
    set_path(source.result.overlay, "dataset.datasets", [{"subsets": [subset]}])
    for key in keys:
        source.used(key, ["dataset.datasets"])
    source.note("the fine-tuning metadata and image folder are written as one inline dataset, the way sd-scripts "
                "builds it from in_json and train_data_dir")


def model_family(source: Source) -> None:
    """FLUX or SD3 keys, sdxl / v2 flags -> model.model_family; without any the family is detected from the
    checkpoint.

    (sdxl_checkbox is the kohya_ss Finetuning tab's name for sdxl.)
    """
    found = flux.family(source)
    if found is not None:
        set_path(source.result.overlay, "model.model_family", found)
        source.note(f"model.model_family = {found!r}: the file has FLUX settings (sd-scripts' FLUX scripts)")
        if source.get("sd3_checkbox") is True:
            source.skip("sd3_checkbox", "flux1_checkbox is also on, and kohya_ss runs the FLUX script then")
    elif sd3.family(source) is not None:
        set_path(source.result.overlay, "model.model_family", "sd3")
        source.note("model.model_family = 'sd3': the file has SD3 settings (sd-scripts' SD3 scripts; the variant, "
                    "SD3 medium, SD3.5 medium or large, is read from the model file)")
    for key, family in (("sdxl", "sdxl"), ("sdxl_checkbox", "sdxl"), ("v2", "sd2")):
        if source.get(key) is not True:
            source.unset(key)
        elif source.is_set("model.model_family"):
            source.skip(key, "another model-family flag is also set; a model has one family")
        else:
            source.put(key, "model.model_family", family)


def latent_cache(source: Source) -> None:
    """sd-scripts switches cache_latents on by itself when cache_latents_to_disk is set."""
    if source.get("cache_latents_to_disk") is True and source.get("cache_latents") is not True:
        if source.given("cache_latents"):
            source.skip("cache_latents", "cache_latents_to_disk is on, which makes sd-scripts cache latents anyway")
        else:
            source.unset("cache_latents")
        set_path(source.result.overlay, "training.cache_latents", True)
        source.note("training.cache_latents = true: sd-scripts turns it on itself when cache_latents_to_disk is on")


# --- network options ---------------------------------------------------------------------------------------------


def network_options(source: Source, network_type: str, options: Mapping[str, tuple[str, Any]]) -> None:
    """Options of the network (LyCORIS / kohya network_args), each given as name -> (source key, value).

    conv_dim, dropouts and the like are [network] fields; LyCORIS options go to network.network_args when they
    differ from LyCORIS' defaults. Kohya-format networks (lora, locon) have no LyCORIS options.
    """
    lycoris = NETWORK_TYPES[network_type].backend == "lycoris"
    for name, (key, value) in options.items():
        if name in NETWORK_ARG_PATHS:
            source.put(key, NETWORK_ARG_PATHS[name], value)
        elif name == "unit" and NETWORK_TYPES[network_type].backend == "dylora":  # sd-scripts' DyLoRA block size
            source.mark(key)
            put_table(source.result, "network.network_args", {name: value}, key)
        elif not lycoris and (flux.network_arg(source, name, key, value) or sd3.network_arg(source, name, key, value)):
            continue
        elif name not in LYCORIS_OPTION_DEFAULTS:
            source.skip(key, f"network option {name!r} is {NOT_SUPPORTED}", value)
        elif same_value(value, LYCORIS_OPTION_DEFAULTS[name]):
            source.unset(key)
        elif lycoris:
            source.mark(key)
            put_table(source.result, "network.network_args", {name: value}, key)
        else:
            source.skip(key, f"{network_type} is trained in kohya's format, which has no LyCORIS option {name!r}",
                        value)

