"""`python -m engine import FILE`: turn a kohya_ss GUI JSON or an sd-scripts TOML into an Atelier run config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK, add_override_option, print_problems
from engine.config.errors import ConfigError
from engine.config.importers import ImportResult
from engine.config.io import (
    apply_overrides,
    config_to_toml,
    deep_merge,
    default_config_dict,
    save_config,
    validate_config,
)

FORMATS = ("auto", "kohya_gui", "sd_scripts_args", "sd_scripts_dataset")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import", help="convert a kohya_ss GUI JSON, sd-scripts args TOML or sd-scripts dataset TOML",
        description="Import another tool's config. Every key that could not be carried over is listed; nothing is "
                    "dropped silently. Exit 0 when the result validates, 2 otherwise.",
    )
    parser.add_argument("file", help="the file to import (.json or .toml)")
    parser.add_argument("-o", "--output", help="write the run config TOML here (default: print it)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="the source format (default: detect)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    add_override_option(parser)
    parser.set_defaults(handler=run)
    return parser


def report_lines(result: ImportResult) -> list[str]:
    """What the user must know about the import: decisions taken and everything not carried over."""
    lines = [f"format: {result.format}"]
    lines += [f"note: {note}" for note in result.notes]
    lines += [f"not imported: {skipped}" for skipped in result.skipped]
    if result.unset:
        lines.append(f"empty or off, nothing to import ({len(result.unset)}): {', '.join(sorted(result.unset))}")
    return lines


def run(args: argparse.Namespace) -> int:
    from engine.config.importers.registry import import_file  # the importers are only needed here

    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not args.force:
        print(f"error: {output} already exists; choose another name or pass --force to replace it", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = import_file(args.file, None if args.format == "auto" else args.format)
        data = apply_overrides(deep_merge(default_config_dict(), result.overlay), args.overrides)
    except ConfigError as error:
        print_problems(error.problems)
        return EXIT_BAD_INPUT
    for line in report_lines(result):
        print(line, file=sys.stderr)
    header = "\n".join([f"Imported from {Path(args.file).name} by `python -m engine import`.",
                        *report_lines(result)])
    base_dir = output.parent if output is not None else Path(args.file).parent
    try:
        config = validate_config(data, source=args.file, base_dir=base_dir, check_packages=False)
    except ConfigError as error:
        print(f"the imported config needs changes before it can be used ({len(error.problems)} problem(s)):",
              file=sys.stderr)
        print_problems(error.problems)
        if output is not None:
            _write_unvalidated(data, output, header, error)
        return EXIT_BAD_INPUT
    if output is None:
        print(config_to_toml(config), end="")
    else:
        save_config(config, output, header=header)
        print(f"wrote {output}", file=sys.stderr)
    return EXIT_OK


def _write_unvalidated(data: dict, output: Path, header: str, error: ConfigError) -> None:
    """Keep the user's imported values even when they do not validate, with the problems written on top."""
    import tomli_w

    from engine.files import atomic_write_text

    problems = "\n".join(f"PROBLEM {problem}" for problem in error.problems)
    comment = "".join(f"# {line}\n" for line in f"{header}\n{problems}".splitlines())
    atomic_write_text(output, comment + tomli_w.dumps(data))
    print(f"wrote {output} with the problems listed at the top; fix them, then run `python -m engine validate`",
          file=sys.stderr)
