"""The Compare tab's logic, without gradio: a run's checkpoints and prompts, the command line of
`python -m engine compare`, and the grid as its events fill it in.

The grid is read from the command's events only: `start` lays it out (checkpoints with their validation losses,
strengths, each prompt's seeds), each `progress` names the cells a new file fills, `done` names the grid PNGs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cli.compare_cmd import COMPARE_FOLDER, CompareOptions
from engine.cli.compare_cmd import TASK as COMPARE_TASK
from engine.cli.options import to_argv
from engine.compare.plan import Checkpoint, list_checkpoints, resolve_source
from engine.config.errors import ConfigError
from engine.config.io import load_config
from engine.files import atomic_write_text, resolve_path

PROMPTS_FILE = "prompts.txt"  # the tab's own prompts, written next to the comparison they are for
PENDING = "…"


@dataclass(frozen=True)
class RunPick:
    """What the tab offers for one run: its checkpoints (every one ticked by default) and its sample prompts."""

    run_dir: Path
    checkpoints: list[Checkpoint]
    prompts: list[str]  # the run's sample prompt lines; empty when it uses a prompt file
    prompt_file: str  # the run's sampling.sample_prompts_file, or ""
    problem: str = ""  # why the run cannot be compared, in words


def checkpoint_choice(checkpoint: Checkpoint) -> str:
    """'lora-000002 (epoch 2, val loss 0.251, best)': what the checkbox says."""
    facts = [f"epoch {checkpoint.epoch}" if checkpoint.epoch else "", f"step {checkpoint.step}" if
             checkpoint.step and not checkpoint.epoch else "",
             f"val loss {checkpoint.validation_loss:.4g}" if checkpoint.validation_loss is not None else "",
             "best" if checkpoint.best else ""]
    shown = ", ".join(fact for fact in facts if fact)
    return f"{checkpoint.label} ({shown})" if shown else checkpoint.label


def read_run(run_dir: str | Path) -> RunPick:
    """A run's checkpoints and prompts; `problem` says why there is nothing to compare."""
    run_dir = Path(run_dir)
    try:
        source = resolve_source(run_dir)
        config = load_config(source.config, check_packages=False)
    except (FileNotFoundError, ConfigError) as error:
        return RunPick(run_dir, [], [], "", problem=f"This run's config cannot be read: {error}")
    if config.method != "lora":
        return RunPick(run_dir, [], [], "", problem=f"This run trains with method '{config.method}'; the grid "
                                                    "compares LoRA-family runs.")
    checkpoints = list_checkpoints(source, resolve_path(config.saving.output_dir, source.config.parent),
                                   config.saving.output_name)
    problem = "" if checkpoints else "This run has saved no checkpoint yet."
    return RunPick(run_dir, checkpoints, list(config.sampling.sample_prompts),
                   config.sampling.sample_prompts_file or "", problem)


@dataclass(frozen=True)
class CompareRequest:
    """The tab's form: the run, the ticked checkpoints (paths), the prompts text, strengths and seeds."""

    run_dir: str
    checkpoints: Sequence[str]
    prompts: str
    strengths: str
    seeds: str


def out_folder(run_dir: str | Path, now: float | None = None) -> Path:
    """A new folder for one comparison: `<run>/compare/YYYYmmdd-HHMMSS` (a later second if that one exists)."""
    parent = Path(run_dir) / COMPARE_FOLDER
    stamp = now if now is not None else time.time()
    while (folder := parent / time.strftime("%Y%m%d-%H%M%S", time.localtime(stamp))).exists():
        stamp += 1
    return folder


def compare_args(request: CompareRequest, pick: RunPick, out: Path) -> list[str]:
    """`python -m engine` arguments (without --events, which EngineJob adds), written from the engine's declaration
    of the command's options (CompareOptions). Prompts that differ from the run's own are written to
    `<out>/prompts.txt` first (`out` is created).

    Raises:
        ValueError: nothing to compare, or a checkpoint that is not one of the run's; the message says which.
    """
    if pick.problem:
        raise ValueError(pick.problem)
    offered = {str(checkpoint.path) for checkpoint in pick.checkpoints}
    chosen = [path for path in request.checkpoints if path]
    if not chosen:
        raise ValueError("Tick at least one checkpoint.")
    foreign = [path for path in chosen if path not in offered]
    if foreign:
        raise ValueError(f"{foreign[0]} is not a checkpoint of this run.")
    lines = [line.strip() for line in request.prompts.splitlines() if line.strip()]
    prompts_file = None
    if lines and lines != pick.prompts:
        prompts_file = out.with_name(out.name + "-" + PROMPTS_FILE)
        atomic_write_text(prompts_file, "\n".join(lines) + "\n")
    values = {"source": str(pick.run_dir), "checkpoints": chosen, "strengths": request.strengths.strip() or None,
              "seeds": request.seeds.strip() or None, "prompts": str(prompts_file) if prompts_file else None,
              "out": str(out)}
    return [COMPARE_TASK, *to_argv(CompareOptions, values, joined=True)]


