"""FLUX.1 / Chroma transformer key layouts: telling them apart, and BFL ↔ diffusers conversion (spec §1.3, §1.6).

Training uses BFL's naming (the ``Flux`` module's state dict is BFL's). A diffusers ``FluxTransformer2DModel`` or
``ChromaTransformer2DModel`` state dict converts to it by renaming, concatenating the split Q/K/V (and the single
blocks' MLP input) and swapping the two halves of the final layer's modulation: BFL stores (shift, scale),
diffusers (scale, shift). The plan is one table (:func:`conversion_plan`) read in either direction, so the two
directions cannot disagree. Pure key and shape logic: torch is imported only to move tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "BFL_CHROMA_KEY",
    "BFL_FLUX_KEY",
    "DIFFUSERS_FLUX_KEY",
    "Conversion",
    "bfl_to_diffusers",
    "conversion_plan",
    "diffusers_to_bfl",
    "linear_rules",
    "plan_from_bfl",
    "plan_to_bfl",
    "split_rules",
    "swap_halves",
    "transformer_layout",
]

BFL_FLUX_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"  # any BFL-layout FLUX.1 or Chroma transformer
BFL_CHROMA_KEY = "distilled_guidance_layer.in_proj.weight"  # Chroma's approximator (same name in diffusers)
DIFFUSERS_FLUX_KEY = "transformer_blocks.0.attn.add_k_proj.weight"  # diffusers FluxTransformer2DModel / Chroma
DIFFUSERS_SD3_PATCH_KEY = "pos_embed.proj.weight"  # diffusers SD3Transformer2DModel, which FLUX lacks
_SWAP = "swap"  # halves exchanged (BFL shift, scale ↔ diffusers scale, shift)
_CONCAT = "concat"  # BFL tensor = diffusers parts concatenated along rows
_RENAME = "rename"
# The kinds by name for the other tables built of Conversion rows (engine.models.sd3.convert).
SWAP, CONCAT, RENAME = _SWAP, _CONCAT, _RENAME


@dataclass(frozen=True)
class Conversion:
    """One BFL tensor and the diffusers tensor(s) it corresponds to."""

    bfl: str
    diffusers: tuple[str, ...]
    kind: str  # _RENAME, _CONCAT or _SWAP


def transformer_layout(keys: Iterable[str]) -> str | None:
    """The naming of a prefix-free transformer state dict's keys: "bfl", "diffusers", or None (neither)."""
    keys = set(keys)
    # SD3's diffusers transformer has the same joint-block names; its patch embedding (pos_embed.proj) tells it apart.
    diffusers_blocks = DIFFUSERS_FLUX_KEY in keys or DIFFUSERS_FLUX_KEY.replace(".weight", ".bias") in keys
    if diffusers_blocks and DIFFUSERS_SD3_PATCH_KEY not in keys:
        return "diffusers"
    if BFL_FLUX_KEY in keys or any(key.startswith("double_blocks.") for key in keys):
        return "bfl"
    return None


def linear_rules(bfl: str, diffusers: str, kind: str = _RENAME) -> list[Conversion]:
    """A linear layer's weight and bias under one name each (renamed, or ``kind`` SWAP for modulations)."""
    return [Conversion(f"{bfl}.{part}", (f"{diffusers}.{part}",), kind) for part in ("weight", "bias")]


def split_rules(bfl: str, parts: tuple[str, ...]) -> list[Conversion]:
    """A fused linear layer (weight and bias) whose rows are the diffusers ``parts`` concatenated."""
    return [Conversion(f"{bfl}.{p}", tuple(f"{name}.{p}" for name in parts), _CONCAT) for p in ("weight", "bias")]


def _top_level(double: int) -> list[Conversion]:
    plan = [*linear_rules("img_in", "x_embedder"), *linear_rules("txt_in", "context_embedder"),
            *linear_rules("final_layer.linear", "proj_out")]
    for bfl, diffusers in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                           ("guidance_in", "guidance_embedder")):
        plan += linear_rules(f"{bfl}.in_layer", f"time_text_embed.{diffusers}.linear_1")
        plan += linear_rules(f"{bfl}.out_layer", f"time_text_embed.{diffusers}.linear_2")
    plan += linear_rules("final_layer.adaLN_modulation.1", "norm_out.linear", _SWAP)
    return plan


def _approximator(layers: int) -> list[Conversion]:
    """Chroma's distilled guidance layer: in_layer/out_layer ↔ linear_1/linear_2, norms' scale ↔ weight."""
    root = "distilled_guidance_layer"
    plan = [*linear_rules(f"{root}.in_proj", f"{root}.in_proj"), *linear_rules(f"{root}.out_proj", f"{root}.out_proj")]
    for i in range(layers):
        plan += linear_rules(f"{root}.layers.{i}.in_layer", f"{root}.layers.{i}.linear_1")
        plan += linear_rules(f"{root}.layers.{i}.out_layer", f"{root}.layers.{i}.linear_2")
        plan.append(Conversion(f"{root}.norms.{i}.scale", (f"{root}.norms.{i}.weight",), _RENAME))
    return plan


