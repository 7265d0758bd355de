"""SD3 / SD3.5 transformer key layouts: SAI ↔ diffusers ``SD3Transformer2DModel`` conversion (spec §8.9).

Training uses SAI's naming (the :class:`~engine.models.sd3.mmdit.MMDiT` state dict is SAI's). A diffusers state dict
converts to it by renaming, concatenating the split Q/K/V into ``qkv``, and swapping the two halves of the last
block's context modulation and of the final layer's: SAI stores (shift, scale), diffusers' AdaLayerNormContinuous
(scale, shift). The plan is one table of :class:`~engine.models.flux.convert.Conversion` rows (the ``bfl`` field
holds the SAI name) read in either direction, so the two directions cannot disagree; the LoRA converter reads the
same table for module names. Pure key and shape logic: torch is imported only to move tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from engine.models.flux.convert import RENAME, SWAP, Conversion, linear_rules, plan_from_bfl, plan_to_bfl, split_rules

if TYPE_CHECKING:
    import torch

    from engine.models.sd3.params import SD3Params

__all__ = [
    "DIFFUSERS_SD3_KEY",
    "SAI_SD3_KEY",
    "conversion_plan",
    "diffusers_config",
    "diffusers_to_sai",
    "sai_to_diffusers",
    "transformer_layout",
]

SAI_SD3_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
DIFFUSERS_SD3_KEY = "pos_embed.proj.weight"  # FLUX's diffusers transformer has x_embedder.weight instead
# diffusers' sample_size for every published SD3 config; with patch 2 it makes PatchEmbed's base size 64, which
# engine.models.sd3.pos_embed.sincos_pos_embed assumes.
DIFFUSERS_SAMPLE_SIZE = 128


def transformer_layout(keys: Iterable[str]) -> str | None:
    """The naming of a prefix-free SD3 transformer state dict: "sai", "diffusers", or None (neither)."""
    keys = set(keys)
    if any(key.startswith("joint_blocks.") for key in keys):
        return "sai"
    if DIFFUSERS_SD3_KEY in keys and any(key.startswith("transformer_blocks.") for key in keys):
        return "diffusers"
    return None


def _top_level() -> list[Conversion]:
    return [Conversion("pos_embed", ("pos_embed.pos_embed",), RENAME),
            *linear_rules("x_embedder.proj", "pos_embed.proj"),
            *linear_rules("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
            *linear_rules("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
            *linear_rules("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
            *linear_rules("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
            *linear_rules("context_embedder", "context_embedder"),
            *linear_rules("final_layer.linear", "proj_out"),
            *linear_rules("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP)]


def _norms(sai: str, diffusers_q: str, diffusers_k: str) -> list[Conversion]:
    return [Conversion(f"{sai}.ln_q.weight", (f"{diffusers_q}.weight",), RENAME),
            Conversion(f"{sai}.ln_k.weight", (f"{diffusers_k}.weight",), RENAME)]


def _joint_block(i: int, last: bool) -> list[Conversion]:
    """One joint block; the last one's context stream has no proj or MLP and a swapped (shift, scale) adaLN."""
    b, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
    x, ctx = f"{b}.x_block", f"{b}.context_block"
    plan = [*linear_rules(f"{x}.adaLN_modulation.1", f"{d}.norm1.linear"),
            *split_rules(f"{x}.attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")),
            *linear_rules(f"{x}.attn.proj", f"{d}.attn.to_out.0"),
            *_norms(f"{x}.attn", f"{d}.attn.norm_q", f"{d}.attn.norm_k"),
            *split_rules(f"{x}.attn2.qkv", (f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v")),
            *linear_rules(f"{x}.attn2.proj", f"{d}.attn2.to_out.0"),
            *_norms(f"{x}.attn2", f"{d}.attn2.norm_q", f"{d}.attn2.norm_k"),
            *linear_rules(f"{x}.mlp.fc1", f"{d}.ff.net.0.proj"), *linear_rules(f"{x}.mlp.fc2", f"{d}.ff.net.2"),
            *split_rules(f"{ctx}.attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")),
            *_norms(f"{ctx}.attn", f"{d}.attn.norm_added_q", f"{d}.attn.norm_added_k")]
    if last:
        return plan + linear_rules(f"{ctx}.adaLN_modulation.1", f"{d}.norm1_context.linear", SWAP)
    return [*plan, *linear_rules(f"{ctx}.adaLN_modulation.1", f"{d}.norm1_context.linear"),
            *linear_rules(f"{ctx}.attn.proj", f"{d}.attn.to_add_out"),
            *linear_rules(f"{ctx}.mlp.fc1", f"{d}.ff_context.net.0.proj"),
            *linear_rules(f"{ctx}.mlp.fc2", f"{d}.ff_context.net.2")]


def _depth(keys: Iterable[str]) -> int:
    regex = re.compile(r"^(?:joint_blocks|transformer_blocks)\.(\d+)\.")
    indices = [int(match[1]) for key in keys if (match := regex.match(key))]
    return max(indices) + 1 if indices else 0


def conversion_plan(sai_keys: Iterable[str], depth: int | None = None) -> list[Conversion]:
    """Every SAI ↔ diffusers correspondence for a transformer of ``depth`` joint blocks (default: as many as the
    keys, SAI or diffusers names, show).

    Rows for modules a variant lacks (qk-norm in SD3 medium, ``attn2`` outside SD3.5 medium's first blocks) are in
    the plan too; the converters skip those whose source tensors are absent. Pass ``depth`` when the keys may not
    reach the last block (a LoRA's): that block's context modulation is the one stored with its halves swapped.
    """
    count = _depth(sai_keys) if depth is None else depth
    plan = _top_level()
    for i in range(count):
        plan += _joint_block(i, last=i == count - 1)
    return plan


def sai_to_diffusers(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Diffusers state dict from a SAI transformer state dict (no prefix), and the SAI keys no rule used."""
    return plan_from_bfl(state, conversion_plan(state))


def diffusers_to_sai(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SAI state dict (no prefix) from a diffusers ``SD3Transformer2DModel`` state dict, and the diffusers keys no
    rule used (left over)."""
    return plan_to_bfl(state, conversion_plan(state))


def diffusers_config(params: SD3Params) -> dict[str, Any]:
    """``SD3Transformer2DModel(**config)`` arguments for a model of these sizes (the published configs' layout)."""
    if params.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' SD3Transformer2DModel has a fixed MLP ratio of 4; this model's is "
                         f"{params.mlp_ratio}")
    return {
        "sample_size": DIFFUSERS_SAMPLE_SIZE // 2 * params.patch_size,
        "patch_size": params.patch_size,
        "in_channels": params.in_channels,
        "num_layers": params.depth,
        "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_in_dim,
        "caption_projection_dim": params.hidden_size,
        "pooled_projection_dim": params.adm_in_channels,
        "out_channels": params.in_channels,
        "pos_embed_max_size": params.pos_embed_max_size,
        "dual_attention_layers": tuple(params.attn2_layers),
        "qk_norm": "rms_norm" if params.qk_norm else None,
    }
