"""Which blocks of a denoiser swap for ``training.blocks_to_swap`` K: one registry entry per kind of model.

The block swapper (engine.models.block_swap), the memory plan and the doctor ask this module, never a family name.
An entry is looked up by the model's class name or, for the models described by a params dataclass, by the params'
class name (so the FLUX and SD3 entries also answer for their params alone, without a model):

* FLUX.1 / Chroma (``FluxParams``): ``double_blocks`` and ``single_blocks``, split as sd-scripts does (spec §6.2).
* SD3 / SD3.5 (``SD3Params``): ``joint_blocks`` (spec §8.6).
* SD1 / SD2 / SDXL (diffusers' ``UNet2DConditionModel``): every resnet and every transformer block, in the order the
  forward pass runs them (down blocks, middle block, up blocks; in each, a resnet then the transformer blocks of its
  attention). Those are the units diffusers' gradient checkpointing recomputes one at a time, so a checkpoint never
  holds part of a swapped unit, and together they hold nearly all the UNet's weights (98 % of SDXL's, 91 % of
  SD1's; the rest, the in/out convolutions, the time embedding, the attentions' in/out projections and the up/down
  sampling convolutions, stays on the device). As for the other models the last K swap, here the up path's units:
  in bf16 SDXL's K = 28 / 56 / 85 take 1.25 / 3.11 / 4.67 GiB off the device, SD1's K = 18 / 36 0.59 / 1.44 GiB.

Every list keeps at least two blocks on the device (sd-scripts asserts this for FLUX and SD3; the UNet follows suit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SWAP_LAYOUTS", "SwapLayout", "swap_layout", "swap_limits", "swap_split", "swapped_block_names"]


def _indexed(description: Any, attribute: str, count: int) -> list[str]:
    return [f"{attribute}.{index}" for index in range(count)]


@dataclass(frozen=True)
class SwapLayout:
    """How one kind of denoiser swaps blocks.

    ``lists(description)`` gives the block lists as ((attribute, number of blocks, label), ...); ``split(K)`` how many
    blocks of each list swap for ``blocks_to_swap`` K (always the last ones of each list); ``names(description,
    attribute, count)`` the module paths of one list's blocks, in the order the forward pass runs them.
    """

    lists: Callable[[Any], tuple[tuple[str, int, str], ...]]
    split: Callable[[int], tuple[int, ...]]
    names: Callable[[Any, str, int], list[str]] = _indexed


def _flux_split(blocks_to_swap: int) -> tuple[int, ...]:
    double = blocks_to_swap // 2  # sd-scripts' FLUX split: a single block is half a double block's size
    return double, 2 * (blocks_to_swap - double)


def unet_swap_units(unet: Any) -> list[str]:
    """A diffusers UNet's swappable units (resnets and transformer blocks) as module paths, in forward order.

    In every down, middle and up block diffusers runs resnet j, then attention j when there is one (the middle block
    has one resnet more than attentions, so it starts and ends with a resnet).
    """
    stages = [(f"down_blocks.{index}", block) for index, block in enumerate(unet.down_blocks)]
    stages += [("mid_block", unet.mid_block)] if unet.mid_block is not None else []
    stages += [(f"up_blocks.{index}", block) for index, block in enumerate(unet.up_blocks)]
    units = []
    for path, stage in stages:
        attentions = getattr(stage, "attentions", None) or []
        for index in range(len(stage.resnets)):
            units.append(f"{path}.resnets.{index}")
            if index < len(attentions):
                blocks = len(attentions[index].transformer_blocks)
                units += [f"{path}.attentions.{index}.transformer_blocks.{block}" for block in range(blocks)]
    return units


SWAP_LAYOUTS: dict[str, SwapLayout] = {
    "FluxParams": SwapLayout(lambda params: (("double_blocks", params.depth, "double"),
                                             ("single_blocks", params.depth_single_blocks, "single")), _flux_split),
    # One offloader over joint_blocks (spec §8.6): 22 of 24 blocks for SD3 / SD3.5 medium, 36 of 38 for SD3.5 large.
    "SD3Params": SwapLayout(lambda params: (("joint_blocks", params.depth, "joint"),), lambda count: (count,)),
    # SD1/SD2: 38 units (36 swap at most); SDXL: 87 (85 at most).
    "UNet2DConditionModel": SwapLayout(lambda unet: (("units", len(unet_swap_units(unet)), "resnet and transformer"),),
                                       lambda count: (count,), lambda unet, attribute, count: unet_swap_units(unet)),
}


def _resolve(target: Any) -> tuple[SwapLayout, Any]:
    """The registry entry for a model or its params, and what the entry reads (the model or its params)."""
    for description in (target, getattr(target, "params", None)):
        layout = SWAP_LAYOUTS.get(type(description).__name__)
        if layout is not None:
            return layout, description
    raise ValueError(f"training.blocks_to_swap: block swapping is not available for this model "
                     f"({type(target).__name__}); set training.blocks_to_swap to 0")


def swap_layout(target: Any) -> SwapLayout:
    """The registry entry for a model or its params; ValueError naming training.blocks_to_swap for other models."""
    return _resolve(target)[0]


def swap_split(blocks_to_swap: int, target: Any) -> tuple[int, ...]:
    """How many of the last blocks of each list swap for ``blocks_to_swap`` K (``target``: a model or its params).

    FLUX (a FluxParams): (double, single) = (K // 2, 2 * (K - K // 2)) (spec §6.2); SD3 (an SD3Params): (K,) of
    ``joint_blocks`` (spec §8.6); a UNet: (K,) of its units. At most N - 2 blocks of each list swap (17 of FLUX's 19
    double blocks and 36 of its 38 single blocks, so K <= 35; K <= depth - 2 for SD3; units - 2 for a UNet).

    Raises:
        ValueError: K is negative or above :func:`swap_limits` (the message names training.blocks_to_swap).
    """
    if blocks_to_swap < 0:
        raise ValueError(f"training.blocks_to_swap must not be negative, got {blocks_to_swap}")
    layout, description = _resolve(target)
    limit = swap_limits(target)
    if blocks_to_swap > limit:
        lists = " and ".join(f"{count} {label}" for _, count, label in layout.lists(description))
        raise ValueError(
            f"training.blocks_to_swap {blocks_to_swap} is too many for this model ({lists} blocks): at most "
            f"{limit}; lower it"
        )
    return layout.split(blocks_to_swap)


def swap_limits(target: Any) -> int:
    """The largest ``blocks_to_swap`` a model takes: every list keeps at least two blocks on the device.

    35 for FLUX.1 / Chroma (19 double and 38 single blocks); 22 for 24-block SD3 / SD3.5 medium, 36 for SD3.5 large;
    36 for an SD1/SD2 UNet, 85 for SDXL's.
    """
    layout, description = _resolve(target)
    most = [count - 2 for _, count, _ in layout.lists(description)]
    limit = 0
    while all(swapped <= top for swapped, top in zip(layout.split(limit + 1), most, strict=True)):
        limit += 1
    return limit


def swapped_block_names(target: Any, blocks_to_swap: int) -> Sequence[str]:
    """The module paths of the blocks the swapper would swap (for the plan, the doctor and logs)."""
    counts = swap_split(blocks_to_swap, target)
    layout, description = _resolve(target)
    names = []
    for (attribute, total, _), count in zip(layout.lists(description), counts, strict=True):
        names += layout.names(description, attribute, total)[total - count:]
    return names
