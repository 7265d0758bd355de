"""The settings of LyCORIS networks (network_args, presets), parsed without torch or lycoris.

:mod:`engine.networks.lycoris_network` builds the network with them; the config rules
(:mod:`engine.config.rules_network`) run the same parsers, so a bad key or value is a validation error that names
``network.network_args.<key>``, not a crash when the model is built. Why options are refused or narrowed: the
docstring of :mod:`engine.networks.lycoris_network`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.choices import NETWORK_TYPES
from engine.networks.arg_values import arg_flag, arg_non_negative, arg_number
from engine.networks.lora_names import UNET_NAMING, LoRAOptions, resolve_options

__all__ = ["ALGORITHMS", "LYCORIS_ARGS", "LYCORIS_PRESETS", "LycorisArg", "LycorisSettings", "resolve_lycoris_settings"]

ALGORITHMS = tuple(name for name, info in NETWORK_TYPES.items() if info.backend == "lycoris")
_EVERY = frozenset(ALGORITHMS)
_LORA_LIKE = frozenset({"loha", "lokr"})  # the algorithms built on low-rank factors with DoRA and Tucker options
_SHARED_ARGS = frozenset({"conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout"})
# lycoris-lora 4.1.3's built-in presets (lycoris.config.PRESET; a test checks the installed package has them): named
# here so that checking a preset needs no import of lycoris, which imports torch.
LYCORIS_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only",
                   "unet-convblock-only", "ia3")


# --- network_args ------------------------------------------------------------------------------------------------

_flag = arg_flag


def _whole(path: str, value: Any) -> int:
    number = arg_number(path, value, "a whole number")
    if number != int(number):
        raise ValueError(f"{path} must be a whole number, got {value!r}")
    return int(number)


def _factor(path: str, value: Any) -> int:
    number = _whole(path, value)
    if number != -1 and number < 1:
        raise ValueError(f"{path} must be -1 (automatic) or at least 1, got {value!r}")
    return number


def _non_negative(path: str, value: Any) -> float:
    return arg_non_negative(path, value, "a number of at least 0")


@dataclass(frozen=True)
class LycorisArg:
    """One LyCORIS option of network_args.

    Attributes:
        keyword: the ``LycorisNetworkKohya`` keyword it sets (sd-scripts' create_network renames a few).
        parse: checks and converts the value; raises ValueError naming the config path.
        algorithms: the algorithms whose modules read it; for any other it would be silently ignored.
    """

    keyword: str
    parse: Callable[[str, Any], Any]
    algorithms: frozenset[str] = _EVERY


LYCORIS_ARGS: dict[str, LycorisArg] = {
    "train_norm": LycorisArg("train_norm", _flag),
    "bypass_mode": LycorisArg("bypass_mode", _flag),
    "use_tucker": LycorisArg("use_tucker", _flag, _LORA_LIKE),
    "rs_lora": LycorisArg("rs_lora", _flag, _LORA_LIKE | {"glora"}),
    "dora_wd": LycorisArg("weight_decompose", _flag, _LORA_LIKE),
    "wd_on_output": LycorisArg("wd_on_out", _flag, _LORA_LIKE),
    "factor": LycorisArg("factor", _factor, frozenset({"lokr"})),
    "decompose_both": LycorisArg("decompose_both", _flag, frozenset({"lokr"})),
    "full_matrix": LycorisArg("full_matrix", _flag, frozenset({"lokr"})),
    "unbalanced_factorization": LycorisArg("unbalanced_factorization", _flag, frozenset({"lokr"})),
    "constraint": LycorisArg("constraint", _non_negative, frozenset({"diag-oft", "boft"})),
    "rescaled": LycorisArg("rescaled", _flag, frozenset({"diag-oft", "boft"})),
}
# What sd-scripts' lycoris.kohya.create_network passes when an option is not given.
_DEFAULT_KEYWORDS: dict[str, Any] = {
    "train_norm": False, "bypass_mode": False, "use_tucker": False, "use_scalar": False, "rs_lora": False,
    "weight_decompose": False, "wd_on_out": True, "factor": -1, "decompose_both": False, "full_matrix": False,
    "unbalanced_factorization": False, "constraint": 0.0, "rescaled": False,
}
_OLD_NAMES = {"disable_conv_cp": "use_tucker", "use_cp": "use_tucker", "use_conv_cp": "use_tucker",
              "constrain": "constraint"}
_LORAPLUS = ("lycoris applies LoRA+ ratios only to lora_up weights, which these algorithms do not have; use "
             "network_type = 'lora' or 'locon' for LoRA+")
# Options lycoris has that Atelier refuses, with the reason.
_REFUSED_ARGS = {
    "use_scalar": "lycoris folds the trained scalar into the saved weights and resets it to 1 when loading, so a "
                  "resumed run would not continue exactly",
    "loraplus_lr_ratio": _LORAPLUS, "loraplus_unet_lr_ratio": _LORAPLUS, "loraplus_text_encoder_lr_ratio": _LORAPLUS,
}
# The dropouts lycoris 4.1.3 applies, per setting, without and with bypass_mode: (algorithms, algorithms). Others
# ignore the setting (LoHa and LoKr print a warning, the rest nothing); module_dropout works everywhere.
_APPLIED_DROPOUTS: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    "dropout": ("network.network_dropout", frozenset(), frozenset({"loha", "lokr", "glora"})),
    "rank_dropout": ("network.rank_dropout", frozenset({"loha", "lokr", "diag-oft", "full"}),
                     frozenset({"loha", "glora"})),
}
_ACCEPTED = ", ".join(["algo", "preset", *sorted(_SHARED_ARGS), *LYCORIS_ARGS])


@dataclass(frozen=True)
class LycorisSettings:
    """The LyCORIS part of the settings (the rest is a :class:`LoRAOptions`).

    Attributes:
        algo: the lycoris algorithm, e.g. "loha" (the config's network_type).
        preset: a built-in lycoris preset name or the path of a preset TOML file.
        keywords: ``LycorisNetworkKohya`` keywords, the defaults of sd-scripts' create_network overlaid with
            network_args.
    """

    algo: str
    preset: str = "full"
    keywords: Mapping[str, Any] = field(default_factory=lambda: dict(_DEFAULT_KEYWORDS))
    train_t5xxl: bool = False


def _lycoris_arg(key: str, algo: str, naming: str = "diffusers") -> LycorisArg:
    path = f"network.network_args.{key}"
    owners = sorted((kind != naming, spec.label) for kind, spec in UNET_NAMING.items() if key in spec.network_args)
    if owners:  # the model's own naming first: an SD3 key on SD3 is called an SD3 LoRA option
        raise ValueError(f"{path} is an option of the {owners[0][1]} LoRA (network_type = 'lora'), not of LyCORIS "
                         "networks; LyCORIS takes only train_t5xxl of those, on FLUX.1, Chroma and SD3")
    if key in _OLD_NAMES:
        raise ValueError(f"{path} is an old lycoris name; use network.network_args.{_OLD_NAMES[key]}")
    if key in _REFUSED_ARGS:
        raise ValueError(f"{path} is not supported: {_REFUSED_ARGS[key]}")
    arg = LYCORIS_ARGS.get(key)
    if arg is None:
        raise ValueError(f"{path} is not a LyCORIS option that Atelier passes on; accepted keys: {_ACCEPTED}")
    if algo not in arg.algorithms:
        users = ", ".join(sorted(arg.algorithms))
        raise ValueError(f"{path} has no effect with network_type = {algo!r} (lycoris reads it only for {users}); "
                         "remove it")
    return arg


def _preset_name(value: Any) -> str:
    path = "network.network_args.preset"
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path} must be a preset name or the path of a preset TOML file, got {value!r}")
    if value not in LYCORIS_PRESETS and not Path(value).is_file():
        raise ValueError(f"{path} = {value!r} is neither a built-in LyCORIS preset "
                         f"({', '.join(LYCORIS_PRESETS)}) nor an existing preset file")
    return value


def resolve_lycoris_settings(algo: str, keywords: Mapping[str, Any], network_args: Mapping[str, Any] | None,
                             naming: str = "diffusers") -> tuple[LoRAOptions, LycorisSettings]:
    """Check the settings of a LyCORIS network and split network_args into shared and LyCORIS options.

    Args:
        algo: one of :data:`ALGORITHMS`.
        keywords: ``dim``, ``alpha``, ``conv_dim``, ``conv_alpha``, ``dropout``, ``rank_dropout``,
            ``module_dropout`` (as for :func:`engine.networks.lora_names.resolve_options`).
        network_args: the shared settings above (may also be given here, as kohya allows), ``algo`` (must match),
            ``preset`` and :data:`LYCORIS_ARGS`; with the "bfl" and "mmdit" namings also ``train_t5xxl``.
        naming: the family's ``unet_naming``.

    Raises:
        ValueError: an unknown, ignored or contradictory option, or a bad value; the message names the config path.
        ImportError: lycoris is not installed (a preset is given and has to be looked up).
    """
    if algo not in ALGORITHMS:
        raise ValueError(f"network.network_type = {algo!r} is not a LyCORIS algorithm; expected one of "
                         f"{', '.join(ALGORITHMS)}")
    args = dict(network_args or {})
    options = resolve_options(keywords, {key: args.pop(key) for key in list(args) if key in _SHARED_ARGS})
    given = args.pop("algo", algo)
    if str(given).lower() != algo:
        raise ValueError(f"network.network_args.algo = {given!r} contradicts network.network_type = {algo!r}; "
                         "set network_type only")
    preset = _preset_name(args.pop("preset")) if "preset" in args else "full"
    train_t5xxl = False
    naming_args = UNET_NAMING[naming].network_args
    if "train_t5xxl" in naming_args and "train_t5xxl" in args:
        train_t5xxl = naming_args["train_t5xxl"][1]("network.network_args.train_t5xxl", args.pop("train_t5xxl"))
    chosen = dict(_DEFAULT_KEYWORDS)
    for key, value in args.items():
        arg = _lycoris_arg(key, algo, naming)
        chosen[arg.keyword] = arg.parse(f"network.network_args.{key}", value)
    _check_dropouts(algo, options, bypass=chosen["bypass_mode"])
    return options, LycorisSettings(algo, preset, chosen, train_t5xxl)


def _check_dropouts(algo: str, options: LoRAOptions, *, bypass: bool) -> None:
    """lycoris ignores a dropout some algorithms do not implement; refuse it rather than train without it."""
    for setting, (path, plain, bypassed) in _APPLIED_DROPOUTS.items():
        if getattr(options, setting) and algo not in (bypassed if bypass else plain):
            users = ", ".join(sorted(plain)) or "no algorithm"
            raise ValueError(f"{path} has no effect with network_type = {algo!r}{' in bypass mode' if bypass else ''}"
                             f"; lycoris applies it for {users}, and with network.network_args.bypass_mode = true "
                             f"for {', '.join(sorted(bypassed))}; set it to 0")
