"""The dataset editor's list of datasets and subsets, as plain functions over `dataset.datasets` config dicts.

No gradio here, so adding, removing, reordering, editing and checking rows is tested directly; gui/dataset_editor.py
only lays the results out. Every function returns a new list and leaves its argument as it was (the old list is
still the form's value until the handler returns).

A row is named by a key: "d0" is the first dataset, "d0s1" its second subset. A key that is unset stays absent
from its dict: absent means "inherit from the level above" (sd-scripts' precedence), never a default value.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.config.dataset import DatasetEntry, DatasetGeneral, DatasetSection, Subset
from engine.config.dataset_export import dataset_toml
from engine.config.describe import PATH_WIDGETS, FieldSpec, iter_fields
from engine.config.errors import problems_from_validation_error
from engine.data.metadata import MetadataError, read_metadata
from engine.files import write_new_file
from gui.browse import FileRoots, PathNotAllowed, count_images
from gui.state import from_widget, to_widget

Datasets = list[dict[str, Any]]

# The editor's fields, generated from the models like every other widget; `subsets` is the list itself.
DATASET_PREFIX = "dataset.datasets."
SUBSET_PREFIX = "dataset.datasets.subsets."
GENERAL_PREFIX = "dataset.general."
# Yes/no keys that may also be unset (inherit) are shown as a three-way choice.
_INHERIT_CHOICES = ("true", "false")


def _editor_spec(spec: FieldSpec) -> FieldSpec:
    if spec.kind == "bool" and spec.optional:
        return replace(spec, kind="choice", choices=_INHERIT_CHOICES)
    return spec


DATASET_FIELDS: tuple[FieldSpec, ...] = tuple(
    _editor_spec(spec) for spec in iter_fields(DatasetEntry, DATASET_PREFIX) if spec.name != "subsets")
# A subset's own keys (image_dir, is_reg, metadata_file, ...) first: they say what the subset is.
_INHERITED = set(Subset.__base__.model_fields)
SUBSET_FIELDS: tuple[FieldSpec, ...] = tuple(sorted(
    (_editor_spec(spec) for spec in iter_fields(Subset, SUBSET_PREFIX)), key=lambda spec: spec.name in _INHERITED))

_KEY = re.compile(r"^d(\d+)(?:s(\d+))?$")


# --- keys --------------------------------------------------------------------------------------------------------


def dataset_key(index: int) -> str:
    return f"d{index}"


def subset_key(index: int, sub: int) -> str:
    return f"d{index}s{sub}"


def parse_key(key: str | None) -> tuple[int, int | None] | None:
    """'d0s1' -> (0, 1), 'd2' -> (2, None); None for no key or one that is not a row key."""
    match = _KEY.match(key or "")
    if match is None:
        return None
    return int(match[1]), None if match[2] is None else int(match[2])


def row_keys(datasets: Datasets) -> list[str]:
    """Every row in list order: each dataset followed by its subsets."""
    keys = []
    for index, entry in enumerate(datasets):
        keys.append(dataset_key(index))
        keys += [subset_key(index, sub) for sub in range(len(_subsets(entry)))]
    return keys


def existing_key(datasets: Datasets, key: str | None) -> str | None:
    """key when that row exists, else the nearest row that does (its dataset, the last dataset), or None."""
    keys = row_keys(datasets)
    if key in keys:
        return key
    parsed = parse_key(key)
    if parsed is not None and parsed[0] < len(datasets):
        return dataset_key(parsed[0])
    return dataset_key(len(datasets) - 1) if datasets else None


def row_name(key: str) -> str:
    """'dataset 1 › subset 2' for 'd0s1': numbered from 1, as a user counts."""
    parsed = parse_key(key)
    if parsed is None:
        return key
    index, sub = parsed
    return f"dataset {index + 1}" + ("" if sub is None else f" › subset {sub + 1}")


def _subsets(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    subsets = entry.get("subsets")
    return subsets if isinstance(subsets, list) else []


# --- editing the list --------------------------------------------------------------------------------------------


def add_dataset(datasets: Datasets) -> tuple[Datasets, str]:
    """A new dataset with one empty subset at the end (a dataset needs a subset), and the key of that subset, which
    needs its folder next."""
    new = copy.deepcopy(datasets) + [{"subsets": [{}]}]
    return new, subset_key(len(new) - 1, 0)


def add_subset(datasets: Datasets, selected: str | None) -> tuple[Datasets, str]:
    """An empty subset at the end of the selected row's dataset (the last dataset when none is selected; a new one
    when there is none), and its key."""
    parsed = parse_key(existing_key(datasets, selected))
    if parsed is None:
        return add_dataset(datasets)
    new = copy.deepcopy(datasets)
    subsets = new[parsed[0]].setdefault("subsets", [])
    subsets.append({})
    return new, subset_key(parsed[0], len(subsets) - 1)


def remove_row(datasets: Datasets, key: str | None) -> tuple[Datasets, str | None]:
    """The list without that row (a dataset goes with its subsets), and the row to select next."""
    parsed = parse_key(existing_key(datasets, key))
    if parsed is None or key not in row_keys(datasets):
        return copy.deepcopy(datasets), existing_key(datasets, key)
    index, sub = parsed
    new = copy.deepcopy(datasets)
    if sub is None:
        del new[index]
        return new, existing_key(new, dataset_key(min(index, len(new) - 1)))
    del new[index]["subsets"][sub]
    remaining = len(new[index]["subsets"])
    return new, subset_key(index, min(sub, remaining - 1)) if remaining else dataset_key(index)


def move_row(datasets: Datasets, key: str | None, step: int) -> tuple[Datasets, str | None]:
    """The row moved `step` places (-1 up, +1 down) among its siblings: a dataset among datasets, a subset within
    its dataset. At either end it stays where it is."""
    new = copy.deepcopy(datasets)
    if key not in row_keys(datasets):
        return new, existing_key(datasets, key)
    index, sub = parse_key(key)  # type: ignore[misc]
    siblings = new if sub is None else new[index]["subsets"]
    here = index if sub is None else sub
    there = here + step
    if not 0 <= there < len(siblings):
        return new, key
    siblings[here], siblings[there] = siblings[there], siblings[here]
    return new, dataset_key(there) if sub is None else subset_key(index, there)


def row_values(datasets: Datasets, key: str | None) -> dict[str, Any]:
    """The keys a row sets: a subset's dict, or a dataset's without its subsets ({} for no row)."""
    parsed = parse_key(key)
    if parsed is None or key not in row_keys(datasets):
        return {}
    index, sub = parsed
    if sub is None:
        return {name: value for name, value in datasets[index].items() if name != "subsets"}
    return dict(datasets[index]["subsets"][sub])


def set_value(datasets: Datasets, key: str | None, name: str, value: Any) -> Datasets:
    """The list with `name` of that row set to value; None removes the key (inherit)."""
    new = copy.deepcopy(datasets)
    parsed = parse_key(key)
    if parsed is None or key not in row_keys(datasets) or name == "subsets":
        return new
    index, sub = parsed
    row = new[index] if sub is None else new[index]["subsets"][sub]
    if value is None:
        row.pop(name, None)
    else:
        row[name] = value
    return new


# --- widgets <-> row values ---------------------------------------------------------------------------------------


def widget_value(spec: FieldSpec, value: Any) -> Any:
    """What a field shows for a row's value; an unset key shows empty ("(default)" in a choice)."""
    if value is None:
        return False if spec.kind == "bool" else ""
    if spec.choices == _INHERIT_CHOICES:
        return "true" if value else "false"
    return to_widget(spec, value)


