"""The Parameters tab: every config field as a widget, generated from the config model, with live validation,
a TOML preview and presets. Handlers receive values keyed by field path, never by position.

The form is built when a page first opens the tab (gui/deferred.py), from the page's form kept in the states of
gui/tabs/parameters_page.py (which adds the tab), which restore the user's last form and take other tabs' patches
before then."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from engine.config.describe import FieldSpec, section_title
from engine.config.errors import ConfigError
from engine.config.io import save_preset
from engine.config.schema import SECTIONS
from gui.browse import FileRoots, PathNotAllowed
from gui.context import TabContext
from gui.dataset_editor import DatasetEditor, build_dataset_editor
from gui.family_view import FAMILY_FIELD, FamilyBlock, family_specific, shown_paths, unused_note
from gui.fields import build_field, element_id, is_path_field
from gui.file_browser import path_field
from gui.form_store import FormStore
from gui.presets import list_presets, preset_file_name, preset_path
from gui.state import form_to_config
from gui.tabs.parameters_memory import MemoryPanel, MemorySection, memory_section
from gui.tabs.parameters_page import IN_ORDER, FormPage, PageState
from gui.views.parameters import (
    SETTINGS_FILE_LABEL,
    cleared_by,
    form_report,
    import_report_markdown,
    imported_values,
    load_preset_values,
    patched_fields,
    settings_file,
)


class _Form:
    """The Parameters form as it is built: each field's component by path, and the parts of the page that show only
    for the model families their fields apply to."""

    def __init__(self, specs: dict[str, FieldSpec], values: Mapping[str, Any], roots: FileRoots):
        self.specs, self.values, self.roots = specs, values, roots
        self.shown = shown_paths(specs, values)  # the family-specific parts start as the values show them
        self.components: dict[str, Any] = {}
        self.family_blocks: list[FamilyBlock] = []
        self.dataset_editor: DatasetEditor | None = None

    def add_fields(self, specs: list[FieldSpec]) -> None:
        for spec in specs:
            if spec.kind == "datasets":
                self.dataset_editor = build_dataset_editor(self.values[spec.path], self.roots)
                self.components[spec.path] = self.dataset_editor.value
                continue
            if not spec.families:
                self.components[spec.path] = build_field(spec, self.values[spec.path], self.roots)
                continue
            shown = self.starts_shown((spec.path,))
            with gr.Column(elem_id=f"{element_id(spec.path)}-shown", visible=shown) as holder:  # box, file browser
                self.components[spec.path] = build_field(spec, self.values[spec.path], self.roots)
            self.family_blocks.append(FamilyBlock(holder, (spec.path,)))

    def add_section(self, section: str) -> None:
        section_specs = [spec for spec in self.specs.values() if spec.section == section]
        with gr.Tab(section_title(section), id=f"section-{section}"):
            if family_specific(section_specs):  # e.g. flow, which only FLUX.1 and Chroma use
                # The tab stays (Gradio 6 does not hide a tab's button on an update): its note says why it is empty.
                paths = tuple(s.path for s in section_specs)
                note = gr.Markdown(unused_note(section_specs), visible=self.starts_shown(paths, when_hidden=True),
                                   elem_id=f"unused-{section}")
                self.family_blocks.append(FamilyBlock(note, paths, when_hidden=True))
            self.add_fields([s for s in section_specs if not s.advanced])
            advanced = [s for s in section_specs if s.advanced]
            if advanced:
                paths, hides = tuple(s.path for s in advanced), family_specific(advanced)
                with gr.Accordion("Advanced", open=False, elem_id=f"advanced-{section}",
                                  visible=self.starts_shown(paths) if hides else True) as accordion:
                    self.add_fields(advanced)
                if hides:
                    self.family_blocks.append(FamilyBlock(accordion, paths))

    def starts_shown(self, paths: tuple[str, ...], when_hidden: bool = False) -> bool:
        """Whether a family-specific part starts shown, for the values the form is built with."""
        return FamilyBlock(None, paths, when_hidden).visible(self.shown)

    def visibility(self, values: Mapping[str, Any]) -> dict[Any, Any]:
        """Show or hide each family-specific part for the form `values` ({path: widget value})."""
        shown = shown_paths(self.specs, values)
        return {part.block: gr.update(visible=part.visible(shown)) for part in self.family_blocks}


def _edit_events(component: gr.components.Component, spec: FieldSpec) -> list[Any]:
    """The events of a user's edit, which programmatic fills do not fire: text and number boxes use `input` (typing)
    and `blur` (leaving the box, e.g. after a paste), dropdowns and checkboxes `input` (the user's pick). A fill
    (preset, loaded file, another tab's patch) evaluates the form once after it; with `change`, every field it set
    evaluated it again, each time sending the whole form (one preset: up to 11 requests, and Gradio's page spent
    about 3 s of CPU on each preset). Path boxes keep `change`: their file browser fills them without a keystroke."""
    if is_path_field(spec):
        return [component.change]
    if isinstance(component, gr.Textbox | gr.Number):
        return [component.input, component.blur]
    if isinstance(component, gr.Dropdown | gr.Checkbox):
        return [component.input]
    return [component.change]


def _preset_choices(user_dir: Path) -> list[tuple[str, str]]:
    """The preset dropdown's (title, path) choices: the shipped presets and those in user_dir."""
    return [(entry.title, str(entry.path)) for entry in list_presets(user_dir=user_dir)]


@dataclass
class OpenFileRow:
    """A settings file's path, and Load and Import."""

    path: gr.Textbox
    load: gr.Button
    import_button: gr.Button


def _open_file_row(ctx: TabContext) -> OpenFileRow:
    path = path_field(SETTINGS_FILE_LABEL, ctx.roots, kind="file", elem_id="params-file",
                      extensions=(".json", ".toml"),
                      info="An Atelier preset (.json) or run config (.toml), or a kohya_ss GUI .json / "
                           "sd-scripts .toml to import.")
    with gr.Row():
        load = gr.Button("Load", elem_id="params-load")
        imported = gr.Button("Import from kohya_ss / sd-scripts", elem_id="params-import")
    return OpenFileRow(path, load, imported)


@dataclass
class ConfirmRow:
    """Shown when a chosen preset would clear fields another tab set: apply it (clearing them), apply it keeping
    them, or cancel."""

    row: gr.Row
    text: gr.Markdown
    apply: gr.Button
    keep: gr.Button
    cancel: gr.Button


def _preset_confirm_row() -> ConfirmRow:
    with gr.Row(visible=False, elem_id="preset-confirm") as row:
        text = gr.Markdown(elem_id="preset-confirm-text")
        apply = gr.Button("Apply, clear them", elem_id="preset-confirm-apply", variant="stop")
        keep = gr.Button("Apply, keep them", elem_id="preset-confirm-keep", variant="primary")
        cancel = gr.Button("Cancel", elem_id="preset-confirm-cancel")
    return ConfirmRow(row, text, apply, keep, cancel)


@dataclass
class PresetRow:
    """The preset to apply, and the name and button to save the form as a preset."""

    preset: gr.Dropdown
    preset_title: gr.Textbox
    save_button: gr.Button


@dataclass
class FormSection:
    """The preset message, the validation status, the form's fields, the memory plan and the TOML preview."""

    preset_message: gr.Markdown
    status: gr.Markdown
    layout: _Form
    memory: MemorySection
    preview: gr.Markdown


def _preset_row(preset_choices: list[tuple[str, str]]) -> PresetRow:
    with gr.Row():
        preset = gr.Dropdown(choices=preset_choices, value=None, label="Preset", elem_id="preset-choice",
                             info="Fills the form with a preset's settings on top of the defaults.")
        preset_title = gr.Textbox(label="Save as preset", placeholder="name of your preset",
                                  elem_id="preset-title", info="Saves only what differs from the defaults.")
        save_button = gr.Button("Save preset", elem_id="preset-save")
    return PresetRow(preset, preset_title, save_button)


def _form_section(specs: dict[str, FieldSpec], values: Mapping[str, Any], roots: FileRoots,
                  message: str) -> FormSection:
    preset_message = gr.Markdown(message, elem_id="preset-message")
    status_text, preview_text, _ = form_report(values, specs, roots.refusal)
    status = gr.Markdown(status_text, elem_id="validation-status")
    # The form has the page's width (all section tabs fit in one row at 1400 px, none hidden in Gradio's
    # overflow menu) and the preview comes below it: beside it, the long preview made a page-tall column.
    with gr.Column(elem_id="parameters-form"):
        layout = _Form(specs, values, roots)
        layout.add_fields([spec for spec in specs.values() if not spec.section])
        with gr.Tabs():
            for section in SECTIONS:
                layout.add_section(section)
    memory = memory_section()
    with gr.Accordion("Preview: the config.toml this form makes", open=True, elem_id="toml-preview-section"):
        preview = gr.Markdown(preview_text, elem_id="toml-preview",
                              buttons=["copy"], max_height=720)
    return FormSection(preset_message, status, layout, memory, preview)


def content(ctx: TabContext, presets_dir: Path, page: FormPage, message: str, values: dict[str, Any]) -> None:
    """The form and its events, built for one page when it first opens the tab (gui/tabs/parameters_page.build),
    from the page's form `values` ({path: widget value}); `message` is the form's first message."""
    presets = _preset_row(_preset_choices(presets_dir))  # the list as it is now, the user's new presets included
    confirm = _preset_confirm_row()
    open_row = _open_file_row(ctx)
    form = _form_section(page.specs, values, ctx.roots, message)
    ParametersTab(ctx, presets_dir, page.specs, page.store, page.state, presets, confirm, open_row, form).wire()


class ParametersTab:
    """The tab's event handlers, over its sections. Handlers receive the form keyed by component and read it by
    field path (`path_of`)."""

    def __init__(self, ctx: TabContext, presets_dir: Path, specs: dict[str, FieldSpec], store: FormStore,
                 page: PageState, presets: PresetRow, confirm: ConfirmRow, open_row: OpenFileRow, form: FormSection):
        self.ctx, self.presets_dir, self.specs, self.store = ctx, presets_dir, specs, store
        self.page, self.presets, self.confirm, self.open_row, self.form = page, presets, confirm, open_row, form
        self.layout = form.layout
        self.components = form.layout.components
        self.path_of = {component: path for path, component in self.components.items()}

    def form_values(self, form: dict) -> dict[str, Any]:
        """The form's field values by path (the form may hold other inputs too)."""
        return {self.path_of[c]: v for c, v in form.items() if c in self.path_of}

    def evaluate(self, values: dict[str, Any], note: str = "") -> dict:
        """Validation status (with `note` below it), TOML preview and the shared config for form values keyed by
        field path."""
        text, preview, config = form_report(values, self.specs, self.ctx.roots.refusal)
        return {self.form.status: f"{text}\n\n{note}" if note else text, self.form.preview: preview,
                self.ctx.config: config}

    def on_input(self, form: dict) -> dict:
        values = self.form_values(form)
        return self.evaluate(values, self.store.save(form[self.page.user], values)) | {self.page.latest: values}

    def fill(self, new_values: dict[str, Any], form: dict, message: Any) -> dict:
        """Set the widgets whose value changes and validate the result once. Widgets revalidate on user input
        only: letting each programmatic change revalidate froze the page for tens of seconds after a preset.

        What changes is judged against the form the page sent with the request (what the user saw when asking);
        the config is built on the latest form the server has seen, which is newer when the user typed into
        another field while this request was on its way (the typed value stays in its box, and so in the config)."""
        latest = self.page.latest
        sent = self.form_values(form)
        changed = {path: value for path, value in new_values.items() if sent.get(path) != value}
        values = sent | (form.get(latest) or {}) | changed
        note = self.store.save(form[self.page.user], values)
        return ({self.components[path]: value for path, value in changed.items()} | self.evaluate(values, note)
                | {self.form.preset_message: message, latest: values} | self.layout.visibility(values))

    def on_patch(self, patch: dict | None, form: dict) -> dict:
        """Fields set by another tab (Dataset, Regularization); remembered, so that a preset asks before clearing
        them."""
        new_values, message = patched_fields(patch, self.specs)
        patched = self.page.patched
        return self.fill(new_values, form, message) | {patched: sorted({*form[patched], *new_values})}

    def on_load(self, path: str, form: dict) -> dict:
        try:
            return self.fill(load_preset_values(settings_file(path, self.ctx.roots), self.specs), form,
                             f"Loaded `{path}`.")
        except (ConfigError, PathNotAllowed) as error:
            return {self.form.preset_message: f"**Could not load it:** {error}"}

    def on_import(self, path: str, form: dict) -> dict:
        from engine.config.importers.registry import import_file

        try:
            result = import_file(settings_file(path, self.ctx.roots))
        except (ConfigError, PathNotAllowed) as error:
            return {self.form.preset_message: f"**Could not import it:** {error}"}
        new_values, cleared = imported_values(result, self.form_values(form), self.specs)
        message = import_report_markdown(result, path)
        if cleared:
            message += f"\n\nThe imported datasets replace {', '.join(f'`{p}`' for p in cleared)} (one source only)."
        return self.fill(new_values, form, message)

    def on_preset(self, choice: str | None, form: dict, answer: str = "") -> dict:
        """Apply a preset; when it would clear fields another tab set, first ask (`answer` "" asks, "apply" clears
        them, "keep" keeps them)."""
        confirm, preset_message = self.confirm, self.form.preset_message
        hide = {confirm.row: gr.update(visible=False)}
        if not choice:
            return {preset_message: gr.skip()} | hide  # not {}: Gradio reads an empty dict as a missing value
        try:
            new_values = load_preset_values(preset_path(choice, self.presets_dir), self.specs)
        except (ConfigError, ValueError) as error:
            return {preset_message: f"Could not read the preset: {error}"} | hide
        current = self.form_values(form)
        patched = form[self.page.patched]
        lost = cleared_by(new_values, current, patched)
        if lost and not answer:
            names = ", ".join(f"`{path}`" for path in lost)
            return {confirm.row: gr.update(visible=True), preset_message: "",
                    confirm.text: f"This preset would clear what another tab set: {names}."}
        if answer == "keep":
            return self.fill(new_values | {path: current[path] for path in lost}, form, "") | hide
        return self.fill(new_values, form, "") | hide | {self.page.patched: [p for p in patched if p not in lost]}

    def on_save(self, title: str, form: dict) -> dict:
        preset_message = self.form.preset_message
        config, _, problems = form_to_config(self.form_values(form), self.specs)
        target = self.presets_dir
        if config is None:
            return {preset_message: "Fix the problems above before saving a preset."}
        try:
            path = target / preset_file_name(title or "")
        except ValueError as error:
            return {preset_message: str(error)}
        if path.exists():
            return {preset_message: f"A preset named `{path.name}` already exists; choose another name."}
        save_preset(config, path, title)
        return {preset_message: f"Saved `{path}`.", self.presets.preset: gr.Dropdown(choices=_preset_choices(target))}

    def answered(self, answer: str) -> Any:
        return lambda form: self.on_preset(form[self.presets.preset], form, answer)

    def wire(self) -> None:
        """The tab's events, in the order the page registers them."""
        ctx, components, page, confirm, open_row = self.ctx, self.components, self.page, self.confirm, self.open_row
        preset, preset_message, status, preview = (self.presets.preset, self.form.preset_message, self.form.status,
                                                   self.form.preview)
        self.layout.dataset_editor.connect_general(components, self.specs)  # its export writes [dataset.general]
        # One form event at a time, in the order the page sent them: a handler that started earlier never finishes
        # later and overwrites the config with the form of before (a typed value then seemed lost).
        in_order = IN_ORDER
        evaluation = {"fn": self.on_input, "inputs": {*components.values(), page.user},
                      "outputs": [status, preview, ctx.config, page.latest], **in_order}
        gr.on([event for path, component in components.items() for event in _edit_events(component, self.specs[path])],
              trigger_mode="always_last", **evaluation)
        family_outputs = [part.block for part in self.layout.family_blocks]
        # The user's pick of a family shows its fields; a fill shows them itself (ParametersTab.fill).
        components[FAMILY_FIELD].input(lambda form: self.layout.visibility(self.form_values(form)),
                                        inputs=set(components.values()), outputs=family_outputs)
        field_outputs = [*components.values(), preset_message, status, preview, ctx.config, *family_outputs,
                         confirm.row, confirm.text, page.patched, page.latest]
        # Handlers that fill the form also read it, to send only what changes; then the form is evaluated once more
        # as the page holds it, after the fill, so the last word is always the page's own.
        with_form = {*components.values(), page.patched, page.user, page.latest}
        open_row.load.click(lambda form: self.on_load(form[open_row.path], form),
                            inputs={open_row.path, *with_form}, outputs=field_outputs, **in_order
                            ).then(**evaluation)
        open_row.import_button.click(lambda form: self.on_import(form[open_row.path], form),
                                     inputs={open_row.path, *with_form}, outputs=field_outputs, **in_order
                                     ).then(**evaluation)
        preset.change(lambda form: self.on_preset(form[preset], form), inputs={preset, *with_form},
                      outputs=field_outputs, **in_order).then(**evaluation)
        for answer in ("apply", "keep"):
            getattr(confirm, answer).click(self.answered(answer), inputs={preset, *with_form}, outputs=field_outputs,
                                           **in_order).then(**evaluation)
        confirm.cancel.click(lambda: {confirm.row: gr.update(visible=False),
                                      preset_message: "Preset not applied: the form is as it was."},
                             outputs=[confirm.row, preset_message])
        # on_patch reads the patch's fields (config_patch_value): its sequence number makes every press a change.
        ctx.config_patch.change(lambda form: self.on_patch(form[ctx.config_patch], form),
                                inputs={ctx.config_patch, *with_form}, outputs=field_outputs, **in_order
                                ).then(**evaluation)
        MemoryPanel(self).wire(field_outputs, with_form, evaluation)
        self.presets.save_button.click(lambda form: self.on_save(form[self.presets.preset_title], form),
                                       inputs={self.presets.preset_title, *components.values()},
                                       outputs=[preset_message, preset])
