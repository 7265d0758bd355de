"""Shared machinery of the importers: converting foreign values to config fields, and accounting for every key.

Every source key is accounted for: mapped onto config fields (`ImportResult.mapped`), `skipped` (it had a
value Atelier cannot use, with the reason) or `unset` (empty or off, so nothing was lost). A key can be partly
mapped and partly skipped (one bad item of a list). The importers' tests check that nothing else happens.
"""

from __future__ import annotations

import ast
import functools
import typing
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from engine.config.describe import FieldSpec, iter_fields
from engine.config.importers import ImportResult, Skipped
from engine.config.paths import get_path, set_path
from engine.config.schema import RunConfig

MISSING: Any = object()
NOT_SUPPORTED = "not supported by Atelier"


# --- empty values ----------------------------------------------------------------------------------------------


def is_blank(value: Any) -> bool:
    """No value at all: None, an empty or whitespace-only string, or an empty list/table."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, list | tuple | dict) and not value


def is_off(value: Any) -> bool:
    """Blank, false or zero, including numbers written as text ("0", "0.0").

    The kohya_ss GUI drops exactly these values before it writes sd-scripts' TOML ("0 in [False]" is true in
    Python), so sd-scripts never saw them and its own defaults applied.
    """
    if is_blank(value) or value is False:
        return True
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        try:
            return float(value) == 0
        except ValueError:
            return False
    return False


def same_value(value: Any, other: Any) -> bool:
    """Equality that keeps True apart from 1 but lets 1 equal 1.0 and "1" equal 1."""
    if isinstance(value, bool) or isinstance(other, bool):
        return value is other
    if isinstance(other, int | float) and isinstance(value, str):
        try:
            return float(value) == other
        except ValueError:
            return False
    return bool(value == other)


# --- converting a foreign value to a config field ---------------------------------------------------------------


@functools.cache
def field_specs() -> dict[str, FieldSpec]:
    return {spec.path: spec for spec in iter_fields()}


def _owner(path: str) -> tuple[type[BaseModel], str]:
    *parents, name = path.split(".")
    model: type[BaseModel] = RunConfig
    for part in parents:
        # sections are plain (non-optional) models
        model = typing.cast(type[BaseModel], model.model_fields[part].annotation)
    return model, name


def _plain(value: Any) -> Any:
    """Tuples (from ast.literal_eval) become lists, which TOML and the config model understand."""
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def _prepare(value: Any, spec: FieldSpec) -> Any:
    value = _plain(value)
    # Lax validation turns "2" into 2 but not into the Literal 150; choices of numbers need the number first.
    if isinstance(value, str) and spec.choices and all(isinstance(c, int) for c in spec.choices):
        try:
            return int(float(value))
        except ValueError:
            return value
    return value


def convert(path: str, value: Any) -> Any:
    """`value` converted to the type of config field `path` (lax: "1" -> 1, "0.0001" -> 1e-4), with its bounds and
    field validators applied.

    Raises:
        KeyError: `path` is not a config field (a bug in an importer's table).
        ValidationError: the value does not fit the field.
    """
    spec = field_specs().get(path)
    if spec is None:
        raise KeyError(f"{path} is not a field of the config")
    value = _prepare(value, spec)
    model, name = _owner(path)
    info = model.model_fields[name]
    if model.__pydantic_decorators__.model_validators:
        # Assigning to a bare instance would also run whole-model checks that need the other fields; these models
        # have no field validators, so the annotation (with its bounds) says everything.
        annotation: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        return TypeAdapter(annotation).validate_python(value, strict=False)
    instance = model.model_construct()
    model.__pydantic_validator__.validate_assignment(instance, name, value, strict=False)
    return getattr(instance, name)


def reason_of(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors(include_url=False)[0]
        return str(first["msg"]).removeprefix("Value error, ")
    return str(error)


def put(result: ImportResult, path: str, value: Any, source_key: str) -> bool:
    """Convert `value` for config field `path` and set it in the overlay; on failure record a Skipped instead."""
    try:
        converted = convert(path, value)
    except (ValidationError, ValueError) as error:
        result.skipped.append(Skipped(source_key, value, f"cannot be used as {path}: {reason_of(error)}"))
        return False
    set_path(result.overlay, path, converted)
    if isinstance(result, ImportResult):
        result.mapped.setdefault(source_key, []).append(path)
    return True


def put_table(result: ImportResult, path: str, items: Mapping[str, Any], source_key: str) -> None:
    """Merge `items` into the table field `path` item by item, so one bad value does not lose the others."""
    model, name = _owner(path)
    value_type = typing.get_args(model.model_fields[name].annotation)[1]
    adapter = TypeAdapter(value_type)
    table = get_path(result.overlay, path, {})
    for key, value in items.items():
        try:
            table[key] = adapter.validate_python(_plain(value), strict=False)
        except ValidationError as error:
            result.skipped.append(Skipped(f"{source_key}.{key}", value, f"cannot be used in {path}: "
                                          f"{reason_of(error)}"))
    if table:
        set_path(result.overlay, path, table)
        if isinstance(result, ImportResult):
            result.mapped.setdefault(source_key, []).append(path)


# --- parsing sd-scripts' and kohya_ss' text forms ----------------------------------------------------------------


def _split_outside_brackets(text: str) -> list[str]:
    """'a=1 b=(1, 2)' -> ['a=1', 'b=(1, 2)']: spaces inside brackets do not separate items."""
    items, current, depth = [], "", 0
    for char in text:
        depth += (char in "([{") - (char in ")]}")
        if char.isspace() and depth <= 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item for item in items if item]


def literal(text: str) -> Any:
    """A value the way sd-scripts reads `k=v` arguments: ast.literal_eval, or the text itself if that fails."""
    try:
        return _plain(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        return text


def parse_kv_args(text_or_list: str | Iterable[str] | None) -> dict[str, Any]:
    """sd-scripts/kohya_ss `k=v` arguments ("weight_decay=0.01 betas=(0.9,0.99)" or ["k=v", ...]) as a table.

    Double quotes are dropped first, as kohya_ss does before passing the string on.

    Raises:
        ValueError: an item without '='.
    """
    if text_or_list is None:
        return {}
    if not isinstance(text_or_list, str | list | tuple):
        raise ValueError(f"expected text or a list of key=value items, not {text_or_list!r}")
    items = (_split_outside_brackets(text_or_list.replace('"', "")) if isinstance(text_or_list, str)
             else [str(item).strip() for item in text_or_list])
    parsed = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"{item!r} is not of the form key=value")
        parsed[key.strip()] = literal(value.strip())
    return parsed


def parse_size(value: Any) -> Any:
    """'512,512' -> [512, 512], '768' -> 768; numbers and lists pass through for the field to check."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        numbers = [int(float(part)) for part in parts]
        return numbers[0] if len(numbers) == 1 else numbers
    return value


def parse_number_list(value: Any) -> Any:
    """'0,1' -> [0, 1] (GPU ids); lists pass through."""
    if isinstance(value, str):
        return [int(part) for part in value.replace(" ", "").split(",") if part]
    return value


def parse_float_pair(value: Any) -> Any:
    """'2.0,4.0' -> [2.0, 4.0] (sd-scripts' face_crop_aug_range on the command line)."""
    if isinstance(value, str):
        return [float(part) for part in value.split(",")]
    return value


def parse_warmup(value: Any) -> int | float:
    """sd-scripts' lr_warmup_steps: a step count, a fraction below 1, or 'N%' of the run."""
    if isinstance(value, str):
        text = value.strip()
        return float(text[:-1]) / 100 if text.endswith("%") else _number(text)
    return typing.cast(int | float, value)  # not text: the number as the file held it


def _number(text: str) -> int | float:
    number = float(text)
    return int(number) if number.is_integer() else number


def prompt_lines(text: str) -> list[str]:
    """Sample prompts as sd-scripts reads a .txt prompt file: non-empty lines not starting with '#'."""
    lines = (line.strip() for line in str(text).splitlines())
    return [line for line in lines if line and not line.startswith("#")]
