"""What several subcommands share: the --set and --base-dir options, reading the config with them, and printing
config problems."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.config.rule_registry import Problem

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def add_override_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set training.max_train_epochs=5 (repeatable; values are read as "
             "TOML, so quote text only when it could be read as a number or boolean)",
    )


def print_problems(problems: Iterable[Problem], *, prefix: str = "error", stream=None) -> None:
    stream = stream or sys.stderr
    for problem in problems:
        print(f"{prefix}: {problem.path}: {problem.message}", file=stream)


def add_base_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-dir", metavar="DIR",
                        help="the folder the config's relative paths start from (default: the config file's folder; "
                             "the GUI passes its own when it writes the config to a temporary file)")


def load_run_config(args: argparse.Namespace) -> tuple[Any, Path] | None:
    """The config of `args.config` with its --set overrides, and the folder its relative paths start from (--base-dir
    taken as given, not resolved, so reports name files as the caller would); None once its problems are printed."""
    from engine.config.errors import ConfigError
    from engine.config.io import load_config

    given = Path(args.base_dir) if args.base_dir else None
    try:
        config = load_config(args.config, args.overrides, check_packages=False, base_dir=given)
    except ConfigError as error:
        print_problems(error.problems)
        return None
    return config, given or Path(args.config).resolve().parent


class StopRequested(Exception):
    """SIGTERM (the GUI's Stop) reached a tool command: it ends, keeping what it already wrote."""


def stop_on_sigterm(signum: int, frame: Any) -> None:
    """The SIGTERM handler of tool commands that stop cleanly (install it with signal.signal)."""
    raise StopRequested


def fail_task(events: Any, message: str, hint: str, code: int, *, task: str, **done: Any) -> int:
    """A tool command's failure: the message on stderr, an `error` event and a `done` event with ok false and
    `done`'s fields; returns `code` (the exit code)."""
    print(f"error: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)
    events.emit("error", message=message, hint=hint)
    events.emit("done", task=task, ok=False, **done)
    return code
