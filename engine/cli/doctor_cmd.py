"""`python -m engine doctor CONFIG`: check the dataset before any GPU time is spent."""

from __future__ import annotations

import argparse
import json
import sys

from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK, add_base_dir_option, add_override_option, load_run_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor", help="check the dataset (folders, images, captions, buckets, steps per epoch) and FLUX's and SD3's "
                       "model files",
        description="Scan the config's datasets and report every problem with the file it concerns and what to "
                    "do, plus images, repeats, buckets and steps; for FLUX.1/Chroma, that the model, CLIP-L, T5-XXL "
                    "and AE files exist and fit together; for SD3/SD3.5, the variant and that each text encoder and "
                    "the VAE is inside the model file or given, and fits (headers only). Exit 0 when there is no "
                    "error, 2 otherwise.",
    )
    parser.add_argument("config", help="run config .toml (or a .json preset)")
    add_override_option(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON (the form the GUI reads)")
    add_base_dir_option(parser)
    parser.add_argument("--quick", action="store_true",
                        help="skip the checks that read every file in full (corrupt images, duplicates)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from engine.data.doctor import format_report, run_doctor  # image libraries load only for this command

    loaded = load_run_config(args)
    if loaded is None:
        return EXIT_BAD_INPUT
    config, base_dir = loaded
    report = run_doctor(config, base_dir, quick=args.quick)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(format_report(report))
    return EXIT_OK if report.ok else EXIT_BAD_INPUT
