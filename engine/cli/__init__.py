"""The engine's command line: one module per subcommand, each registering itself in COMMANDS.

Exit codes: 0 success, 2 a config or input the user must fix (every problem is printed as `path: message`),
1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from engine import __version__

# name -> the module of engine.cli and its function adding the subcommand's parser (with `handler` set as a default).
# Modules by name, imported when the parser is built: the GUI imports single command modules (their options and
# task names), and the package must not import every command with them.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("validate_cmd", "add_parser"),
    "schema": ("schema_cmd", "add_parser"),
    "import": ("import_cmd", "add_parser"),
    "doctor": ("doctor_cmd", "add_parser"),
    "plan": ("plan_cmd", "add_parser"),
    "cache-latents": ("cache_cmd", "add_parser"),
    "caption": ("caption_cmd", "add_parser"),
    "captions": ("caption_cmd", "add_edit_parser"),
    "metadata": ("metadata_cmd", "add_parser"),
    "train": ("train_cmd", "add_parser"),
    "lora": ("lora_cmd", "add_parser"),
    "class-images": ("class_images_cmd", "add_parser"),
    "compare": ("compare_cmd", "add_parser"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine",
        description="Atelier's engine: check, convert and (as it grows) run Stable Diffusion training configs.",
    )
    parser.add_argument("--version", action="version", version=f"atelier engine {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module, function in COMMANDS.values():
        getattr(import_module(f"engine.cli.{module}"), function)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
