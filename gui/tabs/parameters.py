"""The Parameters tab: every config field as a widget, generated from the config model, with live validation,
a TOML preview and presets. Handlers receive values keyed by field path, never by position."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gradio as gr
import tomli_w

from engine.config.describe import FieldSpec, iter_fields
from engine.config.errors import ConfigError
from engine.config.io import (
    config_to_toml,
    deep_merge,
    default_config_dict,
    is_preset_document,
    read_document,
    save_preset,
)
from engine.config.schema import SECTIONS, RunConfig, config_warnings
from gui.context import TabContext
from gui.fields import build_component
from gui.presets import USER_DIR, list_presets, preset_file_name
from gui.state import config_to_form, form_to_config

# Shown in the form only where it helps; schema_version is a file detail.
_HIDDEN = {"schema_version"}


def editable_fields() -> dict[str, FieldSpec]:
    return {spec.path: spec for spec in iter_fields() if spec.path not in _HIDDEN}


def status_markdown(config: RunConfig | None, problems: list) -> str:
    if config is not None:
        training = config.training
        length = f"{training.max_train_epochs} epochs" if training.max_train_epochs else \
            f"{training.max_train_steps} steps"
        lines = [f"**Valid.** {config.method}, {length}, saves to "
                 f"`{config.saving.output_dir}/{config.saving.output_name}`"]
        lines += [f"- warning: `{warning.path}`: {warning.message}" for warning in config_warnings(config)]
        return "\n".join(lines)
    lines = [f"**{len(problems)} problem(s) to fix:**", ""]
    lines += [f"- `{problem.path}`: {problem.message}" for problem in problems]
    return "\n".join(lines)


def preview_text(config: RunConfig | None, data: Mapping[str, Any]) -> str:
    return config_to_toml(config) if config is not None else tomli_w.dumps(dict(data))


def _section_widgets(section: str, specs: dict[str, FieldSpec], values: Mapping[str, Any]) -> dict[str, Any]:
    components = {}
    section_specs = [spec for spec in specs.values() if spec.section == section]
    for spec in (s for s in section_specs if not s.advanced):
        components[spec.path] = build_component(spec, values[spec.path])
    advanced = [s for s in section_specs if s.advanced]
    if advanced:
        with gr.Accordion("Advanced", open=False, elem_id=f"advanced-{section}"):
            for spec in advanced:
                components[spec.path] = build_component(spec, values[spec.path])
    return components


def _load_preset_values(path: str, specs: dict[str, FieldSpec]) -> dict[str, Any]:
    document = read_document(path)
    overlay = document["config"] if is_preset_document(document) else document
    return config_to_form(deep_merge(default_config_dict(), overlay), specs)


def build(ctx: TabContext) -> None:
    """Add the Parameters tab to the current gr.Blocks."""
    presets_dir = ctx.presets_dir
    specs = editable_fields()
    values = config_to_form(default_config_dict(), specs)
    preset_choices = [(entry.title, str(entry.path)) for entry in list_presets()]
    with gr.Tab("Parameters", id="parameters"):
        with gr.Row():
            preset = gr.Dropdown(choices=preset_choices, value=None, label="Preset", elem_id="preset-choice",
                                 info="Fills the form with a preset's settings on top of the defaults.")
            preset_title = gr.Textbox(label="Save as preset", placeholder="name of your preset",
                                      elem_id="preset-title", info="Saves only what differs from the defaults.")
            save_button = gr.Button("Save preset", elem_id="preset-save")
        preset_message = gr.Markdown(elem_id="preset-message")
        status = gr.Markdown(status_markdown(RunConfig(), []), elem_id="validation-status")
        with gr.Row():
            with gr.Column(scale=3):
                components = {path: build_component(specs[path], values[path])
                              for path in specs if not specs[path].section}
                with gr.Tabs():
                    for section in SECTIONS:
                        with gr.Tab(section.capitalize(), id=f"section-{section}"):
                            components.update(_section_widgets(section, specs, values))
            with gr.Column(scale=2):
                preview = gr.Code(config_to_toml(RunConfig()), label="config.toml", elem_id="toml-preview",
                                  interactive=False)
    path_of = {component: path for path, component in components.items()}

    def on_change(form: dict) -> tuple[str, str]:
        config, data, problems = form_to_config({path_of[c]: v for c, v in form.items()}, specs)
        return status_markdown(config, problems), preview_text(config, data)

    def on_preset(choice: str | None) -> dict:
        if not choice:
            return {}
        try:
            new_values = _load_preset_values(choice, specs)
        except ConfigError as error:
            return {preset_message: f"Could not read the preset: {error}"}
        return {components[path]: value for path, value in new_values.items()} | {preset_message: ""}

    def on_save(title: str, form: dict) -> dict:
        config, _, problems = form_to_config({path_of[c]: v for c, v in form.items() if c in path_of}, specs)
        target = presets_dir or USER_DIR
        if config is None:
            return {preset_message: "Fix the problems above before saving a preset."}
        try:
            path = target / preset_file_name(title or "")
        except ValueError as error:
            return {preset_message: str(error)}
        if path.exists():
            return {preset_message: f"A preset named `{path.name}` already exists; choose another name."}
        save_preset(config, path, title)
        choices = [(entry.title, str(entry.path)) for entry in list_presets(user_dir=target)]
        return {preset_message: f"Saved `{path}`.", preset: gr.Dropdown(choices=choices)}

    gr.on([component.change for component in components.values()], on_change, inputs=set(components.values()),
          outputs=[status, preview], trigger_mode="always_last")
    preset.change(on_preset, inputs=preset, outputs=[*components.values(), preset_message])
    save_button.click(lambda form: on_save(form[preset_title], form),
                      inputs={preset_title, *components.values()}, outputs=[preset_message, preset])
