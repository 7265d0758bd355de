"""Between widget values and config values, keyed by field path. No gradio here, so it is tested directly.

Widgets show some values as text (a resolution as "768,512", a table as TOML lines, prompts one per line).
`to_widget` and `from_widget` convert in both directions for each `FieldSpec.kind`; `form_to_config` turns a
whole form ({path: widget value}) into a validated config or the list of problems to show.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import tomli_w

from engine.config.describe import FieldSpec
from engine.config.errors import ConfigError
from engine.config.io import deep_merge, default_config_dict, validate_config
from engine.config.paths import get_path, set_path
from engine.config.rule_registry import Problem
from engine.config.schema import RunConfig


def _numbers_to_text(values: list[Any] | None) -> str:
    return "" if not values else ",".join(str(v) for v in values)


def _text_to_numbers(text: str, cast: Callable[[str], Any]) -> list[Any]:
    return [cast(part.strip()) for part in text.replace(" ", ",").split(",") if part.strip()]


def _size_from_text(text: str) -> int | list[int]:
    numbers = _text_to_numbers(text, int)
    return numbers[0] if len(numbers) == 1 else numbers


def _number_from_widget(value: Any) -> int | float | None:
    # Number widgets hand back floats; a whole number of 1 or more means steps, a fraction below 1 a ratio.
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    return value


def _table_to_text(table: dict[str, Any] | None) -> str:
    return tomli_w.dumps(table) if table else ""


def _table_from_text(text: str) -> dict[str, Any]:
    return tomllib.loads(text) if text.strip() else {}


def _list_to_text(spec: FieldSpec, values: list[Any] | None) -> str:
    # Lists of text (prompts) are edited one item per line; lists of numbers as "1,2".
    if spec.item_kind == "str":
        return "\n".join(values or [])
    return _numbers_to_text(values)


def _list_from_text(spec: FieldSpec, text: str) -> list[Any] | None:
    if spec.item_kind == "str":
        return [line.strip() for line in text.splitlines() if line.strip()]
    values = _text_to_numbers(text, float if spec.item_kind == "float" else int)
    return values or (None if spec.optional else [])


def _number_to_widget(spec: FieldSpec, value: Any) -> Any:
    # An optional number is edited as text (see gui.fields), empty when unset.
    if not spec.optional:
        return value
    return "" if value is None else str(value)


# `dataset.datasets` ([[datasets]] with their subsets) is edited as a whole by the dataset editor; the form holds it as
# the list of config dicts, so that nothing of it is lost between a Load and the config the form builds.
DATASETS_SPEC = FieldSpec(path="dataset.datasets", kind="datasets", default=[],
                          description="Datasets written inline in sd-scripts' [[datasets]] form, with their subsets.")


def _datasets_passthrough(spec: FieldSpec, value: Any) -> list[dict[str, Any]]:
    return [dict(entry) for entry in value or []]


_TO_WIDGET: dict[str, Callable[[FieldSpec, Any], Any]] = {
    "datasets": _datasets_passthrough,
    "size": lambda spec, value: _numbers_to_text(value if isinstance(value, list) else [value, value]),
    "table": lambda spec, value: _table_to_text(value),
    "list": _list_to_text,
    "str": lambda spec, value: "" if value is None else value,
    "int": _number_to_widget,
    "float": _number_to_widget,
    "number": _number_to_widget,
}

def _number_from_text(spec: FieldSpec, text: str) -> int | float:
    """An optional number typed in a text box (gui.fields shows those as text, so that empty means unset)."""
    text = text.strip()
    if spec.kind == "int":
        return int(text)
    value = float(text)
    return _number_from_widget(value) if spec.kind == "number" else value


def _int_from_widget(spec: FieldSpec, value: Any) -> Any:
    if isinstance(value, str):
        return _number_from_text(spec, value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


_FROM_WIDGET: dict[str, Callable[[FieldSpec, Any], Any]] = {
    "datasets": _datasets_passthrough,
    "size": lambda spec, text: _size_from_text(text),
    "table": lambda spec, text: _table_from_text(text),
    "list": _list_from_text,
    "number": lambda spec, value: _number_from_text(spec, value) if isinstance(value, str) else
    _number_from_widget(value),
    "int": _int_from_widget,
    "float": lambda spec, value: _number_from_text(spec, value) if isinstance(value, str) else value,
}


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """The value a widget shows for a config value."""
    convert = _TO_WIDGET.get(spec.kind)
    return convert(spec, value) if convert else value


def from_widget(spec: FieldSpec, value: Any) -> Any:
    """The config value for what a widget holds; empty text in an optional field means unset.

    Raises:
        ValueError: when the text cannot be read (the message says what was expected).
    """
    if spec.optional and (value is None or value == ""):
        return None
    convert = _FROM_WIDGET.get(spec.kind)
    if convert is None:
        return value
    try:
        return convert(spec, value)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot read {value!r}: {error}") from None


def form_to_config(
    values: Mapping[str, Any], specs: Mapping[str, FieldSpec], base: Mapping[str, Any] | None = None,
) -> tuple[RunConfig | None, dict[str, Any], list[Problem]]:
    """Build a config from a form keyed by field path, on top of `base` (parts the form does not show).

    Returns:
        The validated config (or None), the config dict that was validated, and the problems found.
    """
    data = deep_merge(default_config_dict(), base or {})
    problems = []
    for path, raw in values.items():
        try:
            set_path(data, path, from_widget(specs[path], raw))
        except ValueError as error:
            problems.append(Problem(path, str(error)))
    if problems:
        return None, data, problems
    try:
        return validate_config(data), data, []
    except ConfigError as error:
        return None, data, error.problems


def config_to_form(config_dict: Mapping[str, Any], specs: Mapping[str, FieldSpec]) -> dict[str, Any]:
    """Widget values for every field, keyed by path."""
    return {path: to_widget(spec, get_path(config_dict, path)) for path, spec in specs.items()}
