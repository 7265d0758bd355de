"""What several subcommands share: the --set option and printing config problems."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

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
