"""A config with its local paths made absolute, so that it runs the same from any folder (a run directory's
config.toml, the GUI's temporary configs)."""

from __future__ import annotations

from pathlib import Path

from engine.config.dataset import Subset
from engine.config.describe import PATH_WIDGETS, iter_fields
from engine.config.io import resolve_path
from engine.config.paths import get_path, set_path
from engine.config.schema import RunConfig


def absolute_config(config: RunConfig, base_dir: Path) -> RunConfig:
    """The config with every local path made absolute (hub ids and empty values stay as they are)."""
    data = config.model_dump(mode="json")
    for spec in iter_fields():
        if spec.widget in PATH_WIDGETS:
            value = get_path(data, spec.path)
            if value and resolve_path(value, base_dir).exists() or (value and spec.widget == "folder"):
                set_path(data, spec.path, str(resolve_path(value, base_dir)))
    subset_paths = [spec.path for spec in iter_fields(Subset) if spec.widget in PATH_WIDGETS]
    for dataset in data["dataset"].get("datasets", []):
        for subset in dataset.get("subsets", []):
            for key in subset_paths:
                if subset.get(key):
                    subset[key] = str(resolve_path(subset[key], base_dir))
    return RunConfig.model_validate(data, context={"check_packages": False})
