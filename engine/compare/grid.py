"""The comparison's files: one labelled grid PNG per prompt and the JSON index of every cell. PIL only, no torch.

A grid has a title line (the prompt), one column per checkpoint under a head with the checkpoint's name, its
validation loss and "best" for the lowest, and one row per (strength, seed) after a head naming both.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.compare.plan import Checkpoint
from engine.files import atomic_write_bytes, atomic_write_text

__all__ = ["Cell", "GridPrompt", "cell_name", "checkpoint_record", "compose_grid", "grid_name", "grid_rows",
           "plan_cells", "strength_text", "write_grid", "write_index"]

INDEX_FILE = "index.json"
CELLS_FOLDER = "cells"
_FONT_SIZE = 14
_LINE = _FONT_SIZE + 4
_PAD = 6
_TITLE_CHARS = 110
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_BEST_INK = (0, 120, 40)


@dataclass(frozen=True)
class GridPrompt:
    """One prompt of the comparison and the sampler settings every cell of its grid uses."""

    index: int  # 0-based, in the prompt list
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    scale: float
    sampler: str
    guidance: float

    def settings(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "width": self.width,
                "height": self.height, "steps": self.steps, "scale": self.scale, "sampler": self.sampler,
                "guidance": self.guidance}


@dataclass(frozen=True)
class Cell:
    """One image of a grid. Cells of strength 0 show the base model: one file per (prompt, seed), in every column."""

    prompt: GridPrompt
    row: int
    column: int
    checkpoint: Checkpoint
    strength: float
    seed: int
    file: Path

    def record(self) -> dict[str, Any]:
        """The cell as the index and the `progress` events list it."""
        return {"file": str(self.file), "prompt_index": self.prompt.index, "row": self.row, "column": self.column,
                "checkpoint": str(self.checkpoint.path), "checkpoint_label": self.checkpoint.label,
                "strength": self.strength, "seed": self.seed, **self.prompt.settings()}


def strength_text(strength: float) -> str:
    """0.5 -> '0.5', 1.0 -> '1': short, exact enough for a label or a file name."""
    return f"{strength:g}"


def cell_name(prompt_index: int, checkpoint: Checkpoint | None, strength: float, seed: int) -> str:
    """``p01_lora-000002_s0.5_seed5.png``; the base model's cells (checkpoint None) ``p01_base_seed5.png``."""
    if checkpoint is None:
        return f"p{prompt_index + 1:02d}_base_seed{seed}.png"
    return f"p{prompt_index + 1:02d}_{checkpoint.label}_s{strength_text(strength)}_seed{seed}.png"


def grid_name(prompt_index: int) -> str:
    return f"grid_p{prompt_index + 1:02d}.png"


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=_FONT_SIZE)


def column_head(checkpoint: Checkpoint) -> list[str]:
    """The lines above a column: its name, its validation loss where measured, and 'best' for the lowest."""
    lines = [checkpoint.label]
    if checkpoint.validation_loss is not None:
        lines.append(f"val loss {checkpoint.validation_loss:.4g}")
    if checkpoint.best:
        lines.append("best")
    return lines


def row_head(strength: float, seed: int) -> list[str]:
    return ["base model" if strength == 0 else f"strength {strength_text(strength)}", f"seed {seed}"]


@dataclass(frozen=True)
class _Layout:
    """Where things go in a grid: the row heads' width, each column's width, the heads' height."""

    row_head: int
    column: int
    top: int
    row: int

    def cell_origin(self, row: int, column: int, image_width: int) -> tuple[int, int]:
        """The top-left corner of a cell's image, centred in its column."""
        x = self.row_head + column * self.column + (self.column - _PAD - image_width) // 2
        return x, self.top + row * self.row


def _layout(font: Any, prompt: GridPrompt, checkpoints: Sequence[Checkpoint],
            rows: Sequence[tuple[float, int]]) -> _Layout:
    """Columns as wide as the widest of their image and their head's text; row heads as wide as their text."""
    def widest(lines: Sequence[str]) -> int:
        return int(max((font.getlength(line) for line in lines), default=0)) + 2 * _PAD

    heads = [column_head(checkpoint) for checkpoint in checkpoints]
    column = max([prompt.width + _PAD, *(widest(lines) for lines in heads)])
    row_head_width = max([widest(["strength 0.00"]), *(widest(row_head(*row)) for row in rows)])
    head_lines = max([len(lines) for lines in heads] + [1])
    return _Layout(row_head_width, column, _LINE + _PAD + head_lines * _LINE + _PAD, prompt.height + _PAD)