def value_from_widget(spec: FieldSpec, raw: Any) -> Any:
    """The row value for what a field holds: None (unset) for an empty optional field. Text that cannot be read
    is kept as typed, so the row's check names the field and says what it expects."""
    if spec.choices == _INHERIT_CHOICES:
        return None if raw in (None, "") else raw == "true"
    if isinstance(raw, str) and spec.widget in PATH_WIDGETS:
        raw = raw.strip()  # a path pasted with a trailing space or newline
    try:
        return from_widget(spec, raw)
    except ValueError:
        return raw


# --- checking and describing rows ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the list: its key, its name and what it points at, its image count and its problems."""

    key: str
    name: str
    source: str = ""
    images: str = ""
    problems: list[str] = field(default_factory=list)


def _problem_text(path: str, message: str) -> str:
    return f"{path}: {message}" if path and path != "(top level)" else message


def row_problems(datasets: Datasets) -> dict[str, list[str]]:
    """Each row's own validation messages, keyed by row key; a subset's problems belong to the subset's row."""
    problems: dict[str, list[str]] = {key: [] for key in row_keys(datasets)}
    for index, entry in enumerate(datasets):
        try:
            DatasetEntry.model_validate(entry)
        except ValidationError as error:
            for problem in problems_from_validation_error(error, DatasetEntry):
                match = re.match(r"^subsets\[(\d+)\]\.?(.*)$", problem.path)
                if match and int(match[1]) < len(_subsets(entry)):
                    problems[subset_key(index, int(match[1]))].append(_problem_text(match[2], problem.message))
                else:
                    problems[dataset_key(index)].append(_problem_text(problem.path, problem.message))
    return problems


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def image_count(subset: Mapping[str, Any], roots: FileRoots) -> tuple[int | None, str]:
    """The images a subset trains on, as a number (None when unknown) and as shown: '40 images',
    '12 images (metadata)', or why it cannot be counted. Paths outside the roots are not looked at."""
    metadata, folder = subset.get("metadata_file"), subset.get("image_dir")
    target = metadata or folder
    if not isinstance(target, str) or not target.strip():
        return None, ""
    try:
        path = roots.check(target.strip())
    except PathNotAllowed:
        return None, "outside the allowed folders"
    if metadata:
        try:
            count = len(read_metadata(path))
        except MetadataError:
            return None, "metadata cannot be read" if path.is_file() else "metadata file not found"
        return count, f"{_plural(count, 'image')} (metadata)"
    counted = count_images(path) if path.is_dir() else None
    if counted is None:
        return None, "folder not found"
    count, partial = counted
    return count, _plural(count, "image") + ("+" if partial else "")


