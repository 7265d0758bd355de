"""kohya's LoRA / LoCon network (sd-scripts ``networks/lora.py``), on diffusers and transformers models, without peft.

Files it saves use kohya's keys (``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``), so
A1111, ComfyUI, sd-scripts and diffusers' ``load_lora_weights`` read them. The maths follow spec §5.2:
``y = org(x) + multiplier * alpha/rank * up(down(x))`` with kohya's three dropouts in training mode.

Layers are wrapped the way kohya does it: the original layer's ``forward`` is monkey-patched, the model's module
tree stays as it is (so diffusers' gradient checkpointing, attention processors and state dicts are untouched),
and the network holds only the LoRA weights.

Which layers, their names and the settings (network_args): :mod:`engine.networks.lora_names`. The per-layer modules
(kohya's pair, FLUX's split_qkv): :mod:`engine.networks.lora_modules`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from engine.models.families import family_info
from engine.networks.lora_modules import LoRAModule, SplitLoRAModule
from engine.networks.lora_names import (
    UNET_NAMING,
    LoRAOptions,
    LoRATarget,
    is_t5_encoder,
    resolve_options,
    text_encoder_targets,
    unet_naming_kind,
    unet_targets,
)

__all__ = ["LoRALoadResult", "LoRANetwork", "LoRAOptions", "create_lora_network"]

_FILE_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


class LoRALoadResult(NamedTuple):
    """What a non-strict load skipped: modules the file lacks and file keys the network does not know."""

    missing_modules: list[str]
    unexpected_keys: list[str]


class LoRANetwork(nn.Module):
    """All LoRA modules of one model, registered under their kohya names so the state dict is kohya's format.

    The modules are children of the network, not of the UNet or text encoders, so the dropouts follow the
    network's own ``train()``/``eval()``: call ``network.train()`` for training and ``network.eval()`` for sampling.

    Attributes:
        unet_loras: the UNet's modules.
        text_encoder_loras: one list per text encoder, in the family's encoder order (empty when not trained).
        text_encoder_prefixes: ``("lora_te",)`` or ``("lora_te1", "lora_te2")``.
        options: the settings it was built with.

    ``aliases`` maps names other tools give a module (SDXL UNet modules under diffusers paths) to its kohya name,
    for :meth:`load_kohya_state_dict`.
    """

    def __init__(self, unet_loras: Sequence[LoRAModule], text_encoder_loras: Sequence[Sequence[LoRAModule]],
                 text_encoder_prefixes: Sequence[str], options: LoRAOptions,
                 aliases: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if len(text_encoder_loras) != len(text_encoder_prefixes):
            raise ValueError("one list of text-encoder modules per text-encoder prefix is needed")
        self.unet_loras = list(unet_loras)
        self.text_encoder_loras = [list(loras) for loras in text_encoder_loras]
        self.text_encoder_prefixes = tuple(text_encoder_prefixes)
        self.options = options
        self._aliases = dict(aliases or {})  # other tools' names for a module -> its kohya name
        self._multiplier: float | None = None  # what set_multiplier last gave every module (None: not one number)
        for lora in self.all_loras():
            if lora.lora_name in self._modules:
                raise ValueError(f"duplicate LoRA module name {lora.lora_name!r}")
            self.add_module(lora.lora_name, lora)

    def all_loras(self) -> list[LoRAModule]:
        return [*self.unet_loras, *(lora for loras in self.text_encoder_loras for lora in loras)]

    def parts(self) -> list[tuple[str, list[LoRAModule]]]:
        """(part name, modules) for the UNet and each text encoder: "unet", "text_encoder" or "text_encoder1/2"."""
        single = len(self.text_encoder_loras) == 1
        text = [("text_encoder" if single else f"text_encoder{index + 1}", loras)
                for index, loras in enumerate(self.text_encoder_loras)]
        return [("unet", self.unet_loras), *text]

    def apply_to(self) -> None:
        """Patch every wrapped layer; from now on the models compute with the network."""
        for lora in self.all_loras():
            lora.apply_to()

    def restore(self) -> None:
        """Undo :meth:`apply_to`: the models compute as if the network did not exist."""
        for lora in reversed(self.all_loras()):
            lora.restore()

    def set_multiplier(self, multiplier: float | torch.Tensor) -> None:
        """Scale every module's output by `multiplier` (a tensor: one value per sample of the batch).

        Setting the number the modules were last given does nothing: training sets it twice per micro-batch, and
        walking hundreds of modules each time costs more than a small model's whole optimizer step.
        """
        if isinstance(multiplier, float) and multiplier == self._multiplier:
            return
        for lora in self.all_loras():
            lora.multiplier = multiplier
        self._multiplier = multiplier if isinstance(multiplier, float) else None

    def module_count(self) -> dict[str, int]:
        """Number of LoRA modules per part, e.g. ``{"unet": 192, "text_encoder": 72}`` (for the run's log)."""
        return {name: len(loras) for name, loras in self.parts()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require a gradient (after :meth:`prepare_optimizer_params`: those being trained)."""
        return [param for param in self.parameters() if param.requires_grad]

    def prepare_optimizer_params(self, unet_lr: float | None, text_encoder_lrs: Sequence[float | None],
                                 default_lr: float | None = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups, one per part (two with LoRA+: ``lora_up`` gets lr * ratio).

        Args:
            unet_lr: the UNet's learning rate; None uses ``default_lr``.
            text_encoder_lrs: one rate per text encoder, or a single rate for all (empty: ``default_lr``).
            default_lr: the run's learning_rate, for rates given as None (kohya's fallback).

        Returns:
            Dicts with "params", "lr" and "name" ("unet", "text_encoder", "text_encoder1", ... and
            "<part>_loraplus"). A part with no modules or a rate of 0 gets no group, and its parameters stop
            requiring gradients: nothing would ever apply them, and the backward pass skips their work.

        Raises:
            ValueError: the number of text-encoder rates fits neither one nor every encoder, or a trained part
                has no rate at all.
        """
        rates = list(text_encoder_lrs) or [None]
        if len(rates) == 1:
            rates *= len(self.text_encoder_loras)
        if len(rates) != len(self.text_encoder_loras):
            raise ValueError(f"{len(rates)} text-encoder learning rates for {len(self.text_encoder_loras)} "
                             "text encoders; give one rate for all of them or one per encoder")
        options = self.options
        unet_ratio = options.loraplus_unet_lr_ratio or options.loraplus_lr_ratio
        text_ratio = options.loraplus_text_encoder_lr_ratio or options.loraplus_lr_ratio
        ratios = [unet_ratio, *[text_ratio] * len(rates)]
        groups: list[dict[str, Any]] = []
        for (name, loras), lr, ratio in zip(self.parts(), [unet_lr, *rates], ratios, strict=True):
            lr = default_lr if lr is None else lr
            trained = bool(loras) and lr != 0
            for lora in loras:
                lora.requires_grad_(trained)
            if not trained:
                continue
            if lr is None:
                raise ValueError(f"no learning rate for the {name}: set its rate or the default learning rate")
            for suffix, members, rate in self._rate_groups(loras, lr):
                if rate == 0:  # a network_reg_lrs rate of 0 freezes its modules, as a part's rate of 0 does
                    for lora in members:
                        lora.requires_grad_(False)
                    continue
                groups.extend(_part_groups(name + suffix, members, rate, ratio))
        return groups

    def _rate_groups(self, loras: Sequence[LoRAModule], lr: float) -> list[tuple[str, list[LoRAModule], float]]:
        """(group-name suffix, modules, rate): FLUX's network_reg_lrs moves each module whose name the first
        matching regex is found in into that regex's group (sd-scripts' rule, spec appendix A.3)."""
        args = self.options.naming_args
        if args is None or not args.reg_lrs:
            return [("", list(loras), lr)]
        grouped: dict[int | None, list[LoRAModule]] = {}
        for lora in loras:
            grouped.setdefault(args.reg_lr_index(lora.lora_name), []).append(lora)
        order = sorted(grouped, key=lambda index: -1 if index is None else index)
        return [("" if index is None else f"_reg{index}", grouped[index],
                 lr if index is None else args.reg_lrs[index][1]) for index in order]

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors to save: kohya keys, on the CPU, copied (never aliasing the training weights)."""
        return {key: value.detach().to("cpu", dtype=dtype or value.dtype, copy=True)
                for key, value in self._file_state().items()}

    def _file_state(self) -> dict[str, torch.Tensor]:
        """The state dict with split_qkv modules merged into kohya's single pair (SplitLoRAModule)."""
        split = {lora.lora_name: lora for lora in self.all_loras() if isinstance(lora, SplitLoRAModule)}
        state = {key: value for key, value in self.state_dict().items() if key.partition(".")[0] not in split}
        for name, lora in split.items():
            state.update({f"{name}.{part}": value for part, value in lora.file_tensors().items()})
        return state

    def load_kohya_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> LoRALoadResult:
        """Load kohya-format weights (e.g. ``network_weights`` to start from); nothing changes if it fails.

        Files without ``alpha`` (old kohya versions) load with alpha = rank. For SDXL, UNet keys with diffusers
        paths (``lora_unet_down_blocks_...``) are accepted too, as kohya converts them.

        Args:
            state_dict: tensors keyed ``<module name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
            strict: raise when a module of the network is not in the file or the file has keys the network does
                not know; otherwise skip them and report them in the result.

        Raises:
            ValueError: a shape or rank differs, a module has only one of its two weights, or (strict) a module
                is missing or a key unknown. The message names the key.
        """
        modules: dict[str, nn.Module] = dict(self.named_children())
        found, unexpected = self._group_file_keys(state_dict, modules)
        missing = [name for name in modules if name not in found]
        if strict and unexpected:
            raise ValueError(f"the network weights have {self._UNEXPECTED} this network does not have: "
                             f"{_some(unexpected)} ({self._UNEXPECTED_HINT})")
        if strict and missing:
            raise ValueError(f"the network weights lack {len(missing)} {self._MODULES} of this network: "
                             f"{_some(missing)} ({self._MISSING_HINT})")
        for name, tensors in found.items():  # every module is checked before any is changed
            self._check_module(name, modules[name], tensors)
        for name, tensors in found.items():
            self._load_module(modules[name], tensors)
        return LoRALoadResult(missing, unexpected)

    # What load_kohya_state_dict says and does per module; a subclass with other module kinds overrides these.
    _UNEXPECTED = "keys"
    _UNEXPECTED_HINT = "another model family, network type or target layers?"
    _MODULES = "LoRA modules"
    _MISSING_HINT = "was it trained with different layers, conv_dim or text encoders?"

    @staticmethod
    def _check_module(name: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        module.check_file_tensors(tensors)

    @staticmethod
    def _load_module(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        module.load_file_tensors(tensors)

    @staticmethod
    def _accepts_part(part: str) -> bool:
        """Whether a key's part after the module name belongs to a module here (others are reported unexpected)."""
        return part in _FILE_PARTS

    def _group_file_keys(self, state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, LoRAModule]
                         ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
        """{module name: {part: tensor}} for the keys that belong to a module here, and the other keys."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        unexpected: list[str] = []
        for key, tensor in state_dict.items():
            file_name, _, part = key.partition(".")
            name = self._aliases.get(file_name, file_name)
            if name not in modules or not self._accepts_part(part):
                unexpected.append(key)
                continue
            tensors = found.setdefault(name, {})
            if part in tensors:
                raise ValueError(f"{key}: the network weights hold {name}.{part} twice, under two names")
            tensors[part] = tensor
        return found, unexpected


def _part_groups(name: str, loras: Sequence[LoRAModule], lr: float, ratio: float | None) -> list[dict[str, Any]]:
    if ratio is None:
        params = [param for lora in loras for param in lora.parameters()]
        return [{"params": params, "lr": lr, "name": name}]
    up = [param for lora in loras for key, param in lora.named_parameters() if key.startswith("lora_up.")]
    rest = [param for lora in loras for key, param in lora.named_parameters() if not key.startswith("lora_up.")]
    return [{"params": rest, "lr": lr, "name": name},
            {"params": up, "lr": lr * ratio, "name": f"{name}_loraplus"}]


def _some(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# --- building ----------------------------------------------------------------------------------------------------

def text_encoder_flags(family: str, text_encoders: Sequence[nn.Module], train_text_encoder: bool | Sequence[bool]
                       ) -> tuple[Sequence[str], Sequence[bool]]:
    """The family's text-encoder LoRA prefixes and one train flag per encoder (a single bool applies to all).

    Raises:
        ValueError: the encoders or flags do not match the family's text encoders in number.
    """
    prefixes = family_info(family).text_encoder_lora_prefixes
    if len(text_encoders) != len(prefixes):
        raise ValueError(f"{family} has {len(prefixes)} text encoder(s); got {len(text_encoders)}")
    train_each = [train_text_encoder] * len(prefixes) if isinstance(train_text_encoder, bool) else train_text_encoder
    if len(train_each) != len(prefixes):
        raise ValueError(f"train_text_encoder needs one flag per text encoder ({len(prefixes)}), got {train_each}")
    return prefixes, train_each


def network_options(section: Any) -> dict[str, Any]:
    """The keyword arguments a run's [network] section gives the kohya-format builders (create_lora_network and
    DyLoRA's): one list, so a new option reaches both."""
    return {"dim": section.network_dim, "alpha": section.network_alpha, "conv_dim": section.conv_dim,
            "conv_alpha": section.conv_alpha, "dropout": section.network_dropout,
            "rank_dropout": section.rank_dropout, "module_dropout": section.module_dropout,
            "network_args": section.network_args}


def create_lora_network(unet: nn.Module, text_encoders: Sequence[nn.Module], family: str, *, dim: int, alpha: float,
                        conv_dim: int = 0, conv_alpha: float = 1.0, dropout: float = 0.0, rank_dropout: float = 0.0,
                        module_dropout: float = 0.0, train_unet: bool = True,
                        train_text_encoder: bool | Sequence[bool] = True,
                        network_args: Mapping[str, Any] | None = None, multiplier: float = 1.0) -> LoRANetwork:
    """Build a kohya LoRA (or LoCon, with conv_dim > 0) for a UNet, FLUX transformer or SD3 MMDiT and its text
    encoders; not yet applied.

    Args:
        unet: diffusers ``UNet2DConditionModel``, the FLUX transformer (families with the "bfl" naming) or the SD3
            MMDiT ("mmdit").
        text_encoders: the family's text encoders in order (CLIP for SD1/SD2, two CLIPs for SDXL, CLIP-L and T5
            for FLUX.1, T5 for Chroma, CLIP-L, CLIP-G and T5 for SD3).
        family: a family of ``FAMILY_INFO`` (names and text-encoder prefixes).
        dim, alpha: rank and alpha of Linear and 1x1 conv layers (alpha 0 means alpha = rank).
        conv_dim, conv_alpha: rank and alpha of 3x3 convs in ResNet/down/up blocks (0 = no LoCon).
        dropout: kohya's network_dropout (on ``down(x)``); rank_dropout, module_dropout: as in kohya.
        train_unet: add modules to the UNet.
        train_text_encoder: add modules to the text encoders (a bool for all, or one per encoder); a T5 encoder
            also needs network_args train_t5xxl, as in sd-scripts.
        network_args: kohya's extra options (:data:`NETWORK_ARGS`, and FLUX's for the "bfl" naming, SD3's for
            "mmdit"); unknown keys are errors.
        multiplier: the initial strength of every module.

    Raises:
        ValueError: bad settings (the message names the setting), or the encoders do not fit the family.
    """
    naming = unet_naming_kind(family)
    options = resolve_options({"dim": dim, "alpha": alpha, "conv_dim": conv_dim, "conv_alpha": conv_alpha,
                                "dropout": dropout, "rank_dropout": rank_dropout, "module_dropout": module_dropout},
                               network_args, naming)
    prefixes, train_each = text_encoder_flags(family, text_encoders, train_text_encoder)
    args, naming_spec = options.naming_args, UNET_NAMING[naming]
    train_each = [train and (not is_t5_encoder(encoder) or bool(args and args.train_t5xxl))
                  for encoder, train in zip(text_encoders, train_each, strict=True)]

    unet_side = unet_targets(unet, family, include_conv_blocks=options.conv_dim > 0,
                             include_embedders=bool(args and naming_spec.wants_embedders(args))) if train_unet else []
    if args is not None:
        naming_spec.check_model(args, unet)
    text_side = [text_encoder_targets(encoder, prefix) if train else []
                 for encoder, prefix, train in zip(text_encoders, prefixes, train_each, strict=True)]
    report: list[str] = []
    split = naming_spec.split_parts if args is not None and args.split_qkv else None
    unet_loras = _build_modules(unet_side, options, multiplier, report, unet, split)
    aliases = {target.alias: target.name for target in unet_side if target.alias and target.name in
               {lora.lora_name for lora in unet_loras}}
    text_loras = [_build_modules(targets, options, multiplier, report) for targets in text_side]
    if args is not None and args.verbose:  # sd-scripts' verbose=True: every module's rank and alpha, and skips
        print("\n".join(report))
    return LoRANetwork(unet_loras, text_loras, prefixes, options, aliases)


SplitParts = Callable[[str, int, int], "Sequence[int] | None"]


def _build_modules(targets: Sequence[LoRATarget], options: LoRAOptions, multiplier: float, report: list[str],
                   root: nn.Module | None = None, split: SplitParts | None = None) -> list[LoRAModule]:
    """One module per target with a rank; ``report`` gets a line per module and per skipped layer. ``split``
    (split_qkv): the naming's output widths of a fused layer, by module path under ``root``."""
    paths = {id(module): path for path, module in root.named_modules()} if split and root is not None else {}
    modules: list[LoRAModule] = []
    for target in targets:
        rank, alpha = options.rank_and_alpha(target)
        if rank == 0:  # a 3x3 conv without conv_dim, or a layer the naming's network_args leave out, stays untrained
            report.append(f"{target.name}: skipped (rank 0)")
            continue
        parts = split(paths.get(id(target.module), ""), target.module.out_features,
                      target.module.in_features) if split and isinstance(target.module, nn.Linear) else None
        if parts:
            modules.append(SplitLoRAModule(target.name, target.module, parts, multiplier, rank, alpha,
                                           options.dropout, options.rank_dropout, options.module_dropout))
        else:
            modules.append(LoRAModule(target.name, target.module, multiplier, rank, alpha, options.dropout,
                                      options.rank_dropout, options.module_dropout))
        report.append(f"{target.name}: rank {rank}, alpha {alpha:g}" + (f", split {list(parts)}" if parts else ""))
    return modules
