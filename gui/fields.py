"""Config fields -> gradio components. One function per kind; the registry keeps the mapping explicit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from engine.config.choices import OPTIMIZERS
from engine.config.describe import PATH_WIDGETS, FieldSpec
from engine.config.sections_training import TORCH_LR_SCHEDULERS, TORCH_OPTIMIZERS
from gui.file_browser import FileRoots, path_field


def _label(spec: FieldSpec) -> str:
    label = spec.name.replace("_", " ").capitalize()
    return f"{label} ({spec.unit})" if spec.unit else label


def _common(spec: FieldSpec) -> dict[str, Any]:
    return {"label": _label(spec), "info": spec.description, "elem_id": element_id(spec.path)}


def element_id(path: str) -> str:
    """A stable DOM id for a field's component, e.g. 'field-network-network_dim' (tests and CSS use it)."""
    return "field-" + path.replace(".", "-")


def _bounds(spec: FieldSpec) -> dict[str, Any]:
    bounds = spec.bounds
    return {"minimum": bounds.get("ge", bounds.get("gt")), "maximum": bounds.get("le", bounds.get("lt"))}


def _checkbox(spec: FieldSpec, value: Any) -> gr.Component:
    return gr.Checkbox(value=bool(value), **_common(spec))


def _dropdown(spec: FieldSpec, value: Any) -> gr.Component:
    choices = list(spec.choices)
    if spec.optional:
        choices = [("(default)", ""), *[(str(choice), choice) for choice in choices]]
        value = "" if value is None else value
    return gr.Dropdown(choices=choices, value=value, **_common(spec))


# Text settings shown as a list of the usual values that also takes a typed one (a class path such as
# 'torch.optim.RAdam'); the config's validation decides what a typed value may be. Keyed by config path.
SUGGESTED_VALUES: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "optimizer.optimizer_type": lambda: [(name, name) for name in
                                         dict.fromkeys([*OPTIMIZERS, *TORCH_OPTIMIZERS])],
    "optimizer.lr_scheduler_type": lambda: [("(none: use lr_scheduler)", ""),
                                            *[(name, name) for name in TORCH_LR_SCHEDULERS]],
}


def _suggested_dropdown(spec: FieldSpec, value: Any) -> gr.Component:
    """A dropdown of SUGGESTED_VALUES[spec.path] that keeps any other value the user types (or a config holds)."""
    choices = SUGGESTED_VALUES[spec.path]()
    if value not in [choice for _, choice in choices]:
        choices.append((str(value), value))  # a loaded class path shows as itself
    return gr.Dropdown(choices=choices, value=value, allow_custom_value=True, **_common(spec))


def _number(spec: FieldSpec, value: Any) -> gr.Component:
    if spec.optional:
        # An unset number is a box left empty: a gr.Number shown with no value hands back 0 (which then either
        # trips its minimum, failing every handler that reads the form, or silently sets e.g. a learning rate of 0).
        return gr.Textbox(value="" if value is None else str(value), placeholder="(default)", **_common(spec))
    precision = 0 if spec.kind == "int" else None
    return gr.Number(value=value, precision=precision, **_bounds(spec), **_common(spec))


def _text(spec: FieldSpec, value: Any) -> gr.Component:
    multiline = spec.kind == "table" or spec.widget in ("textarea", "prompts")
    placeholder = {"size": "512 or 768,512", "table": "key = value, one per line", "list": "0,1"}.get(spec.kind)
    if spec.widget == "prompts":
        placeholder = "one prompt per line, e.g.  a photo of sks dog --n blurry --w 512 --h 512 --d 1"
    return gr.Textbox(value=value, lines=4 if multiline else 1, placeholder=placeholder,
                      **_common(spec))


COMPONENT_BUILDERS: dict[str, Callable[[FieldSpec, Any], gr.Component]] = {
    "bool": _checkbox,
    "choice": _dropdown,
    "int": _number,
    "float": _number,
    "number": _number,
    "str": _text,
    "size": _text,
    "list": _text,
    "table": _text,
}


def build_component(spec: FieldSpec, widget_value: Any) -> gr.Component:
    """The component for one field, showing `widget_value` (already converted by gui.state.to_widget)."""
    if spec.path in SUGGESTED_VALUES:
        return _suggested_dropdown(spec, widget_value)
    return COMPONENT_BUILDERS[spec.kind](spec, widget_value)


# What the file browser of a path field lists: a "path" (a base model: a file, a diffusers folder or a hub id) is
# most often a file, and a folder or an id can still be typed.
_BROWSE_KINDS = {"folder": "folder", "file": "file", "path": "file"}


def is_path_field(spec: FieldSpec) -> bool:
    return spec.widget in PATH_WIDGETS


def build_field(spec: FieldSpec, widget_value: Any, roots: FileRoots) -> gr.Component:
    """The component for one field; a local path gets the file browser (completion and a Browse panel) over `roots`.
    Returns the component holding the value (for a path field, its textbox)."""
    if not is_path_field(spec):
        return build_component(spec, widget_value)
    return path_field(_label(spec), roots, kind=_BROWSE_KINDS[spec.widget], elem_id=element_id(spec.path),
                      value=widget_value or "", info=spec.description)
