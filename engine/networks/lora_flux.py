"""The network_args of a kohya LoRA on a FLUX.1 / Chroma transformer (sd-scripts ``networks/lora_flux.py``, spec §5.2).

Pure data and rules, no torch: parsing each argument (as kohya's ``key=value`` text or as TOML values), and the
rank every module gets. The rules follow sd-scripts at 48d368fa, with two choices made on purpose:

* ``network_reg_dims`` / ``network_reg_lrs``: the **first** regex found (``re.search``) in the module name wins, as
  sd-scripts' code does (its docs say the last one; spec appendix A.3). Files trained from the same arguments then
  have the same ranks here and there.
* Block-index and ``train_blocks`` filtering zero the rank of every module of an unselected block, whatever set
  the rank (spec §5.2: "block-index filtering then zeroes ranks"); sd-scripts skips the filter for modules whose rank
  came from ``network_reg_dims``.

Precedence for one module: ``network_reg_dims`` > the per-type dims (``img_attn_dim``, ...) or, for the
conditioning layers, ``in_dims`` > ``network_dim``; then the block filters. Alpha is always ``network_alpha``.
A weights file given to start from must have the same ranks (it is checked shape by shape when loaded).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.networks.arg_values import arg_flag, arg_non_negative, arg_number

__all__ = ["FLUX_NETWORK_ARGS", "IN_DIM_LAYERS", "TYPE_DIMS", "FluxLoRAArgs", "block_of", "parse_flux_args"]

# (argument, substrings that must all be in the module name); checked in this order, as sd-scripts does.
TYPE_DIMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_attn_dim", ("img_attn",)),
    ("txt_attn_dim", ("txt_attn",)),
    ("img_mlp_dim", ("img_mlp",)),
    ("txt_mlp_dim", ("txt_mlp",)),
    ("img_mod_dim", ("img_mod",)),
    ("txt_mod_dim", ("txt_mod",)),
    ("single_dim", ("single_blocks", "linear")),
    ("single_mod_dim", ("modulation",)),
)
# The conditioning layers in_dims gives ranks to, in its order (top-level module paths of the BFL transformer).
IN_DIM_LAYERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
TRAIN_BLOCKS = ("all", "double", "single")
_BLOCK = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_")
_PREFIX = "network.network_args."


@dataclass(frozen=True)
class FluxLoRAArgs:
    """The FLUX-specific network_args after parsing; the defaults are sd-scripts' (no argument given).

    Attributes:
        type_dims: rank per :data:`TYPE_DIMS` argument that was given (0 = no module).
        in_dims: ranks of :data:`IN_DIM_LAYERS` (0 = none); None = no conditioning layer is trained.
        double_blocks, single_blocks: the block indices to train; None = all.
        train_blocks: "all", "double" or "single".
        split_qkv: separate LoRA pairs for q, k, v (and the single blocks' MLP input), saved merged.
        train_t5xxl: LoRA on the T5 encoder (``lora_te3_``).
        reg_dims, reg_lrs: (regex, rank) and (regex, learning rate) in the order given; the first match wins.
        verbose: print every module's rank and alpha, and the skipped modules, when the network is built.
    """

    type_dims: Mapping[str, int] | None = None
    in_dims: tuple[int, ...] | None = None
    double_blocks: frozenset[int] | None = None
    single_blocks: frozenset[int] | None = None
    train_blocks: str = "all"
    split_qkv: bool = False
    train_t5xxl: bool = False
    reg_dims: tuple[tuple[str, int], ...] = ()
    reg_lrs: tuple[tuple[str, float], ...] = ()
    verbose: bool = False

    def rank(self, name: str, default: int) -> int:
        """The rank of the module ``name`` (a kohya name) when ``network_dim`` is ``default``; 0 = no module."""
        rank = self._chosen_rank(name, default)
        block = block_of(name)
        if rank and block is not None and not self.trains_block(*block):
            return 0
        return rank

    def _chosen_rank(self, name: str, default: int) -> int:
        for pattern, rank in self.reg_dims:
            if re.search(pattern, name):
                return rank
        layer = conditioning_layer(name)
        if layer is not None:
            return self.in_dims[IN_DIM_LAYERS.index(layer)] if self.in_dims else 0
        for arg, parts in TYPE_DIMS:
            if self.type_dims and arg in self.type_dims and all(part in name for part in parts):
                return self.type_dims[arg]
        return default

    def trains_block(self, kind: str, index: int) -> bool:
        """Whether block ``index`` of ``kind`` ("double" or "single") is selected by train_blocks and the indices."""
        if self.train_blocks not in ("all", kind):
            return False
        chosen = self.double_blocks if kind == "double" else self.single_blocks
        return chosen is None or index in chosen

    def reg_lr_index(self, name: str) -> int | None:
        """The index in :attr:`reg_lrs` of the first regex found in ``name``, or None."""
        for index, (pattern, _) in enumerate(self.reg_lrs):
            if re.search(pattern, name):
                return index
        return None

    def check_block_counts(self, double: int, single: int) -> None:
        """Refuse block indices the model does not have (it has ``double`` and ``single`` blocks)."""
        for key, chosen, count in (("train_double_block_indices", self.double_blocks, double),
                                   ("train_single_block_indices", self.single_blocks, single)):
            wrong = sorted(index for index in chosen or () if index >= count)
            if wrong:
                raise ValueError(f"{_PREFIX}{key}: this model has {count} blocks (0-{count - 1}), so "
                                 f"{', '.join(map(str, wrong))} do not exist; use indices from 0 to {count - 1}")


def block_of(name: str) -> tuple[str, int] | None:
    """("double" | "single", index) for a module inside a transformer block, from its kohya name; else None."""
    match = _BLOCK.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def conditioning_layer(name: str) -> str | None:
    """The :data:`IN_DIM_LAYERS` entry a module belongs to (``lora_unet_time_in_in_layer`` -> "time_in")."""
    for layer in IN_DIM_LAYERS:
        if name == f"lora_unet_{layer}" or name.startswith(f"lora_unet_{layer}_"):
            return layer
    return None


# --- parsing -------------------------------------------------------------------------------------------------------

def _rank(path: str, value: Any) -> int:
    wanted = "a whole number of at least 0"
    number = arg_number(path, value, wanted)
    if number < 0 or number != int(number):
        raise ValueError(f"{path} must be {wanted}, got {value!r}")
    return int(number)


_flag = arg_flag


def _items(path: str, value: Any) -> list[Any]:
    """A list given as a TOML list or as text "1,2,3" / "[1,2,3]"."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, str):
        raise ValueError(f"{path} must be a list, got {value!r}")
    text = value.strip().removeprefix("[").removesuffix("]").strip()
    return [item.strip() for item in text.split(",")] if text else []


def layer_ranks(path: str, value: Any, layers: Sequence[str], example: str) -> tuple[int, ...]:
    """One rank per named layer (FLUX's in_dims, SD3's emb_dims), as a list; ``example`` shows the form."""
    items = _items(path, value)
    if len(items) != len(layers):
        raise ValueError(f"{path} needs {len(layers)} ranks ({', '.join(layers)}), e.g. {example}; got {value!r}")
    return tuple(_rank(f"{path}[{index}]", item) for index, item in enumerate(items))


def _in_dims(path: str, value: Any) -> tuple[int, ...]:
    return layer_ranks(path, value, IN_DIM_LAYERS, "[4,2,2,2,4]")


def _indices(path: str, value: Any) -> frozenset[int] | None:
    """ "all" -> None, "none" or empty -> no block, "0,1,4-5,7" (or a TOML list) -> those indices."""
    if isinstance(value, str) and value.strip().lower() in ("all", "none", ""):
        return None if value.strip().lower() == "all" else frozenset()
    chosen: set[int] = set()
    for item in _items(path, value):
        text = str(item).strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", text) if not isinstance(item, (bool, float)) else None
        if match is None or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise ValueError(f"{path}: {text!r} is not a block index or a range like 4-7; write e.g. "
                             "'0,1,4-5,7', 'all' or 'none'")
        first = int(match.group(1))
        chosen.update(range(first, int(match.group(2) or first) + 1))
    return frozenset(chosen)


def _train_blocks(path: str, value: Any) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text not in TRAIN_BLOCKS:
        raise ValueError(f"{path} must be one of {', '.join(TRAIN_BLOCKS)}, got {value!r}")
    return text


def _pairs(path: str, value: Any, parse: Callable[[str, Any], Any]) -> tuple[tuple[str, Any], ...]:
    """ "regex=value,regex=value" (kohya) or a TOML table {regex = value}, in order; each regex must compile."""
    if isinstance(value, Mapping):
        entries = [(str(key), item) for key, item in value.items()]
    elif isinstance(value, str):
        entries = []
        for part in (part.strip() for part in value.split(",")):
            if not part:
                continue
            pattern, equals, item = part.rpartition("=")
            if not equals or not pattern:
                raise ValueError(f"{path}: {part!r} is not 'regex=value'; write e.g. 'img_attn=8,txt_attn=4'")
            entries.append((pattern.strip(), item.strip()))
    else:
        raise ValueError(f"{path} must be 'regex=value,...' text or a table, got {value!r}")
    for pattern, _ in entries:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{path}: {pattern!r} is not a valid regular expression ({error})") from None
    return tuple((pattern, parse(f"{path}[{pattern!r}]", item)) for pattern, item in entries)


def _learning_rate(path: str, value: Any) -> float:
    return arg_non_negative(path, value, "a learning rate of at least 0")


# network_args key -> (FluxLoRAArgs field, parser). The type dims are collected into FluxLoRAArgs.type_dims.
FLUX_NETWORK_ARGS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    **{arg: ("type_dims", _rank) for arg, _ in TYPE_DIMS},
    "in_dims": ("in_dims", _in_dims),
    "train_double_block_indices": ("double_blocks", _indices),
    "train_single_block_indices": ("single_blocks", _indices),
    "train_blocks": ("train_blocks", _train_blocks),
    "split_qkv": ("split_qkv", _flag),
    "train_t5xxl": ("train_t5xxl", _flag),
    "network_reg_dims": ("reg_dims", lambda path, value: _pairs(path, value, _rank)),
    "network_reg_lrs": ("reg_lrs", lambda path, value: _pairs(path, value, _learning_rate)),
    "verbose": ("verbose", _flag),
}


