"""`python -m engine plan CONFIG`: the run's peak GPU memory and system RAM, broken down, before it starts."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK, add_base_dir_option, add_override_option, load_run_config

EXIT_DOES_NOT_FIT = 3
_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="estimate the run's peak GPU memory and system RAM, and whether it fits the GPU",
        description="Estimate the run's peak GPU memory (PyTorch's peak allocation during training) and the system "
                    "RAM it keeps, part by part: frozen weights by dtype and place, trained weights, optimizer "
                    "state, and one training step traced with fake tensors (no GPU needed). With --fit, list the "
                    "changes, cheapest in speed first, that make it fit. Exit 0 when it fits (or no GPU is known), "
                    "3 when it does not, 2 for a bad config.",
    )
    parser.add_argument("config", help="run config .toml (or a .json preset)")
    add_override_option(parser)
    parser.add_argument("--gpu-memory", metavar="SIZE", type=parse_size,
                        help="plan for a card of this size, e.g. 12GiB or 24GB (default: the detected GPU's)")
    parser.add_argument("--fit", action="store_true", help="propose the changes that make the run fit")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (the form the GUI reads)")
    add_base_dir_option(parser)
    parser.set_defaults(handler=run)
    return parser


def parse_size(text: str) -> int:
    """'12GiB', '24 GB', '8192MiB', '12' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b?|b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 12GiB, 24GB or 8192MiB")
    number, unit = float(match.group(1)), match.group(2) or "gib"
    if unit in ("k", "m", "g"):
        unit += "ib"
    return int(number * _UNITS[unit if unit.endswith("b") else unit + "b"])


def run(args: argparse.Namespace) -> int:
    from engine.plan import GIB, make_plan
    from engine.plan.fit import fit_to_gpu

    loaded = load_run_config(args)
    if loaded is None:
        return EXIT_BAD_INPUT
    config, base_dir = loaded
    if args.fit and args.gpu_memory is None:
        from engine.plan.estimate import detected_gpu_memory

        args.gpu_memory = detected_gpu_memory()
        if args.gpu_memory is None:
            print("plan --fit needs a GPU size: no GPU is detected here; give --gpu-memory, e.g. 12GiB",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.fit:
        result = fit_to_gpu(config, base_dir, args.gpu_memory)
        plan, report = result.plan, result.as_dict()
    else:
        plan = make_plan(config, base_dir, gpu_capacity=args.gpu_memory)
        report, result = plan.as_dict(), None
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_plan(plan, GIB, after_changes=result is not None and bool(result.changes)))
        if result is not None:
            print(format_changes(result.changes, GIB, result.fits))
    return EXIT_DOES_NOT_FIT if plan.fits is False else EXIT_OK


def format_plan(plan: Any, gib: int, *, after_changes: bool = False) -> str:
    shape = plan.shape
    title = "Memory plan after the changes below" if after_changes else "Memory plan"
    lines = [f"{title} ({plan.family}, batch {shape.batch_size} at {shape.width}x{shape.height}; architecture "
             f"from {plan.source})", ""]
    for where, heading in (("gpu", "GPU"), ("host", "system RAM")):
        lines.append(f"{heading}:")
        lines += [f"  {item.bytes / gib:8.2f} GiB  {item.name}" + (f" ({item.detail})" if item.detail else "")
                  for item in plan.items if item.where == where] or ["      none"]
    lines += ["", f"GPU peak (PyTorch's allocation): {plan.gpu_peak / gib:.2f} GiB; with the CUDA context and the "
              f"allocator's slack: {plan.gpu_needed / gib:.2f} GiB"]
    if plan.gpu_capacity is None:
        lines.append("No GPU detected: give --gpu-memory to check the fit.")
    else:
        verdict = "fits" if plan.fits else "does NOT fit (try --fit)"
        lines.append(f"Card: {plan.gpu_capacity / gib:.1f} GiB -> {verdict}")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def format_changes(changes: list[Any], gib: int, fits: bool) -> str:
    if not changes:
        return "\nNo change needed." if fits else "\nNo change this planner knows makes it fit."
    lines = ["", "Changes, in order (each keeps those before it):"]
    lines += [f"  {change.key} = {json.dumps(change.value)}  -> {change.gpu_needed_bytes / gib:.2f} GiB needed: "
              f"{change.reason}" for change in changes]
    lines.append("These fit." if fits else "Even all of these do not fit: a larger GPU, or a smaller resolution.")
    return "\n".join(lines)