def _dataset_source(entry: Mapping[str, Any]) -> str:
    resolution = entry.get("resolution")
    parts = []
    if resolution is not None:
        size = resolution if isinstance(resolution, list) else [resolution, resolution]
        parts.append("×".join(str(side) for side in size))
    if entry.get("batch_size") is not None:
        parts.append(f"batch {entry['batch_size']}")
    parts.append(_plural(len(_subsets(entry)), "subset"))
    return " · ".join(parts)


def describe_rows(datasets: Datasets, roots: FileRoots) -> list[Row]:
    """Every row with its name, source, image count and problems, in list order."""
    problems = row_problems(datasets)
    rows = []
    for index, entry in enumerate(datasets):
        dataset = Row(dataset_key(index), row_name(dataset_key(index)), _dataset_source(entry),
                      problems=problems[dataset_key(index)])
        rows.append(dataset)
        total, known = 0, True
        for sub, subset in enumerate(_subsets(entry)):
            key = subset_key(index, sub)
            count, shown = image_count(subset, roots)
            source = str(subset.get("metadata_file") or subset.get("image_dir") or "(no folder yet)")
            if subset.get("is_reg"):
                source += " · regularization"
            if subset.get("validation_only"):
                source += " · validation only"
            rows.append(Row(key, row_name(key), source, shown, problems[key]))
            total += count or 0
            known = known and count is not None
        dataset.images = _plural(total, "image") if known and _subsets(entry) else ""
    return rows


# --- export -------------------------------------------------------------------------------------------------------

EXPORT_LABEL = "Export dataset TOML"


def general_from_form(values: Mapping[str, Any], specs: Mapping[str, FieldSpec]) -> dict[str, Any]:
    """[dataset.general] from the form's widgets ({field path: widget value}), as config values."""
    general: dict[str, Any] = {}
    for path, raw in values.items():
        if path.startswith(GENERAL_PREFIX) and path in specs:
            value = from_widget(specs[path], raw)
            if value is not None:
                general[path.removeprefix(GENERAL_PREFIX)] = value
    return general


def export_dataset_toml(datasets: Datasets, general: Mapping[str, Any], target: str | None, roots: FileRoots,
                        base_dir: str | Path | None = None) -> str:
    """Write the datasets as an sd-scripts dataset TOML at `target` and say where; never over an existing file.

    Returns the message to show: what was written, or what to change (a path outside the roots, a file that is
    already there, datasets with problems).
    """
    text = (target or "").strip()
    if not text:
        return f"{EXPORT_LABEL}: type the path of a new .toml file first"
    try:
        path = roots.check(text, EXPORT_LABEL)
    except PathNotAllowed as error:
        return str(error)
    if path.suffix.lower() != ".toml":
        return f"{EXPORT_LABEL}: {path.name} does not end in .toml; sd-scripts reads a dataset config from a .toml file"
    if path.exists():
        return f"{EXPORT_LABEL}: {path} already exists and is kept as it is; choose a new file name"
    if not path.parent.is_dir():
        return f"{EXPORT_LABEL}: the folder {path.parent} does not exist; create it or choose another folder"
    try:
        section = DatasetSection.model_validate({"general": DatasetGeneral.model_validate(general).model_dump(),
                                                 "datasets": datasets})
        content = dataset_toml(section, base_dir)
    except ValidationError as error:
        problems = problems_from_validation_error(error, DatasetSection)
        listed = "; ".join(f"{_problem_text(p.path, p.message)}" for p in problems)
        return f"{EXPORT_LABEL}: fix the datasets first ({listed})"
    except ValueError as error:
        return f"{EXPORT_LABEL}: {error}"
    try:
        write_new_file(path, content.encode("utf-8"))  # whole or not at all; one that appeared meanwhile is kept
    except FileExistsError:
        return f"{EXPORT_LABEL}: {path} already exists and is kept as it is; choose a new file name"
    except OSError as error:
        return f"{EXPORT_LABEL}: cannot write {path} ({error.strerror or error})"
    return f"Wrote `{path}` ({_plural(len(datasets), 'dataset')}); give it to sd-scripts as --dataset_config."
