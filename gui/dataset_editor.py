"""The dataset editor in Parameters → Dataset: sd-scripts' [[datasets]] and their [[datasets.subsets]] as a list
with add / remove / reorder, an editor for the selected row's keys, per-row checks and image counts, and the export
as an sd-scripts dataset TOML.

Its value (`DatasetEditor.value`, a gr.State) is the form's `dataset.datasets`: config dicts in which an unset key
is absent (inherit). The editor writes it when the user edits, and redraws itself when it changes from elsewhere
(Load, Import, a preset): `shown` remembers the list the widgets show, so a change the editor made itself does not
redraw the field being typed into, and the redraw never writes the value back (no loops). The list logic lives in
gui/dataset_list.py, tested without a browser.
"""

from __future__ import annotations

import copy
import html
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from engine.config.describe import FieldSpec
from gui.browse import FileRoots
from gui.dataset_list import (
    DATASET_FIELDS,
    EXPORT_LABEL,
    SUBSET_FIELDS,
    Datasets,
    Row,
    add_dataset,
    add_subset,
    dataset_key,
    describe_rows,
    existing_key,
    export_dataset_toml,
    general_from_form,
    move_row,
    parse_key,
    remove_row,
    row_name,
    row_values,
    set_value,
    value_from_widget,
    widget_value,
)
from gui.fields import build_field, is_path_field
from gui.file_browser import path_field

ROW_HEADERS = ["Row", "Folder or metadata", "Images", "Problems"]
# Every handler that reads and writes the value runs in one queue, one at a time: two quick edits (a folder typed,
# then a box ticked) would otherwise both start from the old list, and the second would undo the first.
_SERIAL = {"concurrency_id": "dataset-editor", "concurrency_limit": 1, "show_progress": "hidden"}


def _cell(text: str, strong: bool = False) -> str:
    # Cells are HTML (Gradio cuts text cells at 60 characters, and paths must stay readable): escape what is shown.
    shown = html.escape(text)
    return f'<span style="display:block;text-align:left">{f"<b>{shown}</b>" if strong else shown}</span>'


def _samples(rows: list[Row], selected: str | None) -> list[list[str]]:
    return [[_cell(("▶ " if row.key == selected else "") + row.name, row.key == selected), _cell(row.source),
             _cell(row.images), _cell("✗ " + "; ".join(row.problems) if row.problems else "")] for row in rows]


@dataclass
class _Panel:
    """The fields of one level (dataset or subset): which row they edit, and their components by spec."""

    level: str  # "dataset" or "subset"
    column: Any
    heading: Any
    fields: list[tuple[FieldSpec, Any]] = field(default_factory=list)  # (spec, component); specs are not hashable

    def row(self, datasets: Datasets, selected: str | None) -> str | None:
        """The row this panel edits for the selected row: a subset's dataset, or the subset itself."""
        parsed = parse_key(existing_key(datasets, selected))
        if parsed is None:
            return None
        if self.level == "dataset":
            return dataset_key(parsed[0])
        return selected if parsed[1] is not None and selected == existing_key(datasets, selected) else None


