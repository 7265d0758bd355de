"""The tensor side of ``lora convert`` (engine.networks.tools.convert_lora): one kohya module into its diffusers
(PEFT) module(s) and back, and reading diffusers/PEFT files with the scale each module has in them.

A module changes its layer by ``scale · B @ A`` (kohya: ``alpha/rank · lora_up @ lora_down``). Every step is exact:

* kohya's alpha/rank is baked into A and B (PEFT files carry no alpha; diffusers then applies scale 1): B gets
  the power of two nearest the square root (exact in any float format), A the rest, as diffusers' own kohya
  converter splits it; a half-precision module whose scale is no power of two is written in float32, where the
  rest is exact too;
* a fused layer (qkv, FLUX's ``linear1``) gives each part the same A and its rows of B; a split_qkv file's
  block-diagonal B (spec §5.3) gives each part only its own rank block;
* back to kohya, parts with one and the same A (and scale) merge into one module with B's rows concatenated and
  alpha = scale · rank; otherwise the A's are stacked (rank r1 + r2 + ...) under a block-diagonal B with each
  part's scale baked in, alpha = rank; a part the file lacks adds zero rows;
* swapped layers exchange the halves of B's rows.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.networks.tools.convert_names import CONCAT, SWAP, SWAP_IF_PRE_ONLY, TEXT_COMPONENTS, TRANSFORMER, LayerPair
from engine.networks.tools.lora_file import LoRAWeights, ToolError, some_names

__all__ = ["ADAPTER_METADATA", "PeftModule", "baked_dtype", "merge_parts", "read_peft_modules", "split_module"]

ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' LoraConfig per component (its training scripts write it)
_PEFT_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "alpha": "alpha"}


@dataclass
class PeftModule:
    """One diffusers/PEFT module: ``A`` [r, in, ...], ``B`` [out, r, ...], and the scale its file gives it."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


# --- kohya -> diffusers ------------------------------------------------------------------------------------------


def _scale_split(scale: float) -> tuple[float, float]:
    """(for A, for B): B gets the power of two nearest sqrt(scale) (exact), A the rest; A·B scales by ``scale``."""
    if scale <= 0:
        return scale, 1.0
    power = 2.0 ** round(math.log2(scale) / 2)
    return scale / power, power


def _power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


def baked_dtype(weights: LoRAWeights) -> torch.dtype:
    """The dtype a module's diffusers weights are written in: the file's own where alpha/rank bakes into it exactly
    (float32 weights, or a power-of-two scale), else float32 (0.75 · a bf16 weight is no bf16 number)."""
    dtype = weights.down.dtype
    exact = dtype in (torch.float32, torch.float64) or _power_of_two(weights.scale)
    return dtype if exact else torch.float32


