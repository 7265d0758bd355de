"""The building blocks every config section is made of: a strict base model and `setting()`.

`setting()` is the one place a parameter's default, bounds, user-facing description and UI hints are declared.
The GUI's widgets, the docs and the CLI read them back from the model's fields (see `describe.py`), so nothing
about a parameter is ever typed twice.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Keys of `json_schema_extra` that carry UI hints. Documented here because the GUI and docs rely on them.
#   advanced: folded away in the GUI unless the user opens "advanced".
#   group:    a sub-heading inside the section (e.g. "noise", "caching").
#   widget:   overrides the default widget: "folder", "file", "path", "textarea", "slider", "prompts".
#   unit:     shown after the value ("steps", "px").
UI_HINT_KEYS = ("advanced", "group", "widget", "unit")


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
        default_factory: For mutable defaults (lists, dicts) instead of `default`.
        **constraints: pydantic constraints such as ge, le, gt, lt, min_length, pattern.
    """
    if not description:
        raise ValueError("every setting needs a description for users")
    hints = {"advanced": advanced}
    for key, value in (("group", group), ("widget", widget), ("unit", unit)):
        if value is not None:
            hints[key] = value
    if default_factory is not None:
        return Field(default_factory=default_factory, description=description, json_schema_extra=hints, **constraints)
    return Field(default, description=description, json_schema_extra=hints, **constraints)