@dataclass
class DatasetEditor:
    """What `build_dataset_editor` made. `value` is the form component of `dataset.datasets`."""

    value: Any  # gr.State: list of dataset dicts
    roots: FileRoots
    selected: Any = None  # gr.State: the selected row's key
    shown: Any = None  # gr.State: the list the widgets show
    table: Any = None
    panels: list[_Panel] = field(default_factory=list)
    export_path: Any = None
    export_button: Any = None
    export_message: Any = None

    # --- what the page shows --------------------------------------------------------------------------------------

    def view(self, datasets: Datasets, selected: str | None, *, fields: bool = True) -> dict[Any, Any]:
        """Updates for the list, the headings, the panels and (with fields) every field of the selected row."""
        rows = describe_rows(datasets, self.roots)
        updates: dict[Any, Any] = {self.table: gr.Dataset(samples=_samples(rows, selected))}
        problems = {row.key: row.problems for row in rows}
        for panel in self.panels:
            row = panel.row(datasets, selected)
            updates[panel.column] = gr.Column(visible=row is not None)
            updates[panel.heading] = _heading(panel.level, row, problems.get(row or "", []))
            if fields:
                values = row_values(datasets, row)
                updates |= {component: widget_value(spec, values.get(spec.name)) for spec, component in panel.fields}
        return updates

    def _changed(self, datasets: Datasets, selected: str | None, *, fields: bool) -> dict[Any, Any]:
        """The editor's own change: the new value (which the form sees) and what the widgets show."""
        return {self.value: datasets, self.shown: datasets, self.selected: selected} | self.view(
            datasets, selected, fields=fields)

    # --- events ---------------------------------------------------------------------------------------------------

    def _outputs(self) -> list[Any]:
        outputs = [self.value, self.shown, self.selected, self.table]
        for panel in self.panels:
            outputs += [panel.column, panel.heading, *(component for _, component in panel.fields)]
        return outputs

    def wire(self, buttons: Mapping[str, Any]) -> None:
        outputs = self._outputs()
        redraw = [output for output in outputs if output is not self.value]  # cannot write the value: no loops
        state = [self.value, self.selected]

        def refresh(datasets: Datasets, shown: Datasets, selected: str | None) -> dict[Any, Any]:
            # A value set from outside (Load, Import, preset): redraw everything; never write the value back.
            if datasets == shown:
                return {self.table: gr.skip()}
            key = existing_key(datasets, selected)
            return {self.shown: copy.deepcopy(datasets), self.selected: key} | self.view(datasets, key)

        self.value.change(refresh, inputs=[self.value, self.shown, self.selected], outputs=redraw, **_SERIAL)

        def select(index: int | None, datasets: Datasets) -> dict[Any, Any]:
            rows = describe_rows(datasets, self.roots)
            if index is None or not 0 <= index < len(rows):
                return {self.table: gr.skip()}
            return {self.selected: rows[index].key} | self.view(datasets, rows[index].key)

        self.table.click(select, inputs=[self.table, self.value], outputs=redraw, **_SERIAL)

        def on_list_edit(change):
            def handler(datasets: Datasets, selected: str | None) -> dict[Any, Any]:
                new, key = change(datasets, selected)
                return self._changed(new, key, fields=True)
            return handler

        actions = {
            "add_dataset": lambda datasets, _selected: add_dataset(datasets),
            "add_subset": add_subset,
            "remove": remove_row,
            "up": lambda datasets, selected: move_row(datasets, selected, -1),
            "down": lambda datasets, selected: move_row(datasets, selected, +1),
        }
        for name, change in actions.items():
            buttons[name].click(on_list_edit(change), inputs=state, outputs=outputs, **_SERIAL)
        for panel in self.panels:
            for spec, component in panel.fields:
                self._wire_field(panel, spec, component, outputs)

    def _wire_field(self, panel: _Panel, spec: FieldSpec, component: Any, outputs: list[Any]) -> None:
        def edit(datasets: Datasets, selected: str | None, raw: Any) -> dict[Any, Any]:
            row = panel.row(datasets, selected)
            new = set_value(datasets, row, spec.name, value_from_widget(spec, raw))
            if new == datasets:
                return {self.table: gr.skip()}
            # Not the fields: the one being typed into already shows the value, and redrawing it would drop keys
            # typed meanwhile.
            return self._changed(new, selected, fields=False)

        # A user's edit: `input` (typing) and, for text, `blur` (leaving the box: a paste fires no `input`), which the
        # redraw does not fire; a path box is also filled by its file browser, which fires only `change` (the
        # redraw's own changes leave the value as it is, so they change nothing).
        if is_path_field(spec):
            events = [component.change]
        elif isinstance(component, gr.Textbox):
            events = [component.input, component.blur]
        else:
            events = [component.input]
        gr.on(events, edit, inputs=[self.value, self.selected, component], outputs=outputs,
              trigger_mode="always_last", **_SERIAL)

    def connect_general(self, components: Mapping[str, Any], specs: Mapping[str, FieldSpec]) -> None:
        """Wire the export to the form's [dataset.general] fields ({field path: component}), which the exported
        [general] is written from. Call it once the form is built."""
        general = {path: component for path, component in components.items()
                   if path.startswith("dataset.general.") and path in specs}
        paths = {component: path for path, component in general.items()}

        def export(form: dict[Any, Any]) -> str:
            try:
                values = general_from_form({paths[c]: v for c, v in form.items() if c in paths}, specs)
            except ValueError as error:
                return f"{EXPORT_LABEL}: fix [dataset.general] first ({error})"
            return export_dataset_toml(form[self.value], values, form[self.export_path], self.roots, Path.cwd())

        self.export_button.click(export, inputs={self.value, self.export_path, *general.values()},
                                 outputs=self.export_message, **_SERIAL)


