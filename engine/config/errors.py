"""Turning validation failures into `path: message` lines a user can act on."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from engine.config.rule_registry import Problem


class ConfigError(Exception):
    """A config that cannot be used, with every problem found (not just the first)."""

    def __init__(self, problems: list[Problem], source: str = ""):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(map(str, problems)))


def format_location(loc: tuple[Any, ...]) -> str:
    """('dataset', 'datasets', 0, 'subsets', 1, 'image_dir') -> 'dataset.datasets[0].subsets[1].image_dir'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part).startswith(("function-", "union[", "int", "float", "list[")):
            continue  # pydantic's names for union members and validators are noise to a user
        else:
            path += f".{part}" if path else str(part)
    return path


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the last part of `loc`, for suggesting key names."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = _innermost_model(current.model_fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _innermost_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _innermost_model(arg)
            if found is not None:
                return found
    return None


_TYPE_WORDS = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false",
               "string_type": "text in quotes", "list_type": "a list", "dict_type": "a table",
               "model_type": "a table", "int_from_float": "a whole number"}


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _all_paths(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Every key name in the model tree -> its first full path, for 'it lives in another section' hints."""
    paths: dict[str, str] = {}
    for name, info in model.model_fields.items():
        paths.setdefault(name, prefix + name)
        inner = _innermost_model(info.annotation)
        if inner is not None:
            for key, path in _all_paths(inner, f"{prefix}{name}.").items():
                paths.setdefault(key, path)
    return paths


def _unknown_key_hint(key: str, owner: type[BaseModel] | None, root: type[BaseModel]) -> str:
    if owner is not None:
        close = difflib.get_close_matches(key, list(owner.model_fields), n=1, cutoff=0.6)
        if close:
            return f"; did you mean '{close[0]}'?"
    elsewhere = _all_paths(root)
    close = difflib.get_close_matches(key, list(elsewhere), n=1, cutoff=0.75)
    return f"; did you mean '{elsewhere[close[0]]}'?" if close else ""


def _message(error: ErrorDetails, model: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(model, error["loc"][:-1])
        return f"unknown key{_unknown_key_hint(str(error['loc'][-1]), owner, model)}"
    if kind in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[kind]}, got {_describe(error['input'])}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error"):
        message = f"{message[0].lower()}{message[1:]}, got {_describe(error['input'])}"
    return message


def problems_from_validation_error(error: ValidationError, model: type[BaseModel], prefix: str = "") -> list[Problem]:
    """One Problem per pydantic error; cross-field errors are expanded into their own paths."""
    problems: list[Problem] = []
    for item in error.errors(include_url=False):
        if item["type"] == "cross_field":
            problems.extend(Problem(prefix + path, message) for path, message in item["ctx"]["problems"])
            continue
        path = format_location(item["loc"])
        problems.append(Problem(prefix + (path or "(top level)"), _message(item, model)))
    return _dedupe(problems)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    # A wrong value inside `A | None` is reported once per union member; the user needs it once.
    seen, unique = set(), []
    for problem in problems:
        if (problem.path, problem.message) not in seen:
            seen.add((problem.path, problem.message))
            unique.append(problem)
    return unique
