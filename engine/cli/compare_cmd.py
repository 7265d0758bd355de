"""`python -m engine compare`: a run's checkpoints side by side, one labelled grid PNG per prompt plus a JSON index."""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, StopRequested, fail_task, stop_on_sigterm
from engine.cli.options import add_arguments, option
from engine.compare.plan import CheckpointError

if TYPE_CHECKING:
    from engine.compare.grid import Cell
    from engine.compare.plan import Checkpoint, RunSource
    from engine.events import EventWriter

TASK = "compare"
COMPARE_FOLDER = "compare"  # in the run directory: one timestamped folder per comparison


class InputProblem(Exception):
    """Input that cannot work: (message, hint), reported before or right after the model loads."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True, kw_only=True)
class CompareOptions:
    """The options of `compare`, declared once: its parser's flags and the command line the GUI's Compare tab
    builds (gui.views.compare.compare_args) both come from these fields."""

    source: str = option(positional=True, metavar="RUN-or-CONFIG",
                         help="a run folder (config.toml, events.jsonl) or a run config file")
    checkpoints: list[str] | None = option(None, nargs="+", metavar="FILE",
                                           help="network files to compare (default: every epoch the run saved and "
                                                "its final model)")
    prompts: str = option("", metavar="FILE", help="a prompt file in sd-scripts' format (.txt, .toml, .json; default: "
                                                   "the run's sample prompts)")
    strengths: str = option("0,0.5,0.8,1", help="the network's strengths, comma-separated; 0 is the base model")
    seeds: str = option("", help="seeds, comma-separated (default: each prompt's --d seed, else one drawn for it)")
    out: str = option("", metavar="DIR", help="a new or empty folder for the grids (default: "
                                              "RUN/compare/YYYYmmdd-HHMMSS)")
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    events: str | None = option(None, metavar="FILE", help="append start/progress/warning/error/done events")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        TASK, help="render a run's checkpoints x prompts x strengths as labelled grids",
        description="Render every checkpoint x prompt x strength x seed with the run's base model (loaded once) and "
                    "sampler, and write one grid PNG per prompt (columns: checkpoints with their validation loss; "
                    "rows: strength and seed) plus index.json listing every cell. Exit 0 when every grid was "
                    "written, 2 for bad input, 1 when rendering failed or was stopped.",
    )
    add_arguments(parser, CompareOptions)
    parser.set_defaults(handler=run)
    return parser


_fail = partial(fail_task, task=TASK)


def run(args: argparse.Namespace) -> int:
    from engine.events import EventWriter

    with EventWriter(args.events) as events:
        previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
        try:
            return _compare(args, events)
        except InputProblem as problem:
            return _fail(events, str(problem), problem.hint, EXIT_BAD_INPUT, cells=0)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _read_source(args: argparse.Namespace) -> tuple[RunSource, Any]:
    from engine.compare.plan import resolve_source
    from engine.config.errors import ConfigError
    from engine.config.io import load_config

    try:
        source = resolve_source(args.source)
        config = load_config(source.config, check_packages=False)
    except FileNotFoundError as error:
        raise InputProblem(str(error)) from None
    except ConfigError as error:
        first = error.problems[0]
        raise InputProblem(f"{source.config}: {first.path}: {first.message}", "fix the config, or compare another "
                                                                              "run") from None
    if config.method != "lora":
        raise InputProblem(f"method = {config.method!r}: compare renders LoRA-family runs (method = \"lora\") only",
                           "compare the checkpoints of a LoRA, LoCon, LyCORIS or DyLoRA run")
    return source, config


def _checkpoints(args: argparse.Namespace, source: RunSource, config: Any) -> list[Checkpoint]:
    from engine.compare.plan import given_checkpoints, list_checkpoints
    from engine.files import resolve_path

    if args.checkpoints:
        try:
            return given_checkpoints(args.checkpoints, source)
        except FileNotFoundError as error:
            raise InputProblem(str(error), "give network files the run saved") from None
    found = list_checkpoints(source, resolve_path(config.saving.output_dir, source.config.parent),
                             config.saving.output_name)
    if not found:
        raise InputProblem(f"{source.folder}: no saved checkpoints found",
                           "train until a save (saving.save_every_n_epochs), or name files with --checkpoints")
    return found


def _out_dir(args: argparse.Namespace, source: RunSource) -> Path:
    out = Path(args.out).expanduser() if args.out else \
        source.folder / COMPARE_FOLDER / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputProblem(f"{out}: exists and is not an empty folder", "choose a new folder for --out; nothing "
                                                                        "in an existing one is overwritten")
    return out


def _numbers(args: argparse.Namespace) -> tuple[list[float], list[int]]:
    from engine.compare.plan import parse_seeds, parse_strengths

    try:
        return parse_strengths(args.strengths), parse_seeds(args.seeds)
    except ValueError as error:
        raise InputProblem(str(error), "e.g. --strengths 0,0.5,1 --seeds 1,2") from None


def _compare(args: argparse.Namespace, events: EventWriter) -> int:
    source, config = _read_source(args)
    checkpoints = _checkpoints(args, source, config)
    strengths, seeds = _numbers(args)
    out = _out_dir(args, source)
    prompt_file = Path(args.prompts).expanduser() if args.prompts else None
    if prompt_file is not None and not prompt_file.is_file():
        raise InputProblem(f"prompt file not found: {prompt_file}", "give a .txt, .toml or .json prompt file")
    written: list[Cell] = []
    try:
        return _render(args, events, source, config, checkpoints, strengths, seeds, out, prompt_file, written)
    except (StopRequested, KeyboardInterrupt):
        print(f"stopped after {len(written)} cell(s)", file=sys.stderr)
        events.emit("done", task=TASK, ok=False, stopped=True, cells=len(written), out=str(out))
        return EXIT_FAILED
    except InputProblem:
        raise
    except CheckpointError as error:
        return _fail(events, str(error), "compare checkpoints this run saved (the same network settings)",
                     EXIT_BAD_INPUT, cells=len(written), out=str(out))
    except Exception as error:  # anything torch or diffusers raise: reported as an event, not a silent exit
        traceback.print_exc()
        return _fail(events, f"rendering failed: {type(error).__name__}: {error}",
                     "the output above has the details", EXIT_FAILED, cells=len(written), out=str(out))


def _render(args: argparse.Namespace, events: EventWriter, source: RunSource, config: Any,
            checkpoints: list[Checkpoint], strengths: list[float], seeds: list[int], out: Path,
            prompt_file: Path | None, written: list[Cell]) -> int:
    from engine.compare.grid import CELLS_FOLDER, checkpoint_record, plan_cells
    from engine.compare.render import grid_prompts, load_renderer, prompt_seeds
    from engine.train.setup import RunInputError

    try:
        renderer = load_renderer(config, source.config.parent, device=args.device)
        prompts = grid_prompts(config, source.config.parent, renderer.parts.family, prompt_file)
    except RunInputError as error:
        raise InputProblem(str(error), error.hint) from None
    except (FileNotFoundError, ValueError) as error:
        raise InputProblem(str(error), "check the prompt file (sd-scripts' format)") from None
    if not prompts:
        raise InputProblem("there are no prompts to render", "give --prompts FILE, or set the run's "
                                                             "sampling.sample_prompts")
    seeds_of = prompt_seeds([seed for _, seed in prompts], seeds)
    cells = plan_cells([prompt for prompt, _ in prompts], seeds_of, checkpoints, strengths, out / CELLS_FOLDER)
    print(f"{len(cells)} cell(s): {len(checkpoints)} checkpoint(s) x {len(prompts)} prompt(s) x "
          f"{len(strengths)} strength(s) on {renderer.device}, into {out}", file=sys.stderr)
    events.emit("start", task=TASK, total=len(cells), out=str(out), strengths=strengths,
                checkpoints=[checkpoint_record(checkpoint) for checkpoint in checkpoints],
                prompts=[{"index": prompt.index, "prompt": prompt.prompt, "seeds": prompt_seeds}
                         for (prompt, _), prompt_seeds in zip(prompts, seeds_of, strict=True)])
    _render_with_progress(renderer, cells, events, written)
    return _finish(events, source, out, checkpoints, strengths, cells)


def _render_with_progress(renderer: Any, cells: list[Cell], events: EventWriter, written: list[Cell]) -> None:
    """Every cell; each written file is a `progress` event naming the cells it fills (the GUI shows them)."""
    from engine.compare.render import render_cells

    started = time.monotonic()

    def rendered(group: list[Cell]) -> None:
        written.extend(group)
        elapsed = time.monotonic() - started
        rate = len(written) / elapsed if elapsed > 0 else 0.0
        eta = (len(cells) - len(written)) / rate if rate > 0 else None
        events.emit("progress", task=TASK, done=len(written), total=len(cells), rate=round(rate, 3),
                    eta_s=None if eta is None else round(eta, 1), cells=[cell.record() for cell in group])

    render_cells(renderer, cells, on_rendered=rendered)


def _finish(events: EventWriter, source: RunSource, out: Path, checkpoints: list[Checkpoint],
            strengths: list[float], cells: list[Cell]) -> int:
    from engine.compare.grid import INDEX_FILE, grid_name, grid_rows, write_grid, write_index

    prompts = list({cell.prompt.index: cell.prompt for cell in cells}.values())
    grids = []
    for prompt in prompts:
        mine = [cell for cell in cells if cell.prompt.index == prompt.index]
        seeds = list(dict.fromkeys(cell.seed for cell in mine))
        grids.append(write_grid(out / grid_name(prompt.index), prompt, checkpoints, grid_rows(strengths, seeds),
                                mine))
    index = write_index(out / INDEX_FILE, source=str(source.run_dir or source.config), checkpoints=checkpoints,
                        strengths=strengths, prompts=prompts, grids=grids, cells=cells)
    print(f"wrote {len(grids)} grid(s) and {index}")
    events.emit("done", task=TASK, ok=True, cells=len(cells), out=str(out), index=str(index),
                grids=[str(grid) for grid in grids])
    return EXIT_OK