def _heading(level: str, row: str | None, problems: list[str]) -> str:
    if row is None:
        return ""
    if level == "dataset":
        text = f"**{row_name(row)}**: resolution, batch size and buckets of this dataset; empty fields inherit " \
               "[dataset.general], and its subsets inherit what is set here."
    else:
        text = f"**{row_name(row)}**: empty fields inherit the dataset's value."
    return text + "".join(f"\n- ✗ {html.escape(problem)}" for problem in problems)


def _panel(level: str, specs: tuple[FieldSpec, ...], datasets: Datasets, selected: str | None,
           roots: FileRoots) -> _Panel:
    """One level's fields, generated from its model's specs (the advanced ones folded away)."""
    shown = _Panel(level, None, None)
    row = shown.row(datasets, selected)
    values = row_values(datasets, row)
    with gr.Column(visible=row is not None, variant="panel", elem_id=f"dataset-editor-{level}") as column:
        heading = gr.Markdown(_heading(level, row, []), elem_id=f"dataset-editor-{level}-heading")
        panel = _Panel(level, column, heading)
        for spec in (s for s in specs if not s.advanced):
            panel.fields.append((spec, build_field(spec, widget_value(spec, values.get(spec.name)), roots)))
        with gr.Accordion("More settings", open=False, elem_id=f"dataset-editor-{level}-more"):
            for spec in (s for s in specs if s.advanced):
                panel.fields.append((spec, build_field(spec, widget_value(spec, values.get(spec.name)), roots)))
    return panel


def build_dataset_editor(initial: list[dict[str, Any]], roots: FileRoots) -> DatasetEditor:
    """The editor, built in the current layout, showing `initial` (the form's dataset.datasets)."""
    initial = copy.deepcopy(list(initial or []))
    selected = existing_key(initial, None)
    editor = DatasetEditor(gr.State(initial), roots, gr.State(selected), gr.State(copy.deepcopy(initial)))
    with gr.Column(elem_id="dataset-editor"):
        gr.Markdown("**Datasets** (sd-scripts' `[[datasets]]`): each dataset has its own resolution and batch size, "
                    "and its subsets are folders of images (or a fine-tuning metadata file) with their own repeats "
                    "and captions. Click a row to edit it.")
        editor.table = gr.Dataset(components=["html"] * len(ROW_HEADERS), headers=ROW_HEADERS,
                                  samples=_samples(describe_rows(initial, roots), selected), type="index",
                                  layout="table", samples_per_page=100, show_label=False,
                                  elem_id="dataset-editor-rows")
        with gr.Row():
            buttons = {
                "add_dataset": gr.Button("Add dataset", size="sm", elem_id="dataset-editor-add-dataset"),
                "add_subset": gr.Button("Add subset", size="sm", elem_id="dataset-editor-add-subset"),
                "remove": gr.Button("Remove", size="sm", elem_id="dataset-editor-remove"),
                "up": gr.Button("Move up", size="sm", elem_id="dataset-editor-up"),
                "down": gr.Button("Move down", size="sm", elem_id="dataset-editor-down"),
            }
        editor.panels = [_panel("dataset", DATASET_FIELDS, initial, selected, roots),
                         _panel("subset", SUBSET_FIELDS, initial, selected, roots)]
        with gr.Row(equal_height=True):
            with gr.Column(scale=4):
                editor.export_path = path_field(
                    EXPORT_LABEL, roots, kind="file", extensions=(".toml",), elem_id="dataset-editor-export-path",
                    info="A new .toml file for sd-scripts' --dataset_config, with [dataset.general] as its "
                         "[general]; an existing file is never replaced.")
            editor.export_button = gr.Button("Export dataset TOML", elem_id="dataset-editor-export", scale=1)
        editor.export_message = gr.Markdown(elem_id="dataset-editor-export-message")
    editor.wire(buttons)
    return editor
