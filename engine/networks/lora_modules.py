"""The per-layer LoRA adapters of :mod:`engine.networks.lora`: kohya's one down/up pair, and FLUX's split_qkv.

A module wraps one ``nn.Linear`` or ``nn.Conv2d`` by replacing its ``forward`` (the model's module tree is left as
it is) and reads and writes its tensors under kohya's file keys (``lora_down.weight``, ``lora_up.weight``,
``alpha``). Which layers get one, and the network that holds them: :mod:`engine.networks.lora`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRAModule", "SplitLoRAModule", "per_sample_scaled"]


class LoRAModule(nn.Module):
    """A low-rank update ``multiplier * alpha/rank * up(down(x))`` added to one ``nn.Linear`` or ``nn.Conv2d``.

    ``multiplier`` is a float, or a tensor of one value per sample of the batch (see :func:`per_sample_scaled`).

    The wrapped layer is kept outside the module tree, so the network's state dict holds only ``lora_down``,
    ``lora_up`` and ``alpha``. Dropouts apply only while this module is in training mode and draw from torch's
    global RNG, so a trainer that saves and restores that RNG resumes them exactly.
    """

    def __init__(self, lora_name: str, org_module: nn.Linear | nn.Conv2d, multiplier: float = 1.0,
                 lora_dim: int = 4, alpha: float | torch.Tensor | None = 1.0, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0) -> None:
        super().__init__()
        if lora_dim < 1:
            raise ValueError(f"{lora_name}: the rank must be at least 1, got {lora_dim}")
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.__dict__["_org_module"] = org_module  # bypasses nn.Module registration on purpose (see class doc)
        self._org_forward: Callable[..., torch.Tensor] | None = None
        self._org_had_instance_forward = False
        self.lora_down, self.lora_up = _low_rank_pair(org_module, lora_dim, lora_name)
        self.register_buffer("alpha", torch.tensor(0.0))
        self.scale = 1.0
        self.set_alpha(alpha)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def org_module(self) -> nn.Linear | nn.Conv2d:
        return self.__dict__["_org_module"]

    @property
    def is_applied(self) -> bool:
        return self._org_forward is not None

    def set_alpha(self, alpha: float | torch.Tensor | None) -> None:
        """Set alpha and the scale alpha/rank; None or 0 means alpha = rank (kohya's rule for old files)."""
        value = 0.0 if alpha is None else float(alpha)
        if value < 0:
            raise ValueError(f"{self.lora_name}: alpha must not be negative, got {value:g}")
        with torch.no_grad():
            self.alpha.fill_(value if value else float(self.lora_dim))
        # From the stored float32 value, so training uses the scale any loader of the saved file computes.
        self.scale = self.alpha.item() / self.lora_dim

    def apply_to(self) -> None:
        """Route the wrapped layer's calls through :meth:`forward` (monkey-patching, as kohya does)."""
        if self.is_applied:
            raise RuntimeError(f"{self.lora_name} is already applied")
        org = self.org_module
        self._org_had_instance_forward = "forward" in org.__dict__
        self._org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Give the wrapped layer its own forward back (no-op when not applied)."""
        if not self.is_applied:
            return
        org = self.org_module
        if org.__dict__.get("forward") != self.forward:
            raise RuntimeError(f"{self.lora_name}: the layer's forward was replaced again after this LoRA was "
                               "applied; restore the later wrapper first")
        if self._org_had_instance_forward:
            org.forward = self._org_forward
        else:
            del org.forward
        self._org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        org_forward = self._org_forward if self._org_forward is not None else self.org_module.forward
        org_out = org_forward(x)
        if self.training and self.module_dropout > 0 and torch.rand(1) < self.module_dropout:
            return org_out
        return org_out + self._update(x)

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """``multiplier * scale * up(down(x))`` with the dropouts in training mode."""
        lx, scale = self._dropped(self.lora_down(x))
        return per_sample_scaled(self.lora_up(lx), self.multiplier) * scale

    def _dropped(self, lx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``down(x)`` after network_dropout and rank_dropout, and the scale to apply (training mode only)."""
        scale = self.scale
        if self.training and self.dropout > 0:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout > 0:
            lx = lx * self._rank_keep_mask(lx)
            scale = self.scale * (1.0 / (1.0 - self.rank_dropout))  # as if the rank shrank to the kept part
        return lx, scale

    def _rank_keep_mask(self, lx: torch.Tensor) -> torch.Tensor:
        """A Bernoulli keep-mask over [batch, rank], shaped to broadcast over tokens or pixels."""
        mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
        if lx.dim() == 3:  # Linear on [batch, tokens, rank]
            return mask.unsqueeze(1)
        if lx.dim() == 4:  # Conv2d on [batch, rank, height, width]
            return mask.unsqueeze(-1).unsqueeze(-1)
        return mask

    def load_file_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``lora_down.weight``, ``lora_up.weight`` and (optional) ``alpha`` from a file into this module.

        Raises:
            ValueError: a weight is missing or its shape differs (names the key and both shapes).
        """
        self.check_file_tensors(tensors)
        with torch.no_grad():
            self.lora_down.weight.copy_(tensors["lora_down.weight"])
            self.lora_up.weight.copy_(tensors["lora_up.weight"])
        self.set_alpha(tensors.get("alpha"))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """This module's entries in a kohya file (keys without the module name), as they are held."""
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight, "alpha": self.alpha}

    def check_file_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError if ``tensors`` (keys without the module name) cannot be loaded into this module."""
        for part, layer in (("lora_down.weight", self.lora_down), ("lora_up.weight", self.lora_up)):
            key = f"{self.lora_name}.{part}"
            if part not in tensors:
                raise ValueError(f"{key} is missing from the network weights")
            if tuple(tensors[part].shape) != tuple(layer.weight.shape):
                raise ValueError(f"{key} has shape {tuple(tensors[part].shape)} in the network weights but "
                                 f"{tuple(layer.weight.shape)} here (rank {self.lora_dim}); set network_dim "
                                 "(or conv_dim for 3x3 convolutions) to the rank the file was trained with")


def per_sample_scaled(update: torch.Tensor, multiplier: float | torch.Tensor) -> torch.Tensor:
    """``update * multiplier``; a multiplier tensor holds one value per sample of the batch (a dataset's
    network_multiplier, engine.train.network_scaling) and scales that sample's rows.

    A layer may see each sample several times in a row (a text encoder encodes a long caption as several 77-token
    chunks, sample after sample), so a batch dimension that is a multiple of the sample count is scaled chunk-wise.
    """
    if not isinstance(multiplier, torch.Tensor):
        return update * multiplier
    count = multiplier.numel()
    if count == 0 or update.shape[0] % count:
        raise ValueError(f"{count} per-sample network multipliers for a batch of {update.shape[0]}; set one "
                         "multiplier (network.set_multiplier(float)) for inputs that are not the training batch")
    values = multiplier.to(update).repeat_interleave(update.shape[0] // count)
    return update * values.view(-1, *([1] * (update.ndim - 1)))


def _low_rank_pair(org: nn.Module, rank: int, name: str) -> tuple[nn.Module, nn.Module]:
    """``down`` and ``up`` shaped like kohya's: Conv2d down keeps the kernel, stride and padding; up is 1x1."""
    if isinstance(org, nn.Conv2d):
        down = nn.Conv2d(org.in_channels, rank, org.kernel_size, org.stride, org.padding, bias=False)
        return down, nn.Conv2d(rank, org.out_channels, (1, 1), (1, 1), bias=False)
    if isinstance(org, nn.Linear):
        return nn.Linear(org.in_features, rank, bias=False), nn.Linear(rank, org.out_features, bias=False)
    raise TypeError(f"{name}: LoRA wraps nn.Linear or nn.Conv2d, not {type(org).__name__}")