def split_module(pair: LayerPair, weights: LoRAWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The diffusers module(s) of one kohya module: {name: (A, B)}, alpha/rank baked in, in :func:`baked_dtype`."""
    dtype = baked_dtype(weights)
    for_a, for_b = _scale_split(weights.scale)
    down, up = weights.down.float() * for_a, weights.up.float() * for_b
    if pair.kind == CONCAT:
        pieces = _concat_pieces(pair, down, up)
    else:
        if pair.kind == SWAP or (pair.kind == SWAP_IF_PRE_ONLY and _pre_only(down, up)):
            up = _swap_halves(up)
        pieces = {pair.diffusers[0]: (down, up)}
    return {name: (a.to(dtype).contiguous(), b.to(dtype).contiguous()) for name, (a, b) in pieces.items()}


def _pre_only(down: torch.Tensor, up: torch.Tensor) -> bool:
    """SD3's last context block: adaLN of 2·hidden rows (shift, scale) instead of 6·hidden (spec §8.1)."""
    return up.shape[0] == 2 * down.shape[1]


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _part_sizes(count: int, out_rows: int, in_features: int) -> list[int]:
    """Rows of each part of a fused layer: thirds of qkv; FLUX's linear1 is q, k, v of ``hidden`` (its input
    width) rows each and the MLP input for the rest (as engine.models.flux.convert splits the weight)."""
    if count == 4:
        return [in_features] * 3 + [out_rows - 3 * in_features]
    if out_rows % count:
        raise ToolError(f"a fused layer of {out_rows} rows does not split into {count} equal parts")
    return [out_rows // count] * count


def _block_diagonal(up: torch.Tensor, sizes: Sequence[int]) -> bool:
    """split_qkv's layout (spec §5.3): part i's rows of B are zero outside column block i (rank / parts each)."""
    count, rank = len(sizes), up.shape[1]
    if rank % count:
        return False
    width = rank // count
    for index, rows in enumerate(up.split(list(sizes), dim=0)):
        outside = torch.cat([rows[:, : index * width], rows[:, (index + 1) * width:]], dim=1)
        if bool(outside.any()):
            return False
    return True


def _concat_pieces(pair: LayerPair, down: torch.Tensor, up: torch.Tensor
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    sizes = _part_sizes(len(pair.diffusers), up.shape[0], down.shape[1])
    rows = up.split(sizes, dim=0)
    # clones: safetensors refuses tensors that share memory (each part is a tensor of its own in the file)
    if _block_diagonal(up, sizes):  # each part has a rank block of its own: keep only that block
        width = up.shape[1] // len(sizes)
        return {name: (down[i * width:(i + 1) * width].clone(), part[:, i * width:(i + 1) * width].clone())
                for i, (name, part) in enumerate(zip(pair.diffusers, rows, strict=True))}
    return {name: (down.clone(), part.clone()) for name, part in zip(pair.diffusers, rows, strict=True)}



# --- diffusers -> kohya ------------------------------------------------------------------------------------------


def read_peft_modules(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                      ) -> dict[str, PeftModule]:
    """{full module name: PeftModule} of a diffusers/PEFT file; names without a component are the transformer's.

    The scale is 1 (diffusers' rule without alphas), ``alpha / rank`` where the file has ``<module>.alpha`` keys
    (FLUX files that FluxLoraLoaderMixin reads as network alphas), or what the ``lora_adapter_metadata`` LoraConfig
    of diffusers' training scripts says (lora_alpha, alpha_pattern, rank_pattern, use_rslora).
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        for suffix, part in _PEFT_PARTS.items():
            if key.endswith(f".{suffix}"):
                groups.setdefault(key.removesuffix(f".{suffix}"), {})[part] = tensor
                break
        else:
            unknown.append(key)
    if unknown:  # DoRA magnitudes, lora_B biases, old attention-processor names: kohya has no place for them
        raise ToolError(f"{path} has keys that are not plain LoRA weights: {some_names(unknown)}; it cannot be "
                        "converted without changing what it does")
    configs = _adapter_configs(metadata)
    modules = {}
    for name, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            raise ToolError(f"{path}: module {name} has no {'lora_A' if 'A' not in parts else 'lora_B'} weight; the "
                            "file is damaged, re-save it from its source")
        full = name if name.partition(".")[0] in _COMPONENTS else f"{TRANSFORMER}.{name}"
        module = PeftModule(parts["A"], parts["B"])
        module.scale = (float(parts["alpha"]) / module.rank if "alpha" in parts
                        else _config_scale(configs, full, module.rank))
        modules[full] = module
    return modules


_COMPONENTS = frozenset({TRANSFORMER, *(component for table in TEXT_COMPONENTS.values()
                                        for component in table.values() if component)})


def _adapter_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{component: its LoraConfig fields} from diffusers' ``lora_adapter_metadata`` ("transformer.r": 4, ...)."""
    try:
        packed = json.loads(metadata.get(ADAPTER_METADATA) or "{}")
    except ValueError:
        return {}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items() if isinstance(packed, dict) else ():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup (peft.utils.other.get_pattern_key): a key matches a module path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _config_scale(configs: Mapping[str, Mapping[str, Any]], full: str, rank: int) -> float:
    component, _, module = full.partition(".")
    config = configs.get(component)
    if not config or "lora_alpha" not in config:
        return 1.0
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def merge_parts(pair: LayerPair, parts: Mapping[str, PeftModule]) -> LoRAWeights:
    """One kohya module from the diffusers module(s) of its layer (module docstring); missing parts change
    nothing (zero rows of B)."""
    present = [parts[name] for name in pair.diffusers if name in parts]
    dtype = present[0].A.dtype
    if pair.kind != CONCAT:
        module = present[0]
        up = module.B
        if pair.kind == SWAP or (pair.kind == SWAP_IF_PRE_ONLY and _pre_only(module.A, module.B)):
            up = _swap_halves(up)
        return LoRAWeights(module.A, up.contiguous(), module.scale * module.rank)
    first = present[0]
    sizes = [parts[name].B.shape[0] if name in parts else _missing_rows(index, first)
             for index, name in enumerate(pair.diffusers)]
    one_a = all(torch.equal(module.A, first.A) for module in present)
    if one_a and len({module.scale for module in present}) == 1:
        up = torch.cat([parts[name].B.float() if name in parts else first.B.new_zeros(rows, first.rank).float()
                        for name, rows in zip(pair.diffusers, sizes, strict=True)])
        return LoRAWeights(first.A, up.to(dtype), first.scale * first.rank)
    return _block_diagonal_module(pair, parts, sizes, dtype)


def _missing_rows(index: int, first: PeftModule) -> int:
    """Rows of a part the file lacks: q, k and v are as wide as the layer's input (hidden); FLUX's MLP input is
    4 x hidden (mlp_ratio 4)."""
    hidden = int(first.A.shape[1])
    return hidden if index < 3 else 4 * hidden


def _block_diagonal_module(pair: LayerPair, parts: Mapping[str, PeftModule], sizes: Sequence[int],
                           dtype: torch.dtype) -> LoRAWeights:
    """A's stacked (rank = the sum), B block-diagonal with each part's scale baked in; alpha = rank (scale 1)."""
    present = [(index, parts[name]) for index, name in enumerate(pair.diffusers) if name in parts]
    if not all(_power_of_two(module.scale) for _, module in present):  # as baked_dtype: B · scale stays exact
        dtype = torch.promote_types(dtype, torch.float32)
    rank = sum(module.rank for _, module in present)
    down = torch.cat([module.A.float() for _, module in present])
    up = torch.zeros(sum(sizes), rank, *present[0][1].B.shape[2:])
    starts = [sum(sizes[:index]) for index in range(len(sizes))]
    column = 0
    for index, module in present:
        up[starts[index]:starts[index] + sizes[index], column:column + module.rank] = module.B.float() * module.scale
        column += module.rank
    return LoRAWeights(down.to(dtype), up.to(dtype), float(rank))
