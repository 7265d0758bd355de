"""The MMDiT's 2-D sincos position tables and the windows cut out of them (spec §8.1, §8.5).

An SD3 file stores one fixed table ``pos_embed`` [1, P², hidden] for a P x P patch grid; a latent of h x w patches
adds the h x w window at the table's centre (or, with ``flow.pos_emb_random_crop_rate``, at a random place). The
table's channels are [sin | cos of the column (x) coordinate, sin | cos of the row (y) coordinate], as in sd-scripts
and diffusers.

:func:`sincos_pos_embed` builds the table exactly as diffusers' ``PatchEmbed`` does for
:func:`engine.models.sd3.convert.diffusers_config` (coordinates ``i / (P / 64)``), so a freshly built MMDiT and a
freshly built ``SD3Transformer2DModel`` agree. :class:`ScaledPosEmbeds` holds the training-only tables of
``flow.enable_scaled_pos_embed`` (KohakuBlueleaf's, in sd-scripts): one per training resolution, 1.5 times its patch
grid, with coordinates rescaled so that the grid of that resolution always spans the same range (0 to 16).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = [
    "DIFFUSERS_BASE_SIZE",
    "ScaledPosEmbeds",
    "crop_window",
    "scaled_sincos_pos_embed",
    "sincos_pos_embed",
    "window_corner",
]

log = logging.getLogger(__name__)

# diffusers' PatchEmbed base size (sample_size // patch_size) for the published SD3 configs (sample_size 128).
DIFFUSERS_BASE_SIZE = 64
# A scaled table covers 1.5 times the patch grid it was built for, so crops of nearby aspect ratios fit in it.
SCALED_TABLE_RATIO = 1.5
# The coordinate range a scaled table gives the patch grid it was built for (sd-scripts' base_size).
SCALED_BASE_SIZE = 16


def _axis_embed(width: int, positions: Tensor) -> Tensor:
    """[sin | cos](position * 10000^(-2i/width)) for 1-D float positions: [N, width] in float64."""
    omega = torch.arange(width // 2, dtype=torch.float64)
    omega = 1.0 / 10000 ** (omega / (width / 2.0))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def _table(hidden: int, rows: Tensor, cols: Tensor) -> Tensor:
    """[1, R*C, hidden] float32 for row and column coordinates (row-major tokens, x coordinate first)."""
    if hidden % 4:
        raise ValueError(f"a 2-D sincos table needs a width divisible by 4, got {hidden}")
    count_r, count_c = rows.numel(), cols.numel()
    x = cols[None, :].expand(count_r, count_c).reshape(-1)
    y = rows[:, None].expand(count_r, count_c).reshape(-1)
    return torch.cat((_axis_embed(hidden // 2, x), _axis_embed(hidden // 2, y)), dim=1).float()[None]


def sincos_pos_embed(hidden: int, grid: int, *, base_size: int = DIFFUSERS_BASE_SIZE) -> Tensor:
    """The stored table of a fresh model: [1, grid², hidden], coordinates ``i / (grid / base_size)``.

    Equal to diffusers' ``get_2d_sincos_pos_embed(hidden, grid, base_size=base_size)``: the coordinates are
    computed in float32 and the angles in float64 as there.
    """
    coords = torch.arange(grid, dtype=torch.float32) / (grid / base_size)
    return _table(hidden, coords, coords)


def scaled_sincos_pos_embed(hidden: int, grid: int, sample_size: int, base_size: int = SCALED_BASE_SIZE) -> Tensor:
    """A [1, grid², hidden] table whose central ``sample_size`` positions span 0..base_size (spec §8.5).

    sd-scripts' ``get_scaled_2d_sincos_pos_embed``: coordinate ``(i - (grid - sample_size) / 2) * base / sample``,
    so the window a ``sample_size`` latent cuts from the centre looks the same at every training resolution.
    """
    scale = base_size * grid / sample_size
    shift = scale * (grid - sample_size) / (2 * grid)
    coords = torch.arange(grid, dtype=torch.float32) / grid * scale - shift
    return _table(hidden, coords, coords)


def window_corner(grid: int, height: int, width: int, random: bool,
                  generator: torch.Generator | None = None) -> tuple[int, int]:
    """Top-left corner of an ``height`` x ``width`` window in a ``grid`` x ``grid`` table: centred, or uniformly
    random (from ``generator``, else torch's global RNG as sd-scripts)."""
    if height > grid or width > grid:
        raise ValueError(f"a latent of {height}x{width} patches is larger than the {grid}x{grid} position table: "
                         "train at a lower resolution (bucket sizes) for this model")
    if not random:
        return (grid - height) // 2, (grid - width) // 2
    top = int(torch.randint(0, grid - height + 1, (1,), generator=generator).item())
    left = int(torch.randint(0, grid - width + 1, (1,), generator=generator).item())
    return top, left


def crop_window(table: Tensor, grid: int, corner: tuple[int, int], height: int, width: int) -> Tensor:
    """The [1, height*width, C] window of a [1, grid², C] table at ``corner`` (row-major tokens)."""
    top, left = corner
    spatial = table.reshape(1, grid, grid, table.shape[-1])[:, top : top + height, left : left + width]
    return spatial.reshape(1, height * width, table.shape[-1])


class ScaledPosEmbeds:
    """The per-resolution tables of ``flow.enable_scaled_pos_embed`` and the choice among them by token count.

    ``latent_sizes`` are the training resolutions' latent sizes (``round(sqrt(w * h)) / 8``). A latent of h x w
    patches uses the table of the first patch size whose area bound (half-way to the next size's area; 1.5² times
    the area for the largest) it stays within. Tables are built on first use and kept per device and dtype.
    """

    def __init__(self, hidden: int, patch_size: int, latent_sizes: Iterable[int]) -> None:
        sizes = sorted({int(size) // patch_size for size in latent_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError("flow.enable_scaled_pos_embed needs the training resolutions' latent sizes "
                             f"(at least one, each >= {patch_size}); got {sorted(set(latent_sizes))}")
        self.hidden = hidden
        bounds = [(a * a + b * b) // 2 for a, b in zip(sizes, sizes[1:], strict=False)]
        bounds.append(int((sizes[-1] * SCALED_TABLE_RATIO) ** 2))
        self.area_bounds: list[tuple[int, int]] = list(zip(bounds, sizes, strict=True))
        self._cache: dict[tuple[int, int, str, torch.dtype], Tensor] = {}

    def patched_size_for(self, height: int, width: int) -> int:
        for bound, size in self.area_bounds:
            if height * width <= bound:
                return size
        raise ValueError(
            f"a latent of {height}x{width} patches is larger than every resolution flow.enable_scaled_pos_embed "
            f"was set up for (largest {self.area_bounds[-1][1]} patches a side): list the resolution in the dataset"
        )

    def table(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, int]:
        """The table for an h x w patch latent on ``device`` in ``dtype``, and its grid size."""
        size = self.patched_size_for(height, width)
        grid = int(size * SCALED_TABLE_RATIO)
        if height > grid or width > grid:
            # A very tall or wide latent: a larger table of the same coordinates (sd-scripts does the same, but
            # replaces the normal one; keeping both makes the result independent of the order of the batches).
            log.warning("scaled pos embed: %dx%d patches exceed the %dx%d table; using a %d table",
                        height, width, grid, grid, max(height, width))
            grid = max(height, width)
        key = (size, grid, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = scaled_sincos_pos_embed(self.hidden, grid, size).to(device=device, dtype=dtype)
        return self._cache[key], grid
