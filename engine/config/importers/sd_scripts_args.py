"""Importer for sd-scripts' training-argument TOML (`--config_file`), including the ones kohya_ss writes.

sd-scripts flattens every table of that file into one namespace of argument names (spec §1.1), and so does this
importer. Keys the file leaves unset take sd-scripts' argparse defaults where they differ from Atelier's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config.importers import ImportResult, flux, sd3
from engine.config.importers import handlers as shared
from engine.config.importers.common import parse_kv_args
from engine.config.importers.sd_scripts_keys import ARG_PATHS, ARG_PINS, LYCORIS_ALGOS, NETWORK_MODULES
from engine.config.importers.source import Source, apply_pins, finish, map_keys, note_relative_paths
from engine.config.paths import set_path
from engine.config.schema import SECTIONS

FORMAT = "sd_scripts_args"

# Keys of an Atelier config; a file with any of them is ours, not sd-scripts'.
_ATELIER_KEYS = {"schema_version", "method", *SECTIONS}
_ARG_MARKERS = {
    "pretrained_model_name_or_path", "output_dir", "output_name", "network_module", "learning_rate",
    "optimizer_type", "train_batch_size", "resolution", "max_train_steps", "max_train_epochs", "dataset_config",
    "train_data_dir", "mixed_precision", "save_model_as", "lr_scheduler",
}
# Keys kohya_ss writes into this file for its own use; sd-scripts ignores them.
_KOHYA_EXTRAS = ("epoch", "noise_offset_type", "weigts", "use_object_template", "use_style_template")
_SECRETS = ("wandb_api_key", "huggingface_token")


def flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """One namespace from all tables, as sd-scripts' read_config_from_file does ([model_arguments] etc.)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def is_sd_scripts_args(path: Path, data: Mapping[str, Any]) -> bool:
    """A table of sd-scripts argument names: not a dataset config ([general]/[[datasets]]), not an Atelier config."""
    if {"datasets", "general"} & data.keys() or _ATELIER_KEYS & data.keys():
        return False
    return len(_ARG_MARKERS & flatten(data).keys()) >= 2


def import_sd_scripts_args(data: Mapping[str, Any]) -> ImportResult:
    """Map an sd-scripts `--config_file` TOML onto a RunConfig overlay."""
    source = Source(flatten(data), ImportResult(FORMAT))
    for handle in _HANDLERS:
        handle(source)
    map_keys(source, ARG_PATHS)
    flux.drop_inapplicable(source)
    for key in _KOHYA_EXTRAS:
        if source.given(key):
            source.skip(key, "sd-scripts ignores this key (kohya_ss writes it for its own use)")
    for key in _SECRETS:
        if source.given(key):
            source.skip(key, "secrets are not imported; set them in the environment instead")
    finish(source)
    apply_pins(source, ARG_PINS)
    if "seed" not in source.data:
        source.note("no seed is set: sd-scripts picked a random one each run, Atelier uses a fixed seed (42)")
    note_relative_paths(source.result, "sd-scripts")
    return source.result


def _method(source: Source) -> None:
    """The file does not name the training script; the keys it sets tell."""
    if source.given("network_module"):
        method, why = "lora", "network_module is set"
    elif source.given("token_string"):
        method, why = "textual_inversion", "token_string is set"
    elif source.given("in_json") and not source.given("dataset_config"):
        method, why = "finetune", "in_json (fine-tuning metadata) is set"
    else:
        method, why = "dreambooth", "there is no network_module, token_string or in_json"
    set_path(source.result.overlay, "method", method)
    source.note(f"method = {method!r}: {why} (the file does not say which sd-scripts script it was for)")


def _network(source: Source) -> None:
    """network_module + network_args -> network_type, conv_dim/dropouts and LyCORIS options."""
    if not source.given("network_module"):
        source.unset("network_module")
        if source.given("network_args"):
            source.skip("network_args", "there is no network_module for these arguments")
        return
    args = _network_args(source)
    network_type = _network_type(source, args)
    if network_type is None:
        for name, value in args.items():
            source.skip(f"network_args.{name}", "belongs to a network module Atelier does not train", value)
        return
    source.put("network_module", "network.network_type", network_type)
    options = {name: (f"network_args.{name}", value) for name, value in args.items()}
    _lycoris_defaults(source, network_type, options)
    shared.network_options(source, network_type, options)