def compose_grid(prompt: GridPrompt, checkpoints: Sequence[Checkpoint], rows: Sequence[tuple[float, int]],
                 cells: Sequence[Cell]) -> Any:
    """The labelled grid of one prompt as a PIL image; a cell without a file stays blank."""
    from PIL import Image, ImageDraw

    font = _font()
    layout = _layout(font, prompt, checkpoints, rows)
    width = max(layout.row_head + len(checkpoints) * layout.column,
                int(font.getlength(prompt.prompt[:_TITLE_CHARS])) + 2 * _PAD)
    grid = Image.new("RGB", (width, layout.top + len(rows) * layout.row), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    title = prompt.prompt if len(prompt.prompt) <= _TITLE_CHARS else prompt.prompt[:_TITLE_CHARS - 1] + "…"
    draw.text((_PAD, _PAD // 2), title, fill=_INK, font=font)
    for column, checkpoint in enumerate(checkpoints):
        x = layout.row_head + column * layout.column + _PAD // 2
        for line, text in enumerate(column_head(checkpoint)):
            draw.text((x, _LINE + _PAD + line * _LINE), text, fill=_BEST_INK if text == "best" else _INK, font=font)
    for row, (strength, seed) in enumerate(rows):
        for line, text in enumerate(row_head(strength, seed)):
            draw.text((_PAD, layout.top + row * layout.row + line * _LINE), text, fill=_INK, font=font)
    for cell in cells:
        if cell.file.is_file():
            with Image.open(cell.file) as image:
                grid.paste(image.convert("RGB"), layout.cell_origin(cell.row, cell.column, image.width))
    return grid


def write_grid(path: Path, prompt: GridPrompt, checkpoints: Sequence[Checkpoint], rows: Sequence[tuple[float, int]],
               cells: Sequence[Cell]) -> Path:
    """Compose and save one prompt's grid atomically."""
    buffer = io.BytesIO()
    compose_grid(prompt, checkpoints, rows, cells).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def checkpoint_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """A column as the index and the `start` event list it."""
    return {"path": str(checkpoint.path), "label": checkpoint.label, "epoch": checkpoint.epoch,
            "step": checkpoint.step, "validation_loss": checkpoint.validation_loss, "best": checkpoint.best}


def write_index(path: Path, *, source: str, checkpoints: Sequence[Checkpoint], strengths: Sequence[float],
                prompts: Sequence[GridPrompt], grids: Sequence[Path], cells: Sequence[Cell]) -> Path:
    """The JSON index: what was compared and every cell's file, checkpoint, strength, seed, prompt and settings."""
    index = {
        "source": source,
        "checkpoints": [checkpoint_record(checkpoint) for checkpoint in checkpoints],
        "strengths": list(strengths),
        "prompts": [{"index": prompt.index, **prompt.settings(), "grid": str(grid)}
                    for prompt, grid in zip(prompts, grids, strict=True)],
        "cells": [cell.record() for cell in cells],
    }
    atomic_write_text(path, json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return path


def plan_cells(prompts: Sequence[GridPrompt], seeds: Sequence[Sequence[int]], checkpoints: Sequence[Checkpoint],
               strengths: Sequence[float], cells_dir: Path) -> list[Cell]:
    """Every cell of every grid, prompt by prompt, row by row, column by column; the rows of prompt ``p`` are each
    strength with each of ``seeds[p]``. Strength 0's cells of one seed share the base model's file."""
    cells = []
    for prompt, prompt_seeds in zip(prompts, seeds, strict=True):
        rows = grid_rows(strengths, prompt_seeds)
        for row, (strength, seed) in enumerate(rows):
            for column, checkpoint in enumerate(checkpoints):
                name = cell_name(prompt.index, None if strength == 0 else checkpoint, strength, seed)
                cells.append(Cell(prompt, row, column, checkpoint, strength, seed, cells_dir / name))
    return cells


def grid_rows(strengths: Sequence[float], seeds: Sequence[int]) -> list[tuple[float, int]]:
    """A grid's rows: (strength, seed) for each strength, each seed."""
    return [(strength, seed) for strength in strengths for seed in seeds]