class SplitLoRAModule(LoRAModule):
    """FLUX's ``split_qkv``: one down/up pair per part of a fused layer (q, k, v and, in single blocks, the MLP
    input), each of the rank; the parts' outputs are concatenated (sd-scripts ``lora_flux``, spec §5.3).

    Files hold it merged, as sd-scripts writes it: ``lora_down`` = the parts' downs concatenated [k*r, in],
    ``lora_up`` = block-diagonal [out, k*r]. Alpha (spec appendix A.2): sd-scripts keeps the training alpha, so
    every loader that scales by ``alpha / lora_down rows`` applies these layers at 1/k of their trained strength.
    Atelier stores ``k * alpha`` instead, so that ComfyUI, diffusers, A1111 and sd-scripts without split_qkv
    reproduce exactly what was trained; loading divides by k again. (sd-scripts resuming such a file with
    split_qkv would train at k times the strength; the file's metadata records the convention.)
    """

    def __init__(self, lora_name: str, org_module: nn.Linear, parts: Sequence[int], multiplier: float = 1.0,
                 lora_dim: int = 4, alpha: float | torch.Tensor | None = 1.0, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0) -> None:
        if not isinstance(org_module, nn.Linear) or sum(parts) != org_module.out_features:
            raise ValueError(f"{lora_name}: split_qkv parts {list(parts)} do not add up to the layer's outputs")
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout)
        self.parts = tuple(parts)
        self.lora_down = nn.ModuleList(nn.Linear(org_module.in_features, lora_dim, bias=False) for _ in parts)
        self.lora_up = nn.ModuleList(nn.Linear(lora_dim, width, bias=False) for width in parts)
        for down, up in zip(self.lora_down, self.lora_up, strict=True):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for down, up in zip(self.lora_down, self.lora_up, strict=True):
            lx, scale = self._dropped(down(x))
            outputs.append(up(lx) * scale)
        return per_sample_scaled(torch.cat(outputs, dim=-1), self.multiplier)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        down = torch.cat([layer.weight for layer in self.lora_down], dim=0)
        up = torch.block_diag(*(layer.weight for layer in self.lora_up))
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": self.alpha * len(self.parts)}

    def check_file_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        shapes = {key: tuple(value.shape) for key, value in self.file_tensors().items()}
        for part in ("lora_down.weight", "lora_up.weight"):
            key = f"{self.lora_name}.{part}"
            if part not in tensors:
                raise ValueError(f"{key} is missing from the network weights")
            if tuple(tensors[part].shape) != shapes[part]:
                raise ValueError(f"{key} has shape {tuple(tensors[part].shape)} in the network weights but "
                                 f"{shapes[part]} here (split_qkv: {len(self.parts)} parts of rank {self.lora_dim}); "
                                 "set network_dim to the rank the file was trained with")
        up = tensors["lora_up.weight"]
        if not torch.equal(up, torch.block_diag(*self._diagonal(up)).to(up.dtype)):
            raise ValueError(f"{self.lora_name}.lora_up.weight is not block-diagonal, so the file was trained "
                             "without split_qkv; remove split_qkv from network_args to load it")

    def _diagonal(self, up: torch.Tensor) -> list[torch.Tensor]:
        """The parts' up matrices: the diagonal blocks of a merged ``lora_up``."""
        blocks, row = [], 0
        for index, width in enumerate(self.parts):
            blocks.append(up[row:row + width, index * self.lora_dim:(index + 1) * self.lora_dim])
            row += width
        return blocks

    def load_file_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.check_file_tensors(tensors)
        downs = tensors["lora_down.weight"].chunk(len(self.parts), dim=0)
        with torch.no_grad():
            for layer, down in zip(self.lora_down, downs, strict=True):
                layer.weight.copy_(down)
            for layer, up in zip(self.lora_up, self._diagonal(tensors["lora_up.weight"]), strict=True):
                layer.weight.copy_(up)
        alpha = tensors.get("alpha")
        self.set_alpha(None if alpha is None else float(alpha) / len(self.parts))