# --- the grid as it fills in ------------------------------------------------------------------------------------


def grid_state(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the events say so far, as plain data a gr.State keeps: the layout, the cells made, the grids."""
    start = next((event for event in events if event.get("type") == "start"), None)
    done = next((event for event in events if event.get("type") == "done"), None)
    cells = {}
    for event in events:
        for cell in event.get("cells", ()) if event.get("type") == "progress" else ():
            cells[f"{cell['prompt_index']}/{cell['row']}/{cell['column']}"] = dict(cell)
    return {"checkpoints": start.get("checkpoints", []) if start else [],
            "strengths": start.get("strengths", []) if start else [],
            "prompts": start.get("prompts", []) if start else [], "cells": cells,
            "grids": (done or {}).get("grids", []), "out": (start or {}).get("out", "")}


def prompt_choices(state: Mapping[str, Any]) -> list[tuple[str, int]]:
    return [(f"{prompt['index'] + 1}. {prompt['prompt']}", prompt["index"]) for prompt in state.get("prompts", [])]


def rows_of(state: Mapping[str, Any], prompt_index: int) -> list[tuple[float, int]]:
    prompt = next((prompt for prompt in state.get("prompts", []) if prompt["index"] == prompt_index), None)
    return [] if prompt is None else [(strength, seed) for strength in state["strengths"] for seed in prompt["seeds"]]


def grid_cells(state: Mapping[str, Any], prompt_index: int) -> list[dict[str, Any] | None]:
    """One prompt's cells in grid order (row by row, a column each), None where a cell is not made yet."""
    columns = len(state.get("checkpoints", []))
    return [state["cells"].get(f"{prompt_index}/{row}/{column}")
            for row in range(len(rows_of(state, prompt_index))) for column in range(columns)]


def strength_label(strength: float) -> str:
    return "base model" if strength == 0 else f"strength {strength:g}"


def cell_caption(cell: Mapping[str, Any]) -> str:
    return f"{cell['checkpoint_label']} · {strength_label(cell['strength'])} · seed {cell['seed']}"


def column_heads(state: Mapping[str, Any]) -> str:
    """The columns, left to right, with their validation losses and the best one; then the rows."""
    heads = []
    for number, checkpoint in enumerate(state.get("checkpoints", []), start=1):
        loss = checkpoint.get("validation_loss")
        facts = ([f"val loss {loss:.4g}"] if loss is not None else []) + (["**best**"] if checkpoint.get("best")
                                                                          else [])
        heads.append(f"{number}. `{checkpoint['label']}`" + (f" ({', '.join(facts)})" if facts else ""))
    return "**Columns:** " + " · ".join(heads) if heads else ""


def row_heads(state: Mapping[str, Any], prompt_index: int) -> str:
    rows = rows_of(state, prompt_index)
    return "**Rows:** " + " · ".join(f"{number}. {strength_label(strength)}, seed {seed}"
                                     for number, (strength, seed) in enumerate(rows, start=1)) if rows else ""


def cell_settings(cell: Mapping[str, Any]) -> str:
    """A cell's settings, for the full-size view."""
    lines = [f"**{cell_caption(cell)}**", f"- checkpoint: `{cell['checkpoint']}`",
             f"- prompt: {cell['prompt']}",
             *([f"- negative prompt: {cell['negative_prompt']}"] if cell.get("negative_prompt") else []),
             f"- {cell['width']}×{cell['height']}, {cell['steps']} steps, CFG {cell['scale']:g}, "
             f"sampler {cell['sampler']}", f"- file: `{cell['file']}`"]
    return "\n".join(lines)


def progress_text(done: int, total: int, rate: float | None, eta: float | None) -> str:
    extras = ([f"{rate:.2f} cells/s"] if rate else []) + ([f"about {eta:.0f} s left"] if eta is not None else [])
    return f"{done}/{total} cells" + (f" ({', '.join(extras)})" if extras else "")
