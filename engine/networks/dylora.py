"""DyLoRA as sd-scripts' ``networks/dylora.py`` trains it, saved as a plain kohya LoRA of full rank.

DyLoRA (Valipour et al., 2022) trains a LoRA so that its leading ranks work on their own. sd-scripts' version, which
this one follows (spec: ``--network_module networks.dylora``, ``network_args`` ``unit``):

* Every module keeps one parameter per rank (a row of ``lora_down``, a column of ``lora_up``).
* Each training forward draws a block start ``b`` (a random rank below ``network_dim``, rounded down to a multiple of
  ``unit``); only the ranks ``b .. b+unit-1`` receive a gradient, and with the trainer's ``zero_grad(set_to_none)``
  the optimizer leaves the others untouched that step. The update itself uses every rank, scaled by
  ``alpha/rank * sqrt(rank / (b + unit))``, as sd-scripts computes it.
* The draw comes from torch's global RNG (sd-scripts uses Python's ``random``), so gradient checkpointing, which
  restores that RNG before recomputing a block, recomputes with the same block, and a resumed run continues the
  same sequence of draws.
* In eval mode (sampling) the module is what the saved file is: every rank at ``alpha/rank`` (sd-scripts draws a
  rank there too, so its samples do not show the file it saves).
* Files hold ``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` under kohya's names, exactly a LoRA of rank
  ``network_dim``: diffusers' ``load_lora_weights``, ComfyUI, A1111 and sd-scripts load them as LoRA;
  ``ss_network_module`` is ``networks.dylora`` and ``ss_network_args`` holds ``unit``.

The network multiplier applies (sd-scripts' DyLoRA ignores it); dropouts do not exist in sd-scripts' DyLoRA and are
refused by the settings (:mod:`engine.networks.dylora_args`), as are the families it does not support.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.networks.dylora_args import DyLoRAOptions, resolve_dylora_options
from engine.networks.lora import LoRANetwork, network_options, text_encoder_flags
from engine.networks.lora_modules import LoRAModule, per_sample_scaled
from engine.networks.lora_names import LoRATarget, text_encoder_targets, unet_naming_kind, unet_targets

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.loaded_model import LoadedModel

__all__ = ["DyLoRAModule", "DyLoRANetwork", "create_dylora_network", "dylora_network"]

_WEIGHTS = ("lora_down.weight", "lora_up.weight")


class DyLoRAModule(LoRAModule):
    """One DyLoRA layer: a :class:`LoRAModule` whose down and up weights are held one rank per parameter.

    ``lora_down`` and ``lora_up`` are ``nn.ParameterList``s (rank ``i`` is ``lora_down[i]``: ``[1, in]`` or
    ``[1, in, kh, kw]``, and ``lora_up[i]``: ``[out, 1]`` or ``[out, 1, 1, 1]``), so LoRA+ still finds the up weights
    under ``lora_up.``. Applying, restoring, alpha and the multiplier are the LoRA module's.
    """

    def __init__(self, lora_name: str, org_module: nn.Linear | nn.Conv2d, multiplier: float = 1.0,
                 lora_dim: int = 4, alpha: float | torch.Tensor | None = 1.0, unit: int = 1) -> None:
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha)
        if unit < 1 or lora_dim % unit:
            raise ValueError(f"{lora_name}: the rank {lora_dim} must be a multiple of unit {unit}")
        self.unit = unit
        # The pair LoRAModule built, initialised as kohya does (kaiming rows, zero up), split into one parameter per
        # rank: a row's kaiming bound depends only on its fan-in, so this is sd-scripts' per-rank initialisation.
        down, up = self.lora_down.weight.detach(), self.lora_up.weight.detach()
        self.lora_down = nn.ParameterList(nn.Parameter(down[index:index + 1].clone()) for index in range(lora_dim))
        self.lora_up = nn.ParameterList(nn.Parameter(up[:, index:index + 1].clone()) for index in range(lora_dim))

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        down, up, factor = self._weights()
        org = self.org_module
        if isinstance(org, nn.Conv2d):
            out = F.conv2d(F.conv2d(x, down, stride=org.stride, padding=org.padding), up)
        else:
            out = F.linear(F.linear(x, down), up)
        return per_sample_scaled(out, self.multiplier) * (self.scale * factor)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Down and up over every rank and the extra scale: in training, only one block of ``unit`` ranks
        (drawn per forward) keeps its gradient, and the scale grows by ``sqrt(rank / (block start + unit))``."""
        if not self.training:
            return torch.cat(tuple(self.lora_down)), torch.cat(tuple(self.lora_up), dim=1), 1.0
        start = int(torch.randint(0, self.lora_dim, ()).item())
        start -= start % self.unit
        trained = range(start, start + self.unit)
        down = torch.cat([p if i in trained else p.detach() for i, p in enumerate(self.lora_down)])
        up = torch.cat([p if i in trained else p.detach() for i, p in enumerate(self.lora_up)], dim=1)
        return down, up, math.sqrt(self.lora_dim / (start + self.unit))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": torch.cat(tuple(self.lora_down)),
                "lora_up.weight": torch.cat(tuple(self.lora_up), dim=1), "alpha": self.alpha}

    def check_file_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        shapes = {part: tuple(value.shape) for part, value in self.file_tensors().items()}
        for part in _WEIGHTS:
            key = f"{self.lora_name}.{part}"
            if part not in tensors:
                raise ValueError(f"{key} is missing from the network weights")
            if tuple(tensors[part].shape) != shapes[part]:
                raise ValueError(f"{key} has shape {tuple(tensors[part].shape)} in the network weights but "
                                 f"{shapes[part]} here (rank {self.lora_dim}); set network_dim (and conv_dim) to "
                                 "the rank the file was trained with")

    def load_file_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.check_file_tensors(tensors)
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        with torch.no_grad():
            for index, (row, column) in enumerate(zip(self.lora_down, self.lora_up, strict=True)):
                row.copy_(down[index:index + 1])
                column.copy_(up[:, index:index + 1])
        self.set_alpha(tensors.get("alpha"))


