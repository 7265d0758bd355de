"""Reading and writing configs: TOML run configs, JSON presets, `--set` overrides and dataset TOML files.

Every entry point validates, and every failure is a `ConfigError` listing all problems as `path: message`.
Relative paths inside a config are relative to the folder of the file they are written in.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from engine.config.dataset import DatasetFile
from engine.config.errors import ConfigError, problems_from_validation_error
from engine.config.migrations import SchemaVersionError, migrate
from engine.config.paths import set_path
from engine.config.rule_registry import Problem, RuleContext
from engine.config.rules import check
from engine.config.schema import RunConfig
from engine.files import atomic_write_text, resolve_path


def read_document(path: str | Path) -> dict[str, Any]:
    """Parse a .toml or .json file into a dict, turning syntax errors into a ConfigError that names the file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "file not found"
        raise ConfigError([Problem(str(path), what)])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([Problem(str(path), f"not a text file in UTF-8 (byte {error.start} cannot be read as "
                                   "text); give a .toml config or a .json preset, saved as UTF-8")]) from None
    except OSError as error:
        raise ConfigError([Problem(str(path), f"cannot be read ({error.strerror or error}); check that the file "
                                   "is readable by this user")]) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ConfigError([Problem(str(path), f"not valid {kind}: {error}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "expected a table/object at the top level")])
    return data


def validate_config(
    data: Mapping[str, Any], *, source: str = "", base_dir: str | Path | None = None, check_packages: bool = True,
) -> RunConfig:
    """Migrate, validate and cross-check a config dict; with base_dir, also read the dataset TOML it names.

    Raises:
        ConfigError: with every problem found.
    """
    try:
        migrated, _ = migrate(data)
    except SchemaVersionError as error:
        raise ConfigError([Problem("schema_version", str(error))], source) from None
    try:
        config = RunConfig.model_validate(migrated, context={"check_packages": check_packages})
    except ValidationError as error:
        problems = problems_from_validation_error(error, RunConfig)
        problems += _rules_beyond_failed_sections(migrated, error, check_packages)
        raise ConfigError(problems, source) from None
    if base_dir is not None:
        problems = _output_folder_problems(config, Path(base_dir))
        if config.dataset.config_file:
            problems += _dataset_file_problems(config, Path(base_dir), check_packages)
        if problems:
            raise ConfigError(problems, source)
    return config


# Folders a run creates and writes into; a file in the way would only fail once the run is under way.
_OUTPUT_FOLDERS = ("saving.output_dir", "logging.logging_dir")


def _output_folder_problems(config: RunConfig, base_dir: Path) -> list[Problem]:
    """An output folder that is an existing file, or lies under one, on this machine."""
    problems = []
    for field_path in _OUTPUT_FOLDERS:
        section, key = field_path.split(".")
        value = getattr(getattr(config, section), key)
        if not value:
            continue
        folder = resolve_path(value, base_dir)
        blocker = next((part for part in (folder, *folder.parents) if part.exists()), None)
        if blocker is not None and not blocker.is_dir():
            where = "is a file" if blocker == folder else f"lies under {blocker}, which is a file"
            problems.append(Problem(field_path, f"{folder} {where}, not a folder; choose another folder, or move "
                                                "the file away"))
    return problems


def _rules_beyond_failed_sections(
    data: Mapping[str, Any], error: ValidationError, check_packages: bool,
) -> list[Problem]:
    """Cross-field problems in the sections that did validate, so the user sees everything in one pass.

    pydantic skips model validators once a field fails; here the failed sections fall back to their defaults
    and only findings outside them are kept (a finding inside a defaulted section would be about our default).
    """
    failed = {str(item["loc"][0]) for item in error.errors() if item["loc"] and item["type"] != "cross_field"}
    if not failed:
        return []
    remaining = {key: value for key, value in data.items() if key not in failed}
    try:
        RunConfig.model_validate(remaining, context={"check_packages": check_packages})
    except ValidationError as second:
        return [problem for problem in problems_from_validation_error(second, RunConfig)
                if problem.path.split(".")[0].split("[")[0] not in failed]
    return []


def _dataset_file_problems(config: RunConfig, base_dir: Path, check_packages: bool) -> list[Problem]:
    """Read the dataset TOML named by dataset.config_file and run the cross-field rules over its datasets."""
    path = resolve_path(config.dataset.config_file, base_dir)
    try:
        dataset_file = load_dataset_file(path)
    except ConfigError as error:
        return [Problem(f"dataset.config_file ({p.path})", p.message) for p in error.problems]
    context = RuleContext(check_packages=check_packages, dataset_file=dataset_file, dataset_file_name=path.name)
    return [problem for problem in check(config, context) if problem.severity == "error"]


def load_dataset_file(path: str | Path) -> DatasetFile:
    """Read an sd-scripts dataset config (.toml or .json, like sd-scripts) and validate it against its schema."""
    path = Path(path)
    data = read_document(path)
    try:
        return DatasetFile.model_validate(data)
    except ValidationError as error:
        raise ConfigError(problems_from_validation_error(error, DatasetFile), str(path)) from None


def read_config_document(path: str | Path) -> dict[str, Any]:
    """A run config file as a dict, not yet validated: a TOML config as it is, a JSON preset laid on the defaults."""
    data = read_document(path)
    return deep_merge(default_config_dict(), data["config"]) if is_preset_document(data) else data


def load_config(
    path: str | Path, overrides: Iterable[str] = (), *, check_packages: bool = True,
    base_dir: str | Path | None = None,
) -> RunConfig:
    """Read, migrate, override and validate a run config TOML (or a JSON preset/config); its relative paths start
    from base_dir (default: the file's folder)."""
    path = Path(path)
    data = read_config_document(path)
    return validate_config(apply_overrides(data, overrides), source=str(path),
                           base_dir=path.parent if base_dir is None else base_dir, check_packages=check_packages)


# --- writing ---------------------------------------------------------------------------------------------------


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The full config as plain data. TOML has no null, so unset optional values are left out (they read back as
    unset)."""
    return config.model_dump(mode="json", exclude_none=True)


def default_config_dict() -> dict[str, Any]:
    return config_to_dict(RunConfig.model_validate({}, context={"check_packages": False}))


def diff_from_defaults(config: RunConfig) -> dict[str, Any]:
    """Only what differs from the defaults: what a user-saved preset contains."""
    return _diff(config_to_dict(config), default_config_dict())


def _diff(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    changed = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and value and default:
            nested = _diff(value, default)
            if nested:
                changed[key] = nested
        elif value != default:
            changed[key] = value
    return changed


# A multi-line array of scalars as tomli_w writes it; brackets and braces inside items are excluded so that nested
# arrays and inline tables are never touched (tomli_w escapes newlines in strings, so items are single lines).
_SCALAR_ARRAY = re.compile(r"\[\n((?:[ ]+[^\n\[\]{}]+,\n)+)\]")


def _inline_short_arrays(text: str, limit: int = 100) -> str:
    """`resolution = [\n    512,\n    512,\n]` -> `resolution = [512, 512]`: easier to read and edit by hand."""

    def collapse(match: re.Match) -> str:
        items = [line.strip().rstrip(",") for line in match[1].splitlines()]
        inline = f"[{', '.join(items)}]"
        return inline if len(inline) <= limit else match[0]

    return _SCALAR_ARRAY.sub(collapse, text)


def config_to_toml(config: RunConfig, *, only_changed: bool = False) -> str:
    data = diff_from_defaults(config) if only_changed else config_to_dict(config)
    data["schema_version"] = config.schema_version
    return _inline_short_arrays(tomli_w.dumps(data))


def save_config(config: RunConfig, path: str | Path, *, only_changed: bool = False, header: str = "") -> None:
    """Write a config TOML atomically; `header` lines are written as comments above it."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    atomic_write_text(path, comment + config_to_toml(config, only_changed=only_changed))


# --- presets ---------------------------------------------------------------------------------------------------

PRESET_FORMAT = "atelier-preset"


def is_preset_document(data: Mapping[str, Any]) -> bool:
    return data.get("format") == PRESET_FORMAT and isinstance(data.get("config"), dict)


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay values onto base: tables merge key by key, everything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def preset_document(config: RunConfig, title: str, description: str = "") -> dict[str, Any]:
    """A preset holding only what differs from the defaults."""
    return {"format": PRESET_FORMAT, "title": title, "description": description, "config": diff_from_defaults(config)}


def load_preset(path: str | Path, *, check_packages: bool = True) -> RunConfig:
    """A preset (or a bare partial config in JSON/TOML) merged onto the defaults and validated."""
    data = read_document(path)
    overlay = data["config"] if is_preset_document(data) else data
    return validate_config(deep_merge(default_config_dict(), overlay), source=str(path),
                           check_packages=check_packages)


def save_preset(config: RunConfig, path: str | Path, title: str, description: str = "") -> None:
    atomic_write_text(path, json.dumps(preset_document(config, title, description), indent=2) + "\n")


# --- overrides -------------------------------------------------------------------------------------------------

_PATH_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


def parse_override_value(text: str) -> Any:
    """A `--set` value read as TOML (numbers, true/false, lists, quoted text), or as plain text otherwise."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (with `[n]` for list items) to a config dict."""
    result: dict[str, Any] = json.loads(json.dumps(data))  # a deep copy that cannot share lists with the caller
    problems = []
    for override in overrides:
        path, equals, text = override.partition("=")
        steps = _parse_override_path(path.strip())
        if not equals or steps is None:
            problems.append(Problem("--set", f"{override!r} must look like section.key=value, e.g. "
                                    "training.max_train_epochs=5"))
            continue
        try:
            set_path(result, steps, parse_override_value(text.strip()))
        except (KeyError, IndexError, TypeError):
            problems.append(Problem(path.strip(), "there is no such list item or table to set"))
    if problems:
        raise ConfigError(problems, "--set")
    return result


def _parse_override_path(path: str) -> list[str | int] | None:
    steps: list[str | int] = []
    for part in path.split("."):
        match = _PATH_PART.fullmatch(part)
        if match is None:
            return None
        steps.append(match[1])
        steps.extend(int(index) for index in re.findall(r"\[(\d+)\]", match[2]))
    return steps

