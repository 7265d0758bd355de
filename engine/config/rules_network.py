"""Cross-field rules of the trained network: its ``network_args``, checked by the parsers the network builders use.

Before these rules, a bad key or value in ``network.network_args`` passed validation and the GUI, then crashed the
run when the network was built. Each backend's settings parser (:func:`engine.networks.lora_names.resolve_options`
for kohya's LoRA/LoCon, :func:`engine.networks.lycoris_args.resolve_lycoris_settings` for LyCORIS,
:func:`engine.networks.dylora_args.resolve_dylora_options` for DyLoRA, refusing the families it lacks) runs here
without torch: the message it raises names ``network.network_args.<key>`` and what is accepted. With
``model_family = "auto"`` the family is not known yet, so a setting passes when some family's network accepts it;
the run checks it again for the family it finds. Registered with the same ``@rule`` as :mod:`engine.config.rules`,
which imports this module so that ``check()`` runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from engine.config.choices import NETWORK_TYPES, SD3_FAMILIES
from engine.config.rule_registry import Problem, RuleContext, rule
from engine.config.rules_sd3 import unsupported_network_arg
from engine.models.families import FAMILY_INFO

if TYPE_CHECKING:
    from engine.config.schema import RunConfig

# Fields of [network] that a settings parser may name in its message; anything else is about network_args.
_NETWORK_FIELDS = ("network.network_dim", "network.network_alpha", "network.conv_dim", "network.conv_alpha",
                   "network.network_dropout", "network.rank_dropout", "network.module_dropout",
                   "network.network_type")


def _keywords(config: RunConfig) -> dict[str, Any]:
    network = config.network
    return {"dim": network.network_dim, "alpha": network.network_alpha, "conv_dim": network.conv_dim,
            "conv_alpha": network.conv_alpha, "dropout": network.network_dropout,
            "rank_dropout": network.rank_dropout, "module_dropout": network.module_dropout}


def _kohya(config: RunConfig, args: Mapping[str, Any], naming: str) -> None:
    from engine.networks.lora_names import resolve_options

    resolve_options(_keywords(config), args, naming)


def _dylora(config: RunConfig, args: Mapping[str, Any], naming: str) -> None:
    from engine.networks.dylora_args import resolve_dylora_options

    resolve_dylora_options(_keywords(config), args, naming)


def _lycoris(config: RunConfig, args: Mapping[str, Any], naming: str) -> None:
    from engine.networks.lycoris_args import resolve_lycoris_settings

    resolve_lycoris_settings(config.network.network_type, _keywords(config), args, naming)


# NetworkTypeInfo.backend -> a check that raises ValueError naming the setting, as the builder would.
SETTINGS_CHECKS: dict[str, Callable[[RunConfig, Mapping[str, Any], str], None]] = {
    "kohya": _kohya,
    "lycoris": _lycoris,
    "dylora": _dylora,
}


def _namings(family: str) -> list[str]:
    """The LoRA namings the network may be built with: the family's, or every family's for "auto"."""
    from engine.networks.lora_names import unet_naming_kind

    if family in FAMILY_INFO:
        return [unet_naming_kind(family)]
    return list(dict.fromkeys(unet_naming_kind(name) for name in FAMILY_INFO))


def _problem(error: ValueError) -> Problem:
    """The parser's message, on the field it names (a network_args key is shown on network.network_args)."""
    message = str(error)
    named = message.split(" ", 1)[0].rstrip(":")
    return Problem(named if named in _NETWORK_FIELDS else "network.network_args", message)


@rule
def network_args_are_understood(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if config.method != "lora":
        return
    network = config.network
    check = SETTINGS_CHECKS.get(NETWORK_TYPES[network.network_type].backend)
    if check is None:
        return
    args = dict(network.network_args)
    family = config.model.model_family
    if family in SD3_FAMILIES and check is _kohya:
        # FLUX's keys on SD3's LoRA are refused by rules_sd3 with what to use instead; one message per key is enough.
        args = {key: value for key, value in args.items() if unsupported_network_arg(key) is None}
    errors: list[ValueError] = []
    for naming in _namings(family):
        try:
            check(config, args, naming)
            return
        except ValueError as error:
            errors.append(error)
        except ImportError:
            return  # a package a parser needs is missing; optional_packages_installed says so
    # With "auto", the most useful message is from a family whose network knows the key (a bad value there).
    known = [error for error in errors if " not an option" not in str(error)]
    yield _problem((known or errors)[0])


@rule
def dylora_fits_the_update(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    """The fused backward pass averages each weight across processes as its gradient arrives; DyLoRA gives a
    gradient only to the block of ranks each process drew (engine.networks.dylora), so the processes would wait on
    different weights."""
    if config.method != "lora" or NETWORK_TYPES[config.network.network_type].backend != "dylora":
        return
    if config.optimizer.fused_backward_pass and config.launch.num_processes > 1:
        yield Problem("optimizer.fused_backward_pass", "DyLoRA trains a different block of ranks in each process, "
                      "which the per-weight averaging of the fused backward pass cannot pair up; turn "
                      "fused_backward_pass off or train in one process")