def _double_block(i: int) -> list[Conversion]:
    b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
    plan = [*linear_rules(f"{b}.img_mod.lin", f"{d}.norm1.linear"),
            *linear_rules(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear"),
            *split_rules(f"{b}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")),
            *split_rules(f"{b}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")),
            *linear_rules(f"{b}.img_attn.proj", f"{d}.attn.to_out.0"),
            *linear_rules(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out"),
            *linear_rules(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj"), *linear_rules(f"{b}.img_mlp.2", f"{d}.ff.net.2"),
            *linear_rules(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj"),
            *linear_rules(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")]
    for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
        plan.append(Conversion(f"{b}.{stream}_attn.norm.query_norm.scale", (f"{d}.attn.{q}.weight",), _RENAME))
        plan.append(Conversion(f"{b}.{stream}_attn.norm.key_norm.scale", (f"{d}.attn.{k}.weight",), _RENAME))
    return plan


def _single_block(i: int) -> list[Conversion]:
    b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    return [*split_rules(f"{b}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")),
            *linear_rules(f"{b}.linear2", f"{d}.proj_out"), *linear_rules(f"{b}.modulation.lin", f"{d}.norm.linear"),
            Conversion(f"{b}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",), _RENAME),
            Conversion(f"{b}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",), _RENAME)]


def _count(keys: Iterable[str], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = [int(match[1]) for key in keys if (match := regex.match(key))]
    return max(indices) + 1 if indices else 0


def conversion_plan(keys: Iterable[str], layout: str) -> list[Conversion]:
    """Every BFL ↔ diffusers correspondence for a transformer with the block counts that ``keys`` (in ``layout``,
    "bfl" or "diffusers") show. Entries for modules a variant lacks (schnell's guidance_in, Chroma's modulations)
    are in the plan too; the converters skip those whose source tensors are absent."""
    keys = list(keys)
    double_name, single_name = ("double_blocks", "single_blocks") if layout == "bfl" else \
        ("transformer_blocks", "single_transformer_blocks")
    double, single = _count(keys, rf"{double_name}\.(\d+)\."), _count(keys, rf"{single_name}\.(\d+)\.")
    layers = _count(keys, r"distilled_guidance_layer\.(?:layers|norms)\.(\d+)\.")
    plan = [*_top_level(double), *_approximator(layers)]
    for i in range(double):
        plan += _double_block(i)
    for i in range(single):
        plan += _single_block(i)
    return plan


def diffusers_to_bfl(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """BFL state dict from a diffusers transformer state dict, and the diffusers keys no rule used (left over)."""
    return plan_to_bfl(state, conversion_plan(state, "diffusers"))


def plan_to_bfl(state: Mapping[str, torch.Tensor], plan: Iterable[Conversion]) -> tuple[dict[str, torch.Tensor],
                                                                                       list[str]]:
    """The training-naming (``bfl`` field) state dict from a diffusers one by ``plan``, and the diffusers keys no
    rule used (left over); rules whose diffusers tensors are absent are skipped."""
    import torch

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in plan:
        if not all(name in state for name in rule.diffusers):
            continue
        parts = [state[name] for name in rule.diffusers]
        if rule.kind == _CONCAT:
            out[rule.bfl] = torch.cat(parts, dim=0)
        elif rule.kind == _SWAP:
            out[rule.bfl] = swap_halves(parts[0])
        else:
            out[rule.bfl] = parts[0]
        used.update(rule.diffusers)
    return out, sorted(set(state) - used)


def bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Diffusers state dict from a BFL transformer state dict, and the BFL keys no rule used (left over).

    The single blocks' ``linear1`` splits into Q, K, V of ``hidden`` rows each (``img_in``'s output width) and the
    MLP input (the rest).
    """
    hidden = int(state["img_in.weight"].shape[0])

    def sizes(rows: int, count: int) -> list[int]:
        return [hidden] * 3 + [rows - 3 * hidden] if count == 4 else [rows // count] * count

    return plan_from_bfl(state, conversion_plan(state, "bfl"), sizes)


def plan_from_bfl(state: Mapping[str, torch.Tensor], plan: Iterable[Conversion],
                  split_sizes: Callable[[int, int], list[int]] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                       list[str]]:
    """The diffusers state dict from a training-naming (``bfl`` field) one by ``plan``, and the keys no rule used.

    Args:
        state: the training-naming state dict.
        plan: the conversion rows; those whose tensor is absent are skipped.
        split_sizes: rows of each part of a concatenated tensor, from (its rows, its part count); default equal parts.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in plan:
        if rule.bfl not in state:
            continue
        tensor = state[rule.bfl]
        if rule.kind == _CONCAT:
            rows, count = int(tensor.shape[0]), len(rule.diffusers)
            sizes = split_sizes(rows, count) if split_sizes is not None else [rows // count] * count
            out.update(zip(rule.diffusers, (piece.contiguous() for piece in torch.split(tensor, sizes)), strict=True))
        elif rule.kind == _SWAP:
            out[rule.diffusers[0]] = swap_halves(tensor)
        else:
            out[rule.diffusers[0]] = tensor
        used.add(rule.bfl)
    return out, sorted(set(state) - used)


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with its two row halves exchanged ((shift, scale) ↔ (scale, shift))."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
