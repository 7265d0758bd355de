"""`python -m engine schema`: the parameter reference, generated from the config model."""

from __future__ import annotations

import argparse
import json

from engine.cli.common import EXIT_OK
from engine.config.reference import parameters_markdown
from engine.config.schema import RunConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "schema", help="print the parameter reference (Markdown) or the JSON Schema",
        description="Print every parameter with its default, allowed values and meaning, from the config model.",
    )
    parser.add_argument("--format", choices=("markdown", "json-schema"), default="markdown",
                        help="markdown (the docs/parameters.md text) or a JSON Schema for editors")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.format == "json-schema":
        print(json.dumps(RunConfig.model_json_schema(), indent=2))
    else:
        print(parameters_markdown(), end="")
    return EXIT_OK
