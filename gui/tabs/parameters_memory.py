"""The Parameters tab's Memory section: will the form's run fit the GPU (issue 16). Estimate and Fit run
`python -m engine plan` in an engine process (gui/memory_plan.py); the page shows the plan as a bar and a breakdown,
and Apply / Undo set or put back the fields Fit proposes, through the tab's own fill."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from gui.memory_plan import PlanFailed, plan_report
from gui.state import form_to_config, to_widget
from gui.views.memory import (
    applied_markdown,
    change_values,
    fit_markdown,
    plan_bar_html,
    plan_markdown,
    previous_values,
    undone_markdown,
)

if TYPE_CHECKING:
    from gui.tabs.parameters import ParametersTab


@dataclass
class MemorySection:
    """Will the form's run fit the GPU: the card's size, Estimate and Fit (each runs `python -m engine plan`), the
    plan as a bar and a breakdown, Apply / Undo of the changes Fit proposes, and re-planning as settings change."""

    gpu_memory: gr.Textbox
    live: gr.Checkbox
    estimate: gr.Button
    fit: gr.Button
    bar: gr.HTML
    report: gr.Markdown
    apply: gr.Button
    undo: gr.Button
    message: gr.Markdown
    changes: gr.State  # the changes of the last Fit ([{key, value, reason, gpu_needed_bytes}]), which Apply sets
    previous: gr.State  # {path: widget value} before the last Apply, which Undo puts back


def memory_section() -> MemorySection:
    with gr.Accordion("Memory: will it fit my GPU?", open=True, elem_id="memory-section"):
        with gr.Row():
            gpu_memory = gr.Textbox(label="GPU memory", placeholder="detected", elem_id="memory-gpu",
                                    info="The card's size, e.g. 12GiB or 24GB; empty plans for the GPU detected here.")
            live = gr.Checkbox(label="Update as settings change", value=False, elem_id="memory-live",
                               info="Plans again a moment after each change (a plan takes seconds of CPU).")
            estimate = gr.Button("Estimate memory", elem_id="memory-estimate")
            fit = gr.Button("Fit to my GPU", elem_id="memory-fit")
        bar = gr.HTML(elem_id="memory-bar-box")
        report = gr.Markdown(elem_id="memory-report")
        with gr.Row():
            apply = gr.Button("Apply changes", elem_id="memory-apply", variant="primary", visible=False)
            undo = gr.Button("Undo", elem_id="memory-undo", visible=False)
        message = gr.Markdown(elem_id="memory-message")
    return MemorySection(gpu_memory, live, estimate, fit, bar, report, apply, undo, message, gr.State(None),
                         gr.State(None))


class MemoryPanel:
    """The Memory section's handlers, over the Parameters tab (its form values, field specs and fill)."""

    def __init__(self, tab: ParametersTab):
        self.tab = tab
        self.section: MemorySection = tab.form.memory

    def run_plan(self, form: dict, *, fit: bool) -> dict:
        """The form's config planned by the engine (fit: with the changes that make it fit)."""
        config, data, _ = form_to_config(self.tab.form_values(form), self.tab.specs)
        return plan_report(data if config is not None else None, self.tab.ctx.roots, Path.cwd(),
                           form[self.section.gpu_memory], fit=fit)

    def on_estimate(self, form: dict) -> dict:
        return self.shown_plan(lambda: self.run_plan(form, fit=False))

    def shown_plan(self, plan_of: Any) -> dict:
        """The bar and breakdown of `plan_of()`'s plan (or why there is none); a new plan clears the last Fit."""
        memory = self.section
        cleared = {memory.changes: None, memory.apply: gr.update(visible=False), memory.message: ""}
        try:
            plan = plan_of()
        except PlanFailed as error:
            return cleared | {memory.bar: "", memory.report: f"**No memory plan:** {error}"}
        return cleared | {memory.bar: plan_bar_html(plan), memory.report: plan_markdown(plan)}

    def on_fit(self, form: dict) -> dict:
        memory = self.section
        try:
            report = self.run_plan(form, fit=True)
        except PlanFailed as error:
            return {memory.bar: "", memory.report: f"**No memory plan:** {error}", memory.changes: None,
                    memory.apply: gr.update(visible=False), memory.message: ""}
        text = f"{fit_markdown(report)}\n\n---\n\nAfter the changes:\n\n{plan_markdown(report['plan'])}"
        return {memory.bar: plan_bar_html(report["plan"]), memory.report: text, memory.message: "",
                memory.changes: report["changes"], memory.apply: gr.update(visible=bool(report["changes"]))}

    def on_apply(self, form: dict) -> dict:
        """Set the fields the last Fit changes, through fill (as a preset does), keeping their values for Undo."""
        memory = self.section
        current = self.tab.form_values(form)
        new_values, unknown = change_values(form[memory.changes] or [], self.tab.specs, to_widget)
        if not new_values:
            return {memory.message: "No changes to apply: press Fit to my GPU first."}
        return self.tab.fill(new_values, form, gr.skip()) | {
            memory.message: applied_markdown(new_values, current, unknown),
            memory.previous: previous_values(new_values, current), memory.undo: gr.update(visible=True)}

    def on_undo(self, form: dict) -> dict:
        memory = self.section
        previous = form[memory.previous]
        if not previous:
            return {memory.message: "Nothing to undo."}
        return self.tab.fill(previous, form, gr.skip()) | {memory.message: undone_markdown(previous),
                                                       memory.previous: None, memory.undo: gr.update(visible=False)}

    def on_live(self, form: dict) -> dict:
        """With "Update as settings change" on, a new validated config (the tab's shared one, which every edit
        updates) is planned again, as Estimate would; off, nothing."""
        memory, config = self.section, self.tab.ctx.config
        if not form[memory.live]:
            return {memory.message: gr.skip()}  # a dict naming no output would be read as one value
        return self.shown_plan(lambda: plan_report(form[config], self.tab.ctx.roots, Path.cwd(),
                                                   form[memory.gpu_memory]))

    def wire(self, field_outputs: list[Any], with_form: set[Any], evaluation: dict) -> None:
        """Estimate and Fit run an engine process for seconds, outside the form's queue (typing goes on meanwhile);
        Apply and Undo fill the form in it, as a preset does, then evaluate it."""
        memory, components = self.section, self.tab.components
        plan_inputs = {memory.gpu_memory, *components.values()}
        plan_outputs = [memory.bar, memory.report, memory.changes, memory.apply, memory.message]
        memory.estimate.click(self.on_estimate, inputs=plan_inputs, outputs=plan_outputs)
        memory.fit.click(self.on_fit, inputs=plan_inputs, outputs=plan_outputs)
        # Live plans follow the tab's shared config (a small state every edit updates), not the hundreds of fields:
        # one plan at a time, the newest config winning (a change during a plan queues one more, not one a change).
        config = self.tab.ctx.config
        gr.on([config.change, memory.live.change, memory.gpu_memory.change], self.on_live,
              inputs={memory.live, config, memory.gpu_memory}, outputs=plan_outputs, trigger_mode="always_last",
              concurrency_id="memory-live", concurrency_limit=1, show_progress="hidden")
        outputs = [*field_outputs, memory.message, memory.previous, memory.undo]
        in_order = {"concurrency_id": "parameters-form", "concurrency_limit": 1}
        memory.apply.click(self.on_apply, inputs={memory.changes, *with_form}, outputs=outputs, **in_order
                           ).then(**evaluation)
        memory.undo.click(self.on_undo, inputs={memory.previous, *with_form}, outputs=outputs, **in_order
                          ).then(**evaluation)