class DyLoRANetwork(LoRANetwork):
    """A :class:`LoRANetwork` of :class:`DyLoRAModule`s; its files are kohya LoRA files of full rank.

    Attributes:
        unit: the number of ranks trained together.
    """

    def __init__(self, unet_loras: Sequence[DyLoRAModule], text_encoder_loras: Sequence[Sequence[DyLoRAModule]],
                 text_encoder_prefixes: Sequence[str], settings: DyLoRAOptions,
                 aliases: Mapping[str, str] | None = None) -> None:
        super().__init__(unet_loras, text_encoder_loras, text_encoder_prefixes, settings.lora, aliases)
        self.unit = settings.unit

    def _file_state(self) -> dict[str, torch.Tensor]:
        return {f"{lora.lora_name}.{part}": value for lora in self.all_loras()
                for part, value in lora.file_tensors().items()}


def create_dylora_network(unet: nn.Module, text_encoders: Sequence[nn.Module], family: str, *, dim: int,
                          alpha: float, conv_dim: int = 0, conv_alpha: float = 1.0, dropout: float = 0.0,
                          rank_dropout: float = 0.0, module_dropout: float = 0.0, train_unet: bool = True,
                          train_text_encoder: bool | Sequence[bool] = True,
                          network_args: Mapping[str, Any] | None = None, multiplier: float = 1.0) -> DyLoRANetwork:
    """Build a DyLoRA network on the layers kohya's LoRA wraps (LoCon's 3x3 convolutions with conv_dim); not yet
    applied. Arguments as for :func:`engine.networks.lora.create_lora_network`; network_args take ``unit``.

    Raises:
        ValueError: a setting sd-scripts' DyLoRA does not have, a bad value or a family without DyLoRA; the message
            names the setting.
    """
    settings = resolve_dylora_options(
        {"dim": dim, "alpha": alpha, "conv_dim": conv_dim, "conv_alpha": conv_alpha, "dropout": dropout,
         "rank_dropout": rank_dropout, "module_dropout": module_dropout}, network_args, unet_naming_kind(family))
    prefixes, train_each = text_encoder_flags(family, text_encoders, train_text_encoder)
    unet_side = unet_targets(unet, family, include_conv_blocks=settings.lora.conv_dim > 0) if train_unet else []
    unet_loras = _modules(unet_side, settings, multiplier)
    built = {lora.lora_name for lora in unet_loras}
    aliases = {target.alias: target.name for target in unet_side if target.alias and target.name in built}
    text_loras = [_modules(text_encoder_targets(encoder, prefix), settings, multiplier) if train else []
                  for encoder, prefix, train in zip(text_encoders, prefixes, train_each, strict=True)]
    return DyLoRANetwork(unet_loras, text_loras, prefixes, settings, aliases)


def _modules(targets: Sequence[LoRATarget], settings: DyLoRAOptions, multiplier: float) -> list[DyLoRAModule]:
    modules = []
    for target in targets:
        rank, alpha = settings.lora.rank_and_alpha(target)
        if rank:  # a 3x3 conv without conv_dim stays untrained
            modules.append(DyLoRAModule(target.name, target.module, multiplier, rank, alpha, settings.unit))
    return modules


def dylora_network(config: RunConfig, model: LoadedModel, train_unet: bool, train_text: list[bool]) -> DyLoRANetwork:
    """The trainer's builder for network_type = "dylora" (engine.train.method_lora)."""
    return create_dylora_network(model.unet, model.text.encoders, model.family, train_unet=train_unet,
                                 train_text_encoder=train_text, **network_options(config.network))
