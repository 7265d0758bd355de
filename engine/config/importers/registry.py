"""The importers by format name, format detection, and reading a foreign file into an ImportResult."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config.errors import ConfigError
from engine.config.importers import Detector, Importer, ImportResult
from engine.config.importers.kohya_gui import import_kohya_gui, is_kohya_gui
from engine.config.importers.sd_scripts_args import import_sd_scripts_args, is_sd_scripts_args
from engine.config.importers.sd_scripts_dataset import import_sd_scripts_dataset, is_sd_scripts_dataset
from engine.config.io import read_document
from engine.config.rule_registry import Problem

# Tried in this order: a dataset config is checked before the looser test for training arguments.
IMPORTERS: dict[str, tuple[Detector, Importer]] = {
    "kohya_gui": (is_kohya_gui, import_kohya_gui),
    "sd_scripts_dataset": (is_sd_scripts_dataset, import_sd_scripts_dataset),
    "sd_scripts_args": (is_sd_scripts_args, import_sd_scripts_args),
}

_WHAT_WE_READ = ("expected a kohya_ss GUI config (.json), an sd-scripts dataset config ([general] / [[datasets]]) "
                 "or an sd-scripts training-arguments file (--config_file .toml)")


def detect_format(path: str | Path, data: Mapping[str, Any]) -> str | None:
    """The name of the first importer whose detector accepts the file, or None."""
    path = Path(path)
    return next((name for name, (detect, _) in IMPORTERS.items() if detect(path, data)), None)


def import_file(path: str | Path, format: str | None = None) -> ImportResult:
    """Read a .json/.toml file from another tool and import it, detecting its format unless one is named.

    Raises:
        ConfigError: naming the file, when it cannot be read, is not a recognised format, or is invalid.
    """
    path = Path(path)
    data = read_document(path)
    name = format or detect_format(path, data)
    if name is None:
        raise ConfigError([Problem(str(path), f"not a config Atelier can import: {_WHAT_WE_READ}")])
    if name not in IMPORTERS:
        raise ConfigError([Problem(str(path), f"unknown import format {name!r}; use one of {', '.join(IMPORTERS)}")])
    try:
        return IMPORTERS[name][1](data)
    except ConfigError as error:
        raise ConfigError(error.problems, str(path)) from None
