"""Importer for configs saved by the kohya_ss GUI: a flat JSON of its field names (kohya_ss-gui.md §2, §3a).

kohya_ss passes most fields on to sd-scripts under the same names, and drops every value that is empty, false or 0
before it does (so sd-scripts' own defaults applied to those). This importer mirrors that: such values are
`unset`, and where sd-scripts' default differs from Atelier's the sd-scripts value is pinned with a note.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config.importers import ImportResult, flux, sd3
from engine.config.importers import handlers as shared
from engine.config.importers import kohya_tabs as tabs
from engine.config.importers.common import (
    is_off,
    parse_number_list,
    parse_size,
    prompt_lines,
)
from engine.config.importers.sd_scripts_keys import ARG_PATHS, ARG_PINS
from engine.config.importers.source import Source, apply_pins, finish, map_keys, note_relative_paths
from engine.config.prompts import parse_prompt_line

FORMAT = "kohya_gui"

# The shared sd-scripts table plus the GUI's own names.
KOHYA_PATHS = {
    **ARG_PATHS,
    "max_resolution": ("dataset.general.resolution", parse_size),
    "rank_dropout": "network.rank_dropout",
    "module_dropout": "network.module_dropout",
    "lora_network_weights": "network.network_weights",  # old name of network_weights
    "sdxl_cache_text_encoder_outputs": "training.cache_text_encoder_outputs",
    "sdxl_no_half_vae": "model.no_half_vae",
    "num_processes": "launch.num_processes",
    "num_machines": "launch.num_machines",
    "multi_gpu": "launch.multi_gpu",
    "gpu_ids": ("launch.gpu_ids", parse_number_list),
    "main_process_port": "launch.main_process_port",
    "dynamo_backend": "launch.dynamo_backend",
    "num_cpu_threads_per_process": "launch.num_cpu_threads_per_process",
}
# State of the GUI itself, not of the training run.
GUI_ONLY = ("model_list", "save_as_bool", "save_as", "file_path", "ask_for_file", "headless", "print_only")
# The GUI's defaults of fields Atelier does not have: a field left at its default was never used, nothing is lost.
KOHYA_DEFAULTS: Mapping[str, Any] = {
    "dynamo_mode": "default", "template": "caption", "show_timesteps_resolution": 1024,
    "ggpo_sigma": 0.03, "ggpo_beta": 0.01, "discrete_flow_shift": 3.0, "guidance_scale": 3.5,
    "mode_scale": 1.29, "logit_std": 1.0, "sigmoid_scale": 1.0, "weighting_scheme": "logit_normal",
    "timestep_sampling": "sigma", "model_prediction_type": "sigma_scaled", "t5xxl_max_token_length": 512,
}
_SECRETS = ("wandb_api_key", "huggingface_token")
_NOISE_KEYS: dict[str, dict[str, Any]] = {
    "Original": {"noise_offset": 0, "adaptive_noise_scale": 0, "noise_offset_random_strength": False},
    "Multires": {"multires_noise_iterations": 0, "multires_noise_discount": 0.3},
}
_KOHYA_SPECIFIC = {"LoRA_type", "max_resolution", "epoch", "optimizer", "lr_warmup", "model_list", "image_folder"}
_CHARACTERISTIC = {*_KOHYA_SPECIFIC, "train_batch_size", "pretrained_model_name_or_path"}


def is_kohya_gui(path: Path, data: Mapping[str, Any]) -> bool:
    """A flat JSON object with several of the GUI's field names, at least one of them the GUI's own."""
    if path.suffix.lower() != ".json" or "datasets" in data or "general" in data:
        return False
    if any(isinstance(value, Mapping) for value in data.values()):
        return False
    return len(_CHARACTERISTIC & data.keys()) >= 2 and bool(_KOHYA_SPECIFIC & data.keys())


def import_kohya_gui(data: Mapping[str, Any]) -> ImportResult:
    """Map a kohya_ss GUI config JSON onto a RunConfig overlay."""
    source = Source(_with_legacy_names(data), ImportResult(FORMAT), blank=is_off)
    for handle in _HANDLERS:
        handle(source)
    map_keys(source, KOHYA_PATHS)
    flux.drop_inapplicable(source)
    finish(source, KOHYA_DEFAULTS)
    _pin_dropped_values(source)
    note_relative_paths(source.result, "kohya_ss")
    return source.result


def _pin_dropped_values(source: Source) -> None:
    """kohya_ss passes nothing for an empty/false/0 field, so sd-scripts' default applied to it there.

    A field missing from the file (a partial preset) is different: the GUI kept its own default, which is what
    Atelier's defaults follow, so nothing is pinned for it.
    """
    keys = {target: key for key, target in KOHYA_PATHS.items() if isinstance(target, str)}
    dropped = [pin for pin in ARG_PINS if keys.get(pin.path) in source.result.unset]
    apply_pins(source, dropped, "off in the file, so kohya_ss passed nothing and sd-scripts' default applied")


def _with_legacy_names(data: Mapping[str, Any]) -> dict[str, Any]:
    """Old GUI versions saved xformers as a checkbox; the GUI reads true/false as 'xformers'/'none'."""
    data = dict(data)
    if isinstance(data.get("xformers"), bool):
        data["xformers"] = "xformers" if data["xformers"] else "none"
    return data


def _run_length(source: Source) -> None:
    """kohya_ss passes max_train_epochs and max_train_steps; `epoch` only computes the steps when those are 0."""
    epochs, steps, epoch = (shared.positive_int(source, key) for key in ("max_train_epochs", "max_train_steps",
                                                                          "epoch"))
    for key in ("max_train_epochs", "max_train_steps", "epoch"):
        if key in source.data and not shared.positive_int(source, key):
            source.unset(key)
    if epochs:
        source.put("max_train_epochs", "training.max_train_epochs", epochs)
        _drop(source, "max_train_steps", "max_train_epochs is also set, and sd-scripts trains by epochs then")
        _drop(source, "epoch", "max_train_epochs is set, and kohya_ss passes that instead")
    elif steps:
        source.put("max_train_steps", "training.max_train_steps", steps)
        _drop(source, "epoch", "max_train_steps is set, so kohya_ss passes the steps and sd-scripts never sees epoch")
    elif epoch and not source.given("dataset_config"):
        # kohya_ss turns `epoch` into max_train_steps from the folders' image counts: the same length as epochs.
        epochs = epoch
        source.put("epoch", "training.max_train_epochs", epoch)
    else:
        steps = shared.SD_SCRIPTS_DEFAULT_STEPS
        _drop(source, "epoch", "with dataset_config and max_train_steps 0, kohya_ss leaves sd-scripts at its "
              "default length")
    source.note(_length_note(source, epochs, steps))
    shared.set_run_length(source, epochs, steps)


def _length_note(source: Source, epochs: int, steps: int) -> str:
    note = f"run length: {f'{epochs} epochs' if epochs else f'{steps} steps'}, as sd-scripts ran it"
    dropped = [f"{item.key} = {item.value}" for item in source.result.skipped
               if item.key in ("max_train_steps", "epoch")]
    if dropped:
        note += f"; not imported: {', '.join(dropped)} (Atelier takes one run length, the one sd-scripts used)"
    return note


def _drop(source: Source, key: str, why: str) -> None:
    if shared.positive_int(source, key):
        source.skip(key, why)


def _warmup(source: Source) -> None:
    """lr_warmup is a percent of the run; lr_warmup_steps (newer GUIs) overrides it; constant has none."""
    if str(source.get("lr_scheduler", "")).strip() == "constant":
        source.inert("lr_warmup", 10, "kohya_ss turns warm-up off for the constant scheduler")
        source.inert("lr_warmup_steps", 0, "kohya_ss turns warm-up off for the constant scheduler")
        return
    if shared.positive_int(source, "lr_warmup_steps"):
        source.put("lr_warmup_steps", "optimizer.lr_warmup_steps", shared.positive_int(source, "lr_warmup_steps"))
        if source.given("lr_warmup"):
            source.skip("lr_warmup", "lr_warmup_steps is also set and overrides the percentage")
    elif source.given("lr_warmup"):
        percent = tabs.rate(source, "lr_warmup")
        if 0 < percent < 100:
            source.put("lr_warmup", "optimizer.lr_warmup_steps", round(percent / 100, 6))
        else:
            source.skip("lr_warmup", "a warm-up percentage must be between 0 and 100")
    for key in ("lr_warmup", "lr_warmup_steps"):
        if key not in source.done and key in source.data:
            source.unset(key)


def _num_cycles(source: Source) -> None:
    """An empty number of cycles makes kohya_ss pass `epoch` instead (it only matters for restarts)."""
    restarts = source.get("lr_scheduler") == "cosine_with_restarts"
    if restarts and not source.given("lr_scheduler_num_cycles") and shared.positive_int(source, "epoch"):
        source.put("epoch", "optimizer.lr_scheduler_num_cycles", shared.positive_int(source, "epoch"))
        source.note("lr_scheduler_num_cycles is empty: kohya_ss uses epoch as the number of cycles")


def _noise(source: Source) -> None:
    """noise_offset_type picks which noise keys kohya_ss passes on; the other kind's keys are ignored."""
    kind = str(source.get("noise_offset_type") or "Original")
    if kind not in _NOISE_KEYS:
        source.skip("noise_offset_type", "expected Original or Multires")
        return
    if "noise_offset_type" in source.data:
        paths = [path for key in _NOISE_KEYS[kind] if isinstance(path := ARG_PATHS.get(key), str)]
        source.used("noise_offset_type", paths)
    for other, keys in _NOISE_KEYS.items():
        if other != kind:
            for key, default in keys.items():
                source.inert(key, default, f"kohya_ss uses it only with noise_offset_type {other!r}")


