"""Importer for sd-scripts' dataset config (`--dataset_config`, .toml or .json: [general] and [[datasets]]).

Atelier's dataset section uses sd-scripts' schema (engine/config/dataset.py), so the file is validated as it is and
placed inline: [general] becomes [dataset.general] and [[datasets]] becomes [[dataset.datasets]]. Our
[dataset.general] also plays the part of sd-scripts' command line, so keys the file's [general] leaves unset get
sd-scripts' command-line defaults where Atelier's differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.config.dataset import DatasetFile
from engine.config.errors import ConfigError, problems_from_validation_error
from engine.config.importers import ImportResult
from engine.config.importers.sd_scripts_keys import DATASET_PINS
from engine.config.importers.source import Source, apply_pins, note_relative_paths
from engine.config.paths import set_path

FORMAT = "sd_scripts_dataset"


def is_sd_scripts_dataset(path: Path, data: Mapping[str, Any]) -> bool:
    """A table with a [[datasets]] list, or with nothing but [general]."""
    if isinstance(data.get("datasets"), list):
        return True
    return set(data) == {"general"} and isinstance(data["general"], Mapping)


def import_sd_scripts_dataset(data: Mapping[str, Any]) -> ImportResult:
    """Validate an sd-scripts dataset config against our copy of its schema and place it inline.

    Raises:
        ConfigError: every problem of the file, each with its path (e.g. datasets[0].subsets[1].image_dir).
    """
    try:
        parsed = DatasetFile.model_validate(data)
    except ValidationError as error:
        raise ConfigError(problems_from_validation_error(error, DatasetFile)) from None
    source = Source(data, ImportResult(FORMAT))
    _general(source, parsed)
    _datasets(source, parsed)
    apply_pins(source, DATASET_PINS, "not set in the file's [general], so sd-scripts' command-line default is kept")
    note_relative_paths(source.result, "sd-scripts")
    return source.result


def _general(source: Source, parsed: DatasetFile) -> None:
    """Each key the file's [general] sets, onto the same key of [dataset.general]."""
    raw = source.get("general") or {}
    for key, value in parsed.general.model_dump(mode="json", exclude_unset=True).items():
        if value is None:  # JSON null: not set
            source.unset(f"general.{key}")
        else:
            source.put(f"general.{key}", f"dataset.general.{key}", value)
    if not raw:
        source.unset("general")


def _datasets(source: Source, parsed: DatasetFile) -> None:
    """[[datasets]] as written (only the keys the file sets, so everything else keeps inheriting)."""
    if not parsed.datasets:
        source.unset("datasets")
        return
    entries = [entry.model_dump(mode="json", exclude_unset=True) for entry in parsed.datasets]
    set_path(source.result.overlay, "dataset.datasets", entries)
    source.used("datasets", ["dataset.datasets"])
    styles = {subset.style for entry in parsed.datasets for subset in entry.subsets}
    if styles == {"finetune"}:
        source.note("every subset is fine-tuning style (metadata_file); method stays 'lora', which trains on "
                    "fine-tuning and DreamBooth-style subsets alike (choose 'finetune' for a full fine-tune)")
