"""Which Parameters fields show for the chosen model family. No gradio here, so it is tested directly.

A field shows when it applies to the family (`FieldSpec.applies_to`, declared once in the config model with
`setting(families=...)`), or when its value differs from the default: a config rule refuses such a value for another
family and names the field, so the user must be able to see it to set it back. Hidden fields keep their values; they
are still sent with the form and written to the config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.config.choices import family_names
from engine.config.describe import FieldSpec
from gui.state import from_widget

FAMILY_FIELD = "model.model_family"


def is_default(spec: FieldSpec, widget_value: Any) -> bool:
    """Whether a widget holds the field's default (text that cannot be read counts as changed: it must stay in view
    for the user to fix)."""
    try:
        return from_widget(spec, widget_value) == spec.default
    except ValueError:
        return False


def shown_paths(specs: Mapping[str, FieldSpec], values: Mapping[str, Any]) -> set[str]:
    """The fields to show for the form `values` ({path: widget value}); the family is the form's own."""
    family = values.get(FAMILY_FIELD) or "auto"
    return {path for path, spec in specs.items()
            if spec.applies_to(family) or (path in values and not is_default(spec, values[path]))}


@dataclass(frozen=True)
class FamilyBlock:
    """A part of the page (one field's box, an Advanced accordion, a section's tab) that shows while any of its
    fields shows. Only parts whose every field is family-specific get one: the rest always shows."""

    block: Any  # the gradio block
    paths: tuple[str, ...]
    when_hidden: bool = False  # shows instead while none of the fields shows (a note saying why the part is empty)

    def visible(self, shown: set[str]) -> bool:
        return any(path in shown for path in self.paths) != self.when_hidden


def family_specific(specs: Iterable[FieldSpec]) -> bool:
    """Whether every one of `specs` applies to some families only (so the part holding them may hide)."""
    specs = list(specs)
    return bool(specs) and all(spec.families for spec in specs)


def unused_note(specs: Iterable[FieldSpec]) -> str:
    """What a part whose fields all belong to other families says while they are hidden."""
    families = dict.fromkeys(family for spec in specs for family in spec.families)
    names = family_names(families)
    return (f"Only {names} models use these settings. Choose such a family (`model.model_family` in the Model "
            "section, or a preset) to see them.")