def _seed(source: Source) -> None:
    if "seed" not in source.data or str(source.get("seed")).strip() == "":
        source.unset("seed")
    elif source.put("seed", "training.seed") and is_off(source.get("seed")):
        source.note("seed 0 meant a random seed in kohya_ss; Atelier imports it as the fixed seed 0")


def _sample_prompts(source: Source) -> None:
    """The GUI keeps the prompts as text (it writes them to a prompt file for sd-scripts)."""
    lines = prompt_lines(source.get("sample_prompts") or "")
    if not lines:
        source.unset("sample_prompts")
        return
    good = []
    for index, line in enumerate(lines):
        try:
            parse_prompt_line(line)
            good.append(line)
        except ValueError as error:
            source.skip(f"sample_prompts[{index}]", f"prompt cannot be read: {error}", line)
    if good:
        source.put("sample_prompts", "sampling.sample_prompts", good)


def _gui_and_legacy(source: Source) -> None:
    for key in GUI_ONLY:
        source.unset(key)
    if source.get("use_wandb") is True and not source.given("log_with"):
        source.put("use_wandb", "logging.log_with", "wandb")
    for key in _SECRETS:
        if source.given(key):
            source.skip(key, "secrets are not imported; set them in the environment instead")


_HANDLERS = (
    tabs.method,
    shared.model_family,
    sd3.settings,  # before FLUX's: the keys both families share are SD3's in an SD3 file
    flux.settings,
    tabs.tab_specific,
    _run_length,
    _warmup,
    _num_cycles,
    _noise,
    shared.attention,
    lambda source: shared.optimizer(source, "optimizer"),
    shared.dataset_source,
    shared.latent_cache,
    _seed,
    _sample_prompts,
    _gui_and_legacy,
)
