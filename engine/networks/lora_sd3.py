"""The network_args of a kohya LoRA on an SD3 / SD3.5 MMDiT (sd-scripts ``networks/lora_sd3.py``, spec §8.6).

Pure data and rules, no torch: parsing each argument (as kohya's ``key=value`` text or as TOML values), and the
rank every module gets. The rules follow sd-scripts:

* Targets: every Linear of every ``DismantledBlock`` (sd-scripts' ``SingleDiTBlock``: the ``context_block`` and
  ``x_block`` of each joint block): ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1`` and,
  on SD3.5 medium, ``attn2.qkv`` / ``attn2.proj``. Names are ``lora_unet_`` + the SAI module path with ``.`` -> ``_``
  (``lora_unet_joint_blocks_0_x_block_attn_qkv``), which is ComfyUI's rule for ``diffusion_model.<path>`` (§5.5).
* ``context_attn_dim`` ... ``x_mod_dim``: the rank of modules whose name contains ``context_block`` / ``x_block`` and
  ``attn`` / ``mlp`` / ``adaLN_modulation`` (``attn`` also matches ``attn2``, as in sd-scripts); 0 = no module.
* ``emb_dims``: exactly 6 ranks for ``context_embedder``, ``t_embedder``, ``x_embedder`` (the patch Conv2d: its
  ``lora_down`` is a 2x2 stride-2 conv, ``lora_up`` 1x1), ``y_embedder``, ``final_layer.adaLN_modulation`` and
  ``final_layer.linear``; without it none of them is trained. sd-scripts gives ``x_embedder`` ``conv_dim`` instead
  when both are set; here ``emb_dims`` always decides, so the argument means what it says.
* ``train_block_indices``: FLUX's syntax (``all``, ``none``, ``0,1,4-7``); unselected joint blocks get rank 0. An
  index the model does not have is refused (sd-scripts checks against a dummy 999 and trains nothing there).
* ``split_qkv``: every joint-block ``qkv`` (``attn`` and ``attn2``) gets one down/up pair per q, k and v; files
  hold the merged pair with ``3 * alpha`` (Atelier's convention, :class:`engine.networks.lora_modules.SplitLoRAModule`).
* ``train_t5xxl``: LoRA on T5 (``lora_te3_``) too.
* Refused (sd-scripts' ``lora_sd3`` has none of them): ``network_reg_dims``, ``network_reg_lrs``, ``ggpo_sigma``,
  ``ggpo_beta``.

Alpha is always ``network_alpha``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.networks.arg_values import arg_flag
from engine.networks.lora_flux import _indices, _rank, layer_ranks, parsed_args

__all__ = ["EMB_DIM_LAYERS", "MMDIT_BLOCK_CLASSES", "SD3_NETWORK_ARGS", "SD3_REFUSED_ARGS", "SD3_TYPE_DIMS",
           "SD3LoRAArgs", "embedding_layer", "joint_block_of", "parse_sd3_args", "sd3_split_parts"]

# The MMDiT's block class whose Linear children LoRA wraps (SAI's name; sd-scripts calls it SingleDiTBlock).
MMDIT_BLOCK_CLASSES = frozenset({"DismantledBlock"})
# (argument, substrings that must all be in the module name); checked in this order, as sd-scripts does.
SD3_TYPE_DIMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("context_attn_dim", ("context_block", "attn")),
    ("context_mlp_dim", ("context_block", "mlp")),
    ("context_mod_dim", ("context_block", "adaLN_modulation")),
    ("x_attn_dim", ("x_block", "attn")),
    ("x_mlp_dim", ("x_block", "mlp")),
    ("x_mod_dim", ("x_block", "adaLN_modulation")),
)
# The layers emb_dims gives ranks to, in its order (module paths of the MMDiT; each may hold several Linears).
EMB_DIM_LAYERS = ("context_embedder", "t_embedder", "x_embedder", "y_embedder", "final_layer.adaLN_modulation",
                  "final_layer.linear")
_BLOCK = re.compile(r"^lora_unet_joint_blocks_(\d+)_")
_QKV = re.compile(r"joint_blocks\.\d+\.(context|x)_block\.attn2?\.qkv")
_PREFIX = "network.network_args."
_TYPE_NAMES = ", ".join(arg for arg, _ in SD3_TYPE_DIMS)
# network_args sd-scripts' networks.lora_sd3 does not have, with what to use instead.
SD3_REFUSED_ARGS = {
    "network_reg_dims": f"sd-scripts' SD3 LoRA (networks.lora_sd3) has no per-regex ranks; use {_TYPE_NAMES}, "
                        "emb_dims and train_block_indices",
    "network_reg_lrs": "sd-scripts' SD3 LoRA (networks.lora_sd3) has no per-regex learning rates; use "
                       "optimizer.unet_lr and optimizer.text_encoder_lr",
    "ggpo_sigma": "LoRA-GGPO is not part of sd-scripts' SD3 LoRA (networks.lora_sd3); remove it",
    "ggpo_beta": "LoRA-GGPO is not part of sd-scripts' SD3 LoRA (networks.lora_sd3); remove it",
}


@dataclass(frozen=True)
class SD3LoRAArgs:
    """The SD3-specific network_args after parsing; the defaults are sd-scripts' (no argument given).

    Attributes:
        type_dims: rank per :data:`SD3_TYPE_DIMS` argument that was given (0 = no module).
        emb_dims: ranks of :data:`EMB_DIM_LAYERS` (0 = none); None = no embedder or final layer is trained.
        blocks: the joint-block indices to train; None = all.
        split_qkv: separate LoRA pairs for q, k and v of every joint-block qkv, saved merged.
        train_t5xxl: LoRA on the T5 encoder (``lora_te3_``).
        verbose: print every module's rank and alpha, and the skipped modules, when the network is built.
    """

    type_dims: Mapping[str, int] | None = None
    emb_dims: tuple[int, ...] | None = None
    blocks: frozenset[int] | None = None
    split_qkv: bool = False
    train_t5xxl: bool = False
    verbose: bool = False
    reg_lrs: tuple[tuple[str, float], ...] = ()  # none on SD3 (refused); the network's rate groups read it

    def rank(self, name: str, default: int) -> int:
        """The rank of the module ``name`` (a kohya name) when ``network_dim`` is ``default``; 0 = no module."""
        layer = embedding_layer(name)
        if layer is not None:
            return self.emb_dims[EMB_DIM_LAYERS.index(layer)] if self.emb_dims else 0
        rank = default
        for arg, parts in SD3_TYPE_DIMS:
            if self.type_dims and arg in self.type_dims and all(part in name for part in parts):
                rank = self.type_dims[arg]
                break
        block = joint_block_of(name)
        if rank and block is not None and self.blocks is not None and block not in self.blocks:
            return 0
        return rank

    def reg_lr_index(self, name: str) -> int | None:
        return None

    @property
    def trains_embedders(self) -> bool:
        return self.emb_dims is not None and any(self.emb_dims)

    def check_block_count(self, count: int) -> None:
        """Refuse block indices the model does not have (it has ``count`` joint blocks)."""
        wrong = sorted(index for index in self.blocks or () if index >= count)
        if wrong:
            raise ValueError(f"{_PREFIX}train_block_indices: this model has {count} joint blocks (0-{count - 1}), so "
                             f"{', '.join(map(str, wrong))} do not exist; use indices from 0 to {count - 1}")


def joint_block_of(name: str) -> int | None:
    """The joint-block index of a module inside a joint block, from its kohya name; else None."""
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def embedding_layer(name: str) -> str | None:
    """The :data:`EMB_DIM_LAYERS` entry a module belongs to (``lora_unet_t_embedder_mlp_0`` -> "t_embedder")."""
    for layer in EMB_DIM_LAYERS:
        stem = "lora_unet_" + layer.replace(".", "_")
        if name == stem or name.startswith(stem + "_"):
            return layer
    return None


def sd3_split_parts(path: str, out_features: int, in_features: int) -> Sequence[int] | None:
    """The output widths split_qkv gives a joint-block ``qkv`` (SAI module path): q, k and v, a third each."""
    if _QKV.fullmatch(path) and out_features % 3 == 0:
        return (out_features // 3,) * 3
    return None


# --- parsing -------------------------------------------------------------------------------------------------------

def _emb_dims(path: str, value: Any) -> tuple[int, ...]:
    layers = [layer.replace(".", "_") for layer in EMB_DIM_LAYERS]  # as sd-scripts' docs name them
    return layer_ranks(path, value, layers, "[4,4,4,4,4,4]")


# network_args key -> (SD3LoRAArgs field, parser). The type dims are collected into SD3LoRAArgs.type_dims.
SD3_NETWORK_ARGS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    **{arg: ("type_dims", _rank) for arg, _ in SD3_TYPE_DIMS},
    "emb_dims": ("emb_dims", _emb_dims),
    "train_block_indices": ("blocks", _indices),
    "split_qkv": ("split_qkv", arg_flag),
    "train_t5xxl": ("train_t5xxl", arg_flag),
    "verbose": ("verbose", arg_flag),
}


def parse_sd3_args(network_args: Mapping[str, Any]) -> SD3LoRAArgs:
    """A :class:`SD3LoRAArgs` from the SD3 keys of network_args (the caller has checked they are SD3 keys).

    Raises:
        ValueError: a bad value; the message names ``network.network_args.<key>``.
    """
    return SD3LoRAArgs(**parsed_args(network_args, SD3_NETWORK_ARGS))