def parse_flux_args(network_args: Mapping[str, Any]) -> FluxLoRAArgs:
    """A :class:`FluxLoRAArgs` from the FLUX keys of network_args (the caller has checked they are FLUX keys).

    Raises:
        ValueError: a bad value; the message names ``network.network_args.<key>``.
    """
    return FluxLoRAArgs(**parsed_args(network_args, FLUX_NETWORK_ARGS))


def parsed_args(network_args: Mapping[str, Any], table: Mapping[str, tuple[str, Callable[[str, Any], Any]]]
                ) -> dict[str, Any]:
    """The args dataclass's fields from network_args by ``table`` (key -> (field, parser)); the keys whose field is
    "type_dims" are gathered into one ``type_dims`` dict (None when none is given) by their own key.

    Raises:
        ValueError: a bad value; the message names ``network.network_args.<key>``.
    """
    fields: dict[str, Any] = {}
    type_dims: dict[str, int] = {}
    for key, value in network_args.items():
        field, parse = table[key]
        parsed = parse(_PREFIX + key, value)
        if field == "type_dims":
            type_dims[key] = parsed
        else:
            fields[field] = parsed
    return {**fields, "type_dims": type_dims or None}


def split_parts(path: str, out_features: int, in_features: int) -> Sequence[int] | None:
    """The output widths split_qkv gives a fused layer (BFL module path), or None for a layer it does not split.

    Double blocks' ``img_attn.qkv`` / ``txt_attn.qkv``: q, k, v of the hidden width each. Single blocks' ``linear1``:
    q, k, v (hidden = its input width) and the MLP input (the rest).
    """
    if re.fullmatch(r"double_blocks\.\d+\.(img|txt)_attn\.qkv", path):
        return (out_features // 3,) * 3
    if re.fullmatch(r"single_blocks\.\d+\.linear1", path):
        return (in_features,) * 3 + (out_features - 3 * in_features,)
    return None
