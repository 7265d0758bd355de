"""The Compare tab: a run's checkpoints side by side at several strengths and seeds (`python -m engine compare` in a
subprocess), the grid filling in as cells are made, a cell opened full size with its settings, the grid saved."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from gui.browse import PathNotAllowed
from gui.context import TabContext
from gui.jobs import FolderJobs, JobUpdate
from gui.runs import discover
from gui.views import compare as view

_PLACEHOLDER_SIDE = 8
_PENDING_GRAY = 225


@dataclass
class CompareForm:
    run: gr.Dropdown
    refresh: gr.Button
    note: gr.Markdown
    checkpoints: gr.CheckboxGroup
    prompts: gr.Textbox
    strengths: gr.Textbox
    seeds: gr.Textbox
    render: gr.Button
    stop: gr.Button
    progress: gr.Markdown


@dataclass
class CompareGrid:
    """The grid being filled in, the opened cell and the finished grid picture."""

    state: gr.State  # gui.views.compare.grid_state of the newest comparison
    shown: gr.State  # the cells the gallery shows, in its order (None for a pending one), for clicks
    prompt: gr.Dropdown
    heads: gr.Markdown
    gallery: gr.Gallery
    cell_image: gr.Image
    cell_settings: gr.Markdown
    grid_image: gr.Image
    save: gr.DownloadButton


def _form() -> CompareForm:
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], scale=4, elem_id="compare-run",
                          info="A LoRA run of the Train tab; its saved checkpoints are the grid's columns.")
        refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="compare-refresh")
    note = gr.Markdown(elem_id="compare-note")
    checkpoints = gr.CheckboxGroup(label="Checkpoints", choices=[], elem_id="compare-checkpoints")
    prompts = gr.Textbox(label="Prompts", lines=3, elem_id="compare-prompts",
                         info="One a line, in sd-scripts' format ('a dog --w 512 --h 512 --s 20 --d 5'); "
                              "the run's sample prompts by default.")
    with gr.Row():
        strengths = gr.Textbox(label="Strengths", value="0,0.5,0.8,1", elem_id="compare-strengths",
                               info="The LoRA's strength per row, comma-separated; 0 is the base model.")
        seeds = gr.Textbox(label="Seeds", value="", elem_id="compare-seeds",
                           info="Comma-separated; empty: each prompt's own seed (--d), else one drawn for it.")
    with gr.Row():
        render = gr.Button("Render grid", variant="primary", elem_id="compare-render")
        stop = gr.Button("Stop", elem_id="compare-stop")
    progress = gr.Markdown(elem_id="compare-progress")
    return CompareForm(run, refresh, note, checkpoints, prompts, strengths, seeds, render, stop, progress)


def _grid() -> CompareGrid:
    state, shown = gr.State({}), gr.State([])
    prompt = gr.Dropdown(label="Prompt", choices=[], elem_id="compare-prompt")
    heads = gr.Markdown(elem_id="compare-heads")
    gallery = gr.Gallery(label="Grid (click a cell to open it)", columns=4, height=420, object_fit="contain",
                         allow_preview=False, elem_id="compare-gallery")
    with gr.Row():
        cell_image = gr.Image(label="Cell", type="filepath", interactive=False, elem_id="compare-cell-image")
        cell_settings = gr.Markdown(elem_id="compare-cell-settings")
    grid_image = gr.Image(label="Grid picture", type="filepath", interactive=False, elem_id="compare-grid")
    save = gr.DownloadButton("Save grid", visible=False, elem_id="compare-save")
    return CompareGrid(state, shown, prompt, heads, gallery, cell_image, cell_settings, grid_image, save)


def content(ctx: TabContext, running: FolderJobs, tab: gr.Tab) -> None:
    """The tab's form, grid and events, for one page, built when it first opens the tab (gui/tabs/first_open.py).
    `running`: run folder -> its comparison (the Stop button's target), one for all pages."""
    gr.Markdown("Render a run's checkpoints side by side: one column per checkpoint, one row per strength and "
                "seed, with the run's sampler. The grids and an index are saved in the run's `compare` folder.",
                elem_id="compare-intro")
    form = _form()
    grid = _grid()
    CompareTab(ctx, form, grid, running).wire(tab)


def _placeholder() -> Any:
    from PIL import Image

    return Image.new("RGB", (_PLACEHOLDER_SIDE, _PLACEHOLDER_SIDE), (_PENDING_GRAY,) * 3)


class CompareTab:
    """The tab's event handlers."""

    def __init__(self, ctx: TabContext, form: CompareForm, grid: CompareGrid, running: FolderJobs):
        self.ctx, self.form, self.grid = ctx, form, grid
        self.running = running  # run folder -> its comparison (the Stop button's target)

    def runs(self, current: str | None) -> dict:
        choices = [(handle.name, str(handle.run_dir)) for handle in discover(self.ctx.runs_dir)]
        values = [value for _, value in choices]
        chosen = current if current in values else (values[0] if values else None)
        return {self.form.run: gr.Dropdown(choices=choices, value=chosen)}

    def pick(self, run_dir: str | None) -> dict:
        f = self.form
        if not run_dir:
            return {f.note: "No run yet: train one in the Train tab.", f.checkpoints: gr.CheckboxGroup(choices=[]),
                    f.prompts: ""}
        pick = view.read_run(run_dir)
        choices = [(view.checkpoint_choice(checkpoint), str(checkpoint.path)) for checkpoint in pick.checkpoints]
        note = f"**{pick.problem}**" if pick.problem else \
            (f"Prompts: the run's prompt file `{pick.prompt_file}`." if pick.prompt_file else "")
        return {f.note: note, f.checkpoints: gr.CheckboxGroup(choices=choices, value=[value for _, value in choices]),
                f.prompts: "\n".join(pick.prompts)}

    def render(self, values: dict) -> Iterator[dict]:
        f, g = self.form, self.grid
        run_dir = values[f.run] or ""
        try:
            self._check_run(run_dir)
            out = view.out_folder(run_dir)
            request = view.CompareRequest(run_dir, values[f.checkpoints] or [], values[f.prompts] or "",
                                          values[f.strengths] or "", values[f.seeds] or "")
            args = view.compare_args(request, view.read_run(run_dir), out)
        except (ValueError, PathNotAllowed) as error:
            yield {f.progress: f"**{error}**"}
            return
        with self.running.claim(run_dir, args) as job:
            if job is None:
                yield {f.progress: "**A grid of this run is being rendered already.**"}
                return
            prompt_index, shown_key = 0, None
            for update in job.follow():
                state = view.grid_state(update.events)
                key = (len(state["cells"]), tuple(state["grids"]), bool(state["prompts"]))
                text = self._progress(update)
                if key == shown_key:
                    yield {f.progress: text}
                    continue
                shown_key = key
                # The gallery follows the state (state.change -> show): a generator's outputs reach the page as
                # diffs, and a gallery whose placeholders were diffed into images kept showing the placeholders.
                yield {f.progress: text, g.state: state, **self._prompt_update(state, prompt_index)}

    def _check_run(self, run_dir: str) -> None:
        """A run the tab listed: a folder of the runs folder (a forged value from the page is refused)."""
        if not run_dir:
            raise ValueError("Choose a run first.")
        if Path(run_dir).resolve().parent != Path(self.ctx.runs_dir).resolve():
            raise ValueError(f"{run_dir} is not a run of {self.ctx.runs_dir}.")
        self.ctx.roots.check(run_dir, "Run")

    def _progress(self, update: JobUpdate) -> str:
        if update.finished:
            done = update.last("done") or {}
            if update.ok:
                return f"Done: {done.get('cells', 0)} cells; grids and index.json in `{done.get('out', '')}`."
            if done.get("stopped"):
                return f"Stopped after {done.get('cells', 0)} cell(s); they are kept."
            return f"**Rendering failed:** {update.error_text()}"
        event = update.last("progress")
        if event is None:
            return "Loading the model…"
        return view.progress_text(event.get("done", 0), event.get("total", 0), event.get("rate"), event.get("eta_s"))

    def _prompt_update(self, state: dict, prompt_index: int) -> dict:
        choices = view.prompt_choices(state)
        return {self.grid.prompt: gr.Dropdown(choices=choices, value=prompt_index if choices else None)}

    def show(self, state: dict, prompt_index: int | None) -> dict:
        """The gallery, heads and grid picture of one prompt of the comparison."""
        g = self.grid
        index = int(prompt_index or 0)
        cells = view.grid_cells(state, index) if state else []
        items = [(cell["file"], view.cell_caption(cell)) if cell else (_placeholder(), view.PENDING)
                 for cell in cells]
        grids = state.get("grids", []) if state else []
        grid_file = grids[index] if index < len(grids) else None
        columns = max(1, len(state.get("checkpoints", []))) if state else 4
        heads = "\n\n".join(text for text in (view.column_heads(state), view.row_heads(state, index)) if text) \
            if state else ""
        return {g.gallery: gr.Gallery(value=items, columns=columns), g.shown: cells, g.heads: heads,
                g.grid_image: grid_file, g.save: gr.DownloadButton(value=grid_file, visible=grid_file is not None)}

    def open_cell(self, shown: list, event: gr.SelectData) -> dict:
        g = self.grid
        cell = shown[event.index] if 0 <= event.index < len(shown) else None
        if cell is None:
            return {g.cell_image: None, g.cell_settings: "This cell is not made yet."}
        return {g.cell_image: cell["file"], g.cell_settings: view.cell_settings(cell)}

    def stop(self, run_dir: str | None) -> str:
        if not run_dir or not self.running.stop(run_dir):
            return "No grid of this run is being rendered."
        return "Stopping…"

    def wire(self, tab: gr.Tab) -> None:
        f, g = self.form, self.grid
        # The runs as they are now: when the tab is built (its first select, which came before these events) and
        # on each later select.
        for trigger in (None, tab.select, f.refresh.click):
            gr.on(trigger, self.runs, inputs=f.run, outputs=f.run, show_progress="hidden")
        f.run.change(self.pick, inputs=f.run, outputs=[f.note, f.checkpoints, f.prompts], show_progress="hidden")
        form = {f.run, f.checkpoints, f.prompts, f.strengths, f.seeds}
        f.render.click(self.render, inputs=form, outputs=[f.progress, g.state, g.prompt])
        shown = [g.gallery, g.shown, g.heads, g.grid_image, g.save]
        g.state.change(self.show, inputs=[g.state, g.prompt], outputs=shown, show_progress="hidden")
        f.stop.click(self.stop, inputs=f.run, outputs=f.progress)
        g.prompt.input(self.show, inputs=[g.state, g.prompt], outputs=shown, show_progress="hidden")
        g.gallery.select(self.open_cell, inputs=g.shown, outputs=[g.cell_image, g.cell_settings],
                         show_progress="hidden")