def _network_args(source: Source) -> dict[str, Any]:
    if not source.given("network_args"):
        source.unset("network_args")
        return {}
    try:
        args = parse_kv_args(source.get("network_args"))
    except ValueError as error:
        source.skip("network_args", f"cannot be read as key=value arguments: {error}")
        return {}
    source.mark("network_args")  # each item is accounted for as network_args.<name>
    return args


def _network_type(source: Source, args: dict[str, Any]) -> str | None:
    module = str(source.get("network_module")).strip()
    kind = NETWORK_MODULES.get(module)
    if kind is None:
        source.skip("network_module", f"Atelier trains {', '.join(NETWORK_MODULES)}; not {module}")
        return None
    if kind == "lora":
        # kohya's LoCon is networks.lora with conv_dim in network_args.
        return "locon" if _number(args.get("conv_dim")) > 0 else "lora"
    if kind == "dylora":
        return "dylora"  # sd-scripts' own DyLoRA, with its unit (engine.networks.dylora)
    if kind != "lycoris":
        source.note(f"{module} (sd-scripts' own {kind}) is trained with LyCORIS' {kind}")
        return kind
    algo = str(args.pop("algo", "lora")).lower()
    if algo not in LYCORIS_ALGOS:
        source.skip("network_module", f"LyCORIS algo {algo!r} is not supported by Atelier")
        return None
    if LYCORIS_ALGOS[algo] == "locon":
        source.note("LyCORIS LoCon is trained as Atelier's locon, which saves kohya's LoCon format")
    if LYCORIS_ALGOS[algo] == "dylora":
        args["unit"] = args.pop("block_size", 4)  # lycoris' default block_size is 4
        source.note("LyCORIS DyLoRA is trained as sd-scripts' DyLoRA (networks.dylora): block_size becomes unit")
    return LYCORIS_ALGOS[algo]


def _lycoris_defaults(source: Source, network_type: str, options: dict[str, tuple[str, Any]]) -> None:
    """LyCORIS gives convolutions network_dim/network_alpha when conv_dim/conv_alpha are missing."""
    if str(source.get("network_module")).strip() != "lycoris.kohya" or "conv_dim" in options:
        return
    dim, alpha = source.get("network_dim") or 4, source.get("network_alpha") or 1
    options["conv_dim"] = ("network_module", dim)
    options.setdefault("conv_alpha", ("network_module", alpha))
    source.note(f"network.conv_dim = {dim}: LyCORIS trains convolutions at network_dim when conv_dim is not given")


def _number(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


def _text_encoder_lr(source: Source) -> None:
    """A number, or a list [text encoder 1, text encoder 2] for SDXL ([CLIP-L, T5] for FLUX, [CLIP-L, CLIP-G, T5]
    for SD3, where a missing third value is the second)."""
    if not source.given("text_encoder_lr"):
        source.unset("text_encoder_lr")
        return
    value = source.get("text_encoder_lr")
    values = value if isinstance(value, list) else [value]
    paths = ("optimizer.text_encoder_lr", "optimizer.text_encoder2_lr")
    for index, item in enumerate(values):
        key = "text_encoder_lr" if not isinstance(value, list) else f"text_encoder_lr[{index}]"
        if index == 1 and flux.is_flux(source):
            if item != values[0]:
                source.skip(key, "T5's own rate: Atelier trains CLIP-L and T5 at one rate, "
                            "optimizer.text_encoder_lr", item)
        elif index >= 1 and sd3.is_sd3(source):
            if item != values[0]:
                source.skip(key, f"{('CLIP-G', 'T5')[min(index, 2) - 1]}'s own rate: Atelier trains SD3's text "
                            "encoders at one rate, optimizer.text_encoder_lr", item)
        elif index < len(paths):
            source.put(key, paths[index], item)
        else:
            source.skip(key, "only SDXL's two text encoders have learning rates here", item)


_HANDLERS = (
    _method,
    shared.model_family,
    sd3.settings,  # before FLUX's: the keys both families share are SD3's in an SD3 file
    flux.settings,
    _network,
    _text_encoder_lr,
    shared.run_length,
    shared.attention,
    lambda source: shared.optimizer(source, "optimizer_type"),
    shared.dataset_source,
    shared.latent_cache,
)
