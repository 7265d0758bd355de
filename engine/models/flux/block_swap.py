"""The block swapper under the name the FLUX and SD3 code first had it: it lives in :mod:`engine.models.block_swap`
now, one mechanism for every family (FLUX.1 / Chroma, SD3 and the SD1 / SD2 / SDXL UNet)."""

from engine.models.block_swap import (
    SWAP_LAYOUTS,
    BlockSwapper,
    SwapLayout,
    place_denoiser,
    place_transformer,
    swap_layout,
    swap_limits,
    swap_split,
    swapped_block_names,
)

__all__ = ["SWAP_LAYOUTS", "BlockSwapper", "SwapLayout", "place_denoiser", "place_transformer", "swap_layout",
           "swap_limits", "swap_split", "swapped_block_names"]
