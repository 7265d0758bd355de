"""Reading the config model back as data: one `FieldSpec` per parameter, for the GUI, the docs and the CLI.

Nothing here declares a parameter; it only reports what `setting()` declared in the sections.
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from engine.config.base import field_families, hints_of
from engine.config.literals import literal_values
from engine.config.schema import SECTIONS, RunConfig

# Containers that the GUI and the docs treat as one value rather than descending into.
_LEAF_MODEL_LISTS = {"datasets"}
# The UI hints that mark a field as a local path (a file, a folder, or either): made absolute for a run, confined by
# the GUI.
PATH_WIDGETS = ("path", "folder", "file")


@dataclass(frozen=True)
class FieldSpec:
    """One parameter as the GUI and docs see it."""

    path: str
    kind: str  # bool, int, float, number (int or float), str, choice, list, table, size
    default: Any
    description: str
    optional: bool = False
    choices: tuple[Any, ...] = ()
    bounds: dict[str, Any] = field(default_factory=dict)
    advanced: bool = False
    group: str | None = None
    widget: str | None = None
    unit: str | None = None
    item_kind: str | None = None  # for lists: the kind of each item (str, int, float)
    # The model families it applies to, from the field or its section; () = every family. See `applies_to`.
    families: tuple[str, ...] = ()
    # Who reads it when the engine's training code does not: "metadata", "file" or "planned" (see base.UI_HINT_KEYS).
    use: str | None = None

    @property
    def section(self) -> str:
        return self.path.split(".")[0] if "." in self.path else ""

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def applies_to(self, family: str) -> bool:
        """Whether the field means something for `model.model_family` = family. Everything applies to "auto" (the
        family is not known yet); the GUI hides a field for families it does not apply to."""
        return family == "auto" or not self.families or family in self.families


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) < len(typing.get_args(annotation)):
            return functools.reduce(operator.or_, members), True
    return annotation, False


def _kind(annotation: Any, choices: tuple[Any, ...]) -> str:
    if choices:
        return "choice"
    if typing.get_origin(annotation) is typing.Annotated:
        return _kind(typing.get_args(annotation)[0], choices)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = set(typing.get_args(annotation))
        if members == {int, float}:
            return "number"
        if int in members and any(typing.get_origin(m) is list for m in members):
            return "size"
    if origin is list:
        return "list"
    if origin is dict:
        return "table"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(annotation, "str")


def _item_kind(annotation: Any) -> str | None:
    if typing.get_origin(annotation) is typing.Annotated:
        return _item_kind(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is list:
        return _kind(typing.get_args(annotation)[0], ())
    return None


def _bounds(info: Any) -> dict[str, Any]:
    bounds = {}
    for constraint in info.metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            value = getattr(constraint, name, None)
            if value is not None:
                bounds[name] = value
    return bounds


def _default(info: Any) -> Any:
    if info.default_factory is not None:
        value = info.default_factory()
        return value.model_dump() if isinstance(value, BaseModel) else value
    return None if info.default is PydanticUndefined else info.default


def iter_fields(model: type[BaseModel] = RunConfig, prefix: str = "",
                families: tuple[str, ...] = ()) -> list[FieldSpec]:
    """Every leaf parameter of `model` with its full dotted path, in declaration order; a field's families are its
    own or, without them, its section's (`families`)."""
    specs = []
    for name, info in model.model_fields.items():
        annotation, optional = _strip_optional(info.annotation)
        path = prefix + name
        own = field_families(info)
        applies = own if own is not None else families
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            specs.extend(iter_fields(annotation, path + ".", applies))
            continue
        if name in _LEAF_MODEL_LISTS and typing.get_origin(annotation) is list:
            continue  # inline datasets are edited as a whole (Dataset tab / TOML), not as single fields
        choices = literal_values(annotation)
        hints = hints_of(info)
        specs.append(FieldSpec(
            path=path, kind=_kind(annotation, choices), default=_default(info), description=info.description or "",
            optional=optional, choices=choices, bounds=_bounds(info), advanced=bool(hints.get("advanced")),
            group=hints.get("group"), widget=hints.get("widget"), unit=hints.get("unit"),
            item_kind=_item_kind(annotation), families=applies, use=hints.get("use"),
        ))
    return specs


def section_title(section: str) -> str:
    """How a section is named to users: its field's `title` when it has one (an acronym, e.g. "EMA"), else the
    capitalized key."""
    return RunConfig.model_fields[section].title or section.capitalize()


def section_fields(section: str) -> list[FieldSpec]:
    return [spec for spec in iter_fields() if spec.section == section]


def top_level_fields() -> list[FieldSpec]:
    return [spec for spec in iter_fields() if spec.section == ""]


def sections() -> tuple[str, ...]:
    return SECTIONS
