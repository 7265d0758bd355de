"""The building blocks every config section is made of: a strict base model and `setting()`.

`setting()` is the one place a parameter's default, bounds, user-facing description and UI hints are declared.
The GUI's widgets, the docs and the CLI read them back from the model's fields (see `describe.py`), so nothing
about a parameter is ever typed twice.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

# Keys of `json_schema_extra` that carry UI hints. Documented here because the GUI and docs rely on them.
#   advanced: folded away in the GUI unless the user opens "advanced".
#   group:    a sub-heading inside the section (e.g. "noise", "caching").
#   widget:   overrides the default widget: "folder", "file", "path", "textarea", "slider", "prompts".
#   unit:     shown after the value ("steps", "px").
#   families: the model families the setting applies to (absent: all). The GUI hides it for the others, and a rule
#             refuses a value other than the default there, so a setting that is shown always does what it says.
#             On a section it applies to every field of the section.
#   use:      who reads the setting, when it is not the engine's training code (absent: the engine reads it).
#             "metadata": only recorded in the saved files' metadata (a licence, a comment);
#             "file": read by the config loader itself (the file layout's version);
#             "planned": not built yet; a rule refuses any value other than the default, so it never claims to work.
#             tests/unit/test_schema_readers.py holds every setting to this.
UI_HINT_KEYS = ("advanced", "group", "widget", "unit", "families", "use")
SETTING_USES = ("metadata", "file", "planned")


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors and nothing is silently coerced.

    Strict mode keeps "1" from becoming 1 and 1 from becoming True; an int is still accepted for a float.
    Choices are `Literal`s rather than enums so that plain strings read from TOML or JSON validate strictly.
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, validate_default=True)


def setting(
    default: Any = ...,
    description: str = "",
    *,
    advanced: bool = False,
    group: str | None = None,
    widget: str | None = None,
    unit: str | None = None,
    families: tuple[str, ...] | None = None,
    use: str | None = None,
    default_factory: Any = None,
    **constraints: Any,
) -> Any:
    """Declare one parameter: its default, its one-sentence description for users, bounds and UI hints.

    Args:
        default: The value used when the user gives none.
        description: One sentence, written for a user, shown as help text in the GUI and in the docs.
        advanced: Whether the GUI folds it away by default.
        group: Optional sub-heading within the section.
        widget: Optional widget override (see UI_HINT_KEYS).
        unit: Optional unit shown after the value.
        families: The model families (`model.model_family` values) it applies to; None for all.
        use: Who reads it when the engine's training code does not (one of SETTING_USES); None: the engine does.
        default_factory: For mutable defaults (lists, dicts) instead of `default`.
        **constraints: pydantic constraints such as ge, le, gt, lt, min_length, pattern.
    """
    if not description:
        raise ValueError("every setting needs a description for users")
    if use is not None and use not in SETTING_USES:
        raise ValueError(f"use must be one of {SETTING_USES}, not {use!r}")
    hints: dict[str, Any] = {"advanced": advanced}
    for key, value in (("group", group), ("widget", widget), ("unit", unit), ("use", use)):
        if value is not None:
            hints[key] = value
    if families is not None:
        hints["families"] = list(families)  # a list: the hints end up in the JSON Schema
    if default_factory is not None:
        return Field(default_factory=default_factory, description=description, json_schema_extra=hints, **constraints)
    return Field(default, description=description, json_schema_extra=hints, **constraints)


def hints_of(info: FieldInfo) -> dict[str, Any]:
    """The UI hints `setting()` stored on a field (advanced, group, widget, unit, families, use); {} for none."""
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def field_families(info: FieldInfo) -> tuple[str, ...] | None:
    """The families a field (or section) was declared for with `setting(families=...)`; None when it applies to all."""
    hints = hints_of(info)
    families = hints.get("families")
    return tuple(families) if families is not None else None
