"""`python -m engine train CONFIG`: train as the config says, reporting through the run directory's events.

Also the entry point for several processes: `accelerate launch [--multi_gpu --num_processes N] -m engine train
CONFIG` (engine.rundir.launch builds that command from the config's launch section).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import EXIT_BAD_INPUT, add_override_option, print_problems
from engine.config.errors import ConfigError
from engine.config.io import load_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a LoRA (and, as they land, other methods) from a run config",
        description="Validate the config, scan the dataset, load the model, then train. The run directory "
                    "(--run-dir, else saving.output_dir) receives config.toml, events.jsonl and train.log. Stop "
                    "gracefully with Ctrl+C, SIGTERM or `echo stop >> RUN_DIR/control` (also: save, sample); a "
                    "stopped run saves a state that saving.resume continues. Exit 0 finished or stopped, 2 input "
                    "to fix, 1 failed.",
    )
    parser.add_argument("config", help="run config .toml (or a .json preset)")
    add_override_option(parser)
    parser.add_argument("--run-dir", type=Path, help="folder for the run's config copy, events and log")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"{error.source or args.config}: {len(error.problems)} problem(s)", file=sys.stderr)
        print_problems(error.problems)
        return EXIT_BAD_INPUT
    from engine.train.run import run_training

    return run_training(config, Path(args.config).resolve().parent, run_dir=args.run_dir)
