"""Whether a valid config is ready to start: what schema validation cannot see because it lives on the disk.

A config can be valid and still unable to train: no base model, a path that does not exist, or no images. The
Parameters tab shows these beside the schema's problems, all at once, so that "Valid." means ready; the checks are
cheap (file names only, no image is opened, no torch) because the form runs them on every edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.dataset import DatasetEntry, Subset, parse_legacy_folder_name
from engine.config.describe import PATH_WIDGETS, iter_fields
from engine.config.errors import ConfigError
from engine.config.paths import get_path
from engine.config.rule_registry import Problem
from engine.config.schema import RunConfig

# Folders a run creates: they need not exist before it starts.
OUTPUT_FIELDS = frozenset({"saving.output_dir", "logging.logging_dir"})
BASE_MODEL = "model.pretrained_model_name_or_path"
_WHAT = {"file": "file", "folder": "folder", "path": "file or folder"}


# Why the caller may not read a path (None when it may): the GUI passes FileRoots.refusal, so that the form never
# looks at a file or folder outside the folders the app may show (whether it exists, what it holds).
Refusal = Callable[[str, Path], "str | None"]


@dataclass(frozen=True)
class _Disk:
    """Reads paths as the run would (relative to base), only those the refusal allows."""

    base: Path
    refusal: Refusal | None = None

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def refused(self, value: str) -> str | None:
        return self.refusal(value, self.base) if self.refusal is not None else None

    def may_be_hub_id(self, value: str, widget: str) -> bool:
        """A "path" field (a base model, a text encoder) also takes a Hugging Face id such as 'org/model', which the
        engine looks up in the local cache: read as the engine reads it, an existing path first, then a hub id."""
        from engine.models.locations import looks_like_hub_id  # no torch: a pattern and the model file suffixes

        return widget == "path" and looks_like_hub_id(value) and not _exists(self.resolve(value))

    def folder(self, value: str) -> Path | None:
        """The folder `value` names when the caller may read it and it is one, else None."""
        if self.refused(value) is not None:
            return None
        path = self.resolve(value)
        return path if _is_dir(path) else None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # no permission to look: the run cannot read it either
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def subset_paths(datasets: Sequence[DatasetEntry], prefix: str) -> Iterator[tuple[str, str, str]]:
    """(field, value, widget) of the path fields of every subset of `datasets`."""
    specs = [(spec.path, spec.widget) for spec in iter_fields(Subset) if spec.widget in PATH_WIDGETS]
    for d, dataset in enumerate(datasets):
        for s, subset in enumerate(dataset.subsets):
            for path, widget in specs:
                value = getattr(subset, path)
                if value and widget:
                    yield f"{prefix}datasets[{d}].subsets[{s}].{path}", value, widget


def _config_paths(config: RunConfig) -> Iterator[tuple[str, str, str]]:
    """(field, value, widget) of every non-empty path the run reads."""
    data = config.model_dump(mode="json")
    for spec in iter_fields():
        value = get_path(data, spec.path) if spec.widget in PATH_WIDGETS else None
        if value and spec.widget and spec.path not in OUTPUT_FIELDS:
            yield spec.path, value, spec.widget
    yield from subset_paths(config.dataset.datasets, "dataset.")


def _missing_paths(paths: Iterator[tuple[str, str, str]], disk: _Disk) -> list[Problem]:
    problems = []
    for path, value, widget in paths:
        if disk.may_be_hub_id(value, widget):
            continue
        refused = disk.refused(value)
        if refused is not None:
            problems.append(Problem(path, refused))
        elif not _exists(disk.resolve(value)):
            problems.append(Problem(path, f"`{value}` does not exist or cannot be read; choose an existing "
                                          f"{_WHAT[widget]} or clear the field"))
    return problems


def _has_images(folder: Path) -> bool:
    from engine.data.images import is_image_file  # names only; nothing is opened

    # The callers pass folders they found (no second is_dir); one that cannot be listed holds no usable image.
    return any(is_image_file(entry) for entry in _entries(folder))


def _subset_image_problems(datasets: Sequence[DatasetEntry], prefix: str, disk: _Disk) -> list[Problem]:
    """Each image folder subset (a metadata subset lists its images in the metadata) must hold images."""
    problems = []
    for d, dataset in enumerate(datasets):
        for s, subset in enumerate(dataset.subsets):
            folder = disk.folder(subset.image_dir) if subset.image_dir else None
            if subset.metadata_file or folder is None or _has_images(folder):
                continue  # a missing or refused folder is named by the path check
            problems.append(Problem(f"{prefix}datasets[{d}].subsets[{s}].image_dir",
                                    f"`{subset.image_dir}` holds no images; add images or choose another folder"))
    return problems


def _legacy_problems(config: RunConfig, disk: _Disk) -> list[Problem]:
    """train_data_dir: the images are in its `<repeats>_<name>` folders (with in_json, in the folder itself)."""
    section = config.dataset
    root = disk.folder(section.train_data_dir)
    if root is None:
        return []  # named by the path check
    if section.in_json:
        found = _has_images(root)
    else:
        found = any(_has_images(entry) for entry in _entries(root)
                    if parse_legacy_folder_name(entry.name) is not None and _is_dir(entry))
    if found:
        return []
    where = "" if section.in_json else " in its `<repeats>_<name>` folders (e.g. `10_dog`)"
    return [Problem("dataset.train_data_dir", f"no images{where}: add images, or prepare the folder in the Dataset "
                                              "tab")]


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _dataset_problems(config: RunConfig, disk: _Disk) -> list[Problem]:
    section = config.dataset
    if not section.has_images_source():
        return [Problem("dataset", "no images: set dataset.train_data_dir, add datasets, or name a dataset TOML in "
                                   "dataset.config_file")]
    if section.datasets:
        return _subset_image_problems(section.datasets, "dataset.", disk)
    if section.train_data_dir:
        return _legacy_problems(config, disk)
    return _dataset_file_problems(section.config_file, disk)


def _dataset_file_problems(value: str, disk: _Disk) -> list[Problem]:
    """The subsets of a dataset TOML (their relative paths are read from the base, as the engine's scan does); the
    file is read only when the caller may read it (the path check names it otherwise)."""
    from engine.config.io import load_dataset_file

    path = disk.resolve(value)
    if disk.refused(value) is not None or not _is_file(path):
        return []
    try:
        dataset_file = load_dataset_file(path)
    except ConfigError as error:
        return [Problem("dataset.config_file", f"{problem.path}: {problem.message}") for problem in error.problems]
    prefix = f"{path.name}: "
    return (_missing_paths(subset_paths(dataset_file.datasets, prefix), disk)
            + _subset_image_problems(dataset_file.datasets, prefix, disk))


def readiness_problems(config: RunConfig, base_dir: str | Path | None = None,
                       refusal: Refusal | None = None) -> list[Problem]:
    """What stops a valid config from starting, all at once: a missing base model, a path that does not exist, an
    empty dataset. Relative paths are read from `base_dir` (default: the working folder, as a GUI run does).

    With `refusal` (the GUI's FileRoots.refusal), a path it refuses is a problem with its message and is never
    looked at: neither whether it exists nor what it holds."""
    disk = _Disk(Path(base_dir) if base_dir is not None else Path.cwd(), refusal)
    problems: list[Any] = []
    if not config.model.pretrained_model_name_or_path.strip():
        problems.append(Problem(BASE_MODEL, "no base model: choose a .safetensors/.ckpt file, a diffusers folder or "
                                            "a Hugging Face id"))
    problems += _missing_paths(_config_paths(config), disk)
    problems += _dataset_problems(config, disk)
    return problems
