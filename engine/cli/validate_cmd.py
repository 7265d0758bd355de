"""`python -m engine validate CONFIG`: check a config without spending any GPU time."""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK, add_override_option, print_problems
from engine.config.errors import ConfigError
from engine.config.io import load_config
from engine.config.schema import RunConfig, config_warnings


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "validate", help="check a run config (TOML or JSON preset) and print a one-line summary",
        description="Validate a run config: types, bounds, unknown keys, cross-field rules, installed packages and "
                    "the dataset TOML it names. Exit 0 with a summary, or 2 with every error as `path: message`.",
    )
    parser.add_argument("config", help="run config .toml (or a .json preset)")
    add_override_option(parser)
    parser.add_argument("--skip-package-check", action="store_true",
                        help="do not require optional packages (when validating for another machine)")
    parser.set_defaults(handler=run)
    return parser


def summary(config: RunConfig) -> str:
    """One line a user can read at a glance: what is trained, on what, for how long, into where."""
    model = config.model.pretrained_model_name_or_path or "no base model yet"
    family = "" if config.model.model_family == "auto" else f" ({config.model.model_family})"
    network = config.network
    what = config.method if config.method != "lora" else f"{network.network_type} dim {network.network_dim}"
    training = config.training
    length = f"{training.max_train_steps} steps" if training.max_train_steps else f"{training.max_train_epochs} epochs"
    dataset = config.dataset
    images = (dataset.config_file or dataset.train_data_dir or
              (f"{len(dataset.datasets)} inline dataset(s)" if dataset.datasets else "no images yet"))
    output = f"{config.saving.output_dir}/{config.saving.output_name}"
    return (f"ok: {what} on {model}{family}; images: {images}; {length}, {config.optimizer.optimizer_type} "
            f"lr {config.optimizer.learning_rate:g}; saves to {output}")


def missing_for_training(config: RunConfig) -> list[str]:
    """What a valid config still lacks before `train` can start (presets leave these to the user)."""
    missing = []
    if not config.model.pretrained_model_name_or_path:
        missing.append("model.pretrained_model_name_or_path")
    if not config.dataset.has_images_source():
        missing.append("dataset (train_data_dir, datasets or config_file)")
    return missing


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides, check_packages=not args.skip_package_check)
    except ConfigError as error:
        print(f"{error.source or args.config}: {len(error.problems)} problem(s)", file=sys.stderr)
        print_problems(error.problems)
        return EXIT_BAD_INPUT
    print(summary(config))
    print_problems(config_warnings(config), prefix="warning")
    missing = missing_for_training(config)
    if missing:
        print(f"note: before training, set {' and '.join(missing)}", file=sys.stderr)
    return EXIT_OK
