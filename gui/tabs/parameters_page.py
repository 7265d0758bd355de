"""The Parameters tab as the app starts with it, before a page first opens it (its form is built then, per page: see
gui/deferred.py). Other tabs read the form's config (TabContext.config: Train starts runs from it) and write into it
(TabContext.config_patch, "Use in Parameters") whether the tab was opened or not, so the page's form lives in states
here: the user's form restored when the page opens, and other tabs' patches applied, by the same code the form uses
(gui.state.form_to_config, gui.views.parameters); the form is built from these states when the tab is first opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import gradio as gr

from engine.config.describe import FieldSpec
from gui.context import TabContext
from gui.deferred import built_on_first_open
from gui.form_store import LOCAL_USER, FormStore, user_name
from gui.presets import USER_DIR
from gui.state import form_to_config
from gui.views.parameters import default_form, editable_fields, patched_fields, shared_config

RESTORED = "Restored your last form."
# One form event at a time, in the order the page sent them (restoring, patches, edits, and the build of the form
# itself): a handler that started earlier never finishes later and overwrites the config with the form of before.
IN_ORDER = {"concurrency_id": "parameters-form", "concurrency_limit": 1}


@dataclass
class PageState:
    """The page's form, kept on the server for this page whether the tab was opened or not."""

    user: gr.State  # whose form this page edits, set when the page opens
    latest: gr.State  # the newest form ({path: widget value}) the server has seen from this page; {}: the defaults
    patched: gr.State  # the paths other tabs set ("Use in Parameters"), which a preset asks about before clearing
    message: gr.State  # what the form says when the tab is built: its last form restored, fields set by a tab


class FormPage:
    """The page states and their handlers before (and besides) the form: restoring the user's form when the page
    opens, and another tab's patch applied to the form the page has."""

    def __init__(self, ctx: TabContext, specs: dict[str, FieldSpec], store: FormStore):
        self.ctx, self.specs, self.store = ctx, specs, store
        self.state = PageState(gr.State(LOCAL_USER), gr.State({}), gr.State([]), gr.State(""))

    def values(self, latest: Mapping[str, Any] | None) -> dict[str, Any]:
        """The whole form for a `latest` state (which may hold only some fields, or none)."""
        return default_form(self.specs) | dict(latest or {})

    def config_of(self, values: Mapping[str, Any]) -> dict[str, Any] | None:
        config, data, _ = form_to_config(values, self.specs)
        return shared_config(config, data)

    def on_page_load(self, request: gr.Request) -> dict:
        """Who the page belongs to, and the user's last form kept on the server with its config."""
        state = self.state
        name = user_name(getattr(request, "username", None))
        kept = self.store.load(name, set(self.specs))
        if not kept:
            return {state.user: name, state.message: ""}
        values = self.values(kept)
        return {state.user: name, state.latest: values, state.message: RESTORED,
                self.ctx.config: self.config_of(values)}

    def on_patch(self, patch: dict | None, user: str, latest: dict, patched: list[str]) -> dict:
        """Another tab's fields set in the page's form, kept for the user, and the config made of it. The built form
        (ParametersTab.on_patch) also shows them in its widgets; both do the same to the states."""
        state = self.state
        new_values, message = patched_fields(patch, self.specs)
        values = self.values(latest) | new_values
        note = self.store.save(user, values)
        return {state.latest: values, state.patched: sorted({*patched, *new_values}),
                state.message: f"{message}\n\n{note}" if note else message, self.ctx.config: self.config_of(values)}

    def wire(self) -> None:
        state, ctx = self.state, self.ctx
        outputs = [state.user, state.latest, state.message, ctx.config]
        if ctx.app is not None:
            ctx.app.load(self.on_page_load, outputs=outputs, show_progress="hidden", **IN_ORDER)
        # on_patch reads the patch's fields (config_patch_value): its sequence number makes every press a change.
        ctx.config_patch.change(self.on_patch, inputs=[ctx.config_patch, state.user, state.latest, state.patched],
                                outputs=[state.latest, state.patched, state.message, ctx.config],
                                show_progress="hidden", **IN_ORDER)


def build(ctx: TabContext) -> None:
    """Add the Parameters tab to the current gr.Blocks: the page's form now, the form's widgets when a page first
    opens the tab (gui/tabs/parameters.py, imported then)."""
    presets_dir = ctx.presets_dir or USER_DIR  # the user's presets (--presets-dir), listed and saved there
    with gr.Tab("Parameters", id="parameters") as tab:
        # Inside the tab: a component placed in gr.Tabs beside its tabs shifted the tab bar's labels ('Train' showed
        # as 'Parameters').
        page = FormPage(ctx, editable_fields(), FormStore(ctx.runs_dir))
        page.wire()
        state = page.state

        def content(latest: dict, message: str) -> None:
            import_module("gui.tabs.parameters").content(ctx, presets_dir, page, message, page.values(latest))

        # In the form's order: a page that opens the tab at once gets it built after its form was restored.
        built_on_first_open(tab, "parameters", content, [state.latest, state.message], **IN_ORDER)
