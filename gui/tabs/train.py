"""The Train tab: pick a run (or try the demo), watch it live and control it.

Everything shown is read from the run directory on a 2-second timer (RunManager.status and chart only read
files), so a reloaded page or a restarted GUI re-attaches to running and finished runs alike. The manager keeps one
reader per run for all viewers, which reads only the events appended since the last tick; a viewer keeps only
versions and hashes of what it drew, and the charts and gallery are sent only when they changed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from engine.config.errors import ConfigError
from gui.context import TabContext
from gui.demo import DemoError, start_demo
from gui.run_reader import ChartData
from gui.runner import RunError, RunManager
from gui.runs import PROCESS_LOG, RunHandle, tail_lines
from gui.tensorboard import TensorBoardError
from gui.train_start import start_choice, start_run
from gui.views import train as view

if TYPE_CHECKING:
    from gui.tabs.first_open import TrainServices

LOG_LINES = 200
# Every event costs Gradio's page work that grows with the page's components (it looks each output up in its whole
# layout tree): with the Parameters tab built, a 1-second tick kept the page's renderer busy all the time on the
# 2-core test machine (20.6 s of CPU in 20 s of a running run) and slowed everything else on the page.
TICK_SECONDS = 2.0
_RUNNING = ("running",)
# Gradio's own autoscroll scrolls a textbox once, not on later updates: keep the log at its end as lines arrive,
# unless the user scrolled up to read (then it stays put until they scroll back to the end).
FOLLOW_LOG_JS = """() => {
  const box = document.querySelector('#run-log textarea');
  if (!box) return;
  if (!box.dataset.follow) {
    box.dataset.follow = '1';
    const touched = () => { box.dataset.touched = String(Date.now()); };
    for (const kind of ['wheel', 'touchmove', 'keydown', 'mousedown']) {
      box.addEventListener(kind, touched, {passive: true});
    }
    box.addEventListener('scroll', () => {
      if (Date.now() - Number(box.dataset.touched || 0) > 1000) return;  // moved by an update, not by the user
      box.dataset.follow = box.scrollTop + box.clientHeight >= box.scrollHeight - 8 ? '1' : '0';
    });
  }
  if (box.dataset.follow === '1') requestAnimationFrame(() => { box.scrollTop = box.scrollHeight; });
}"""


def _handle(manager: RunManager, name: str | None) -> RunHandle | None:
    """The run a picker value names; None for none, or for a value that is not one entry of the runs folder: the page
    sends the name, and an HTTP client could send a path ('/', '..') to stop, resume or read a folder elsewhere
    (Gradio's check of the dropdown's choices is the first layer)."""
    if not name or name != Path(name).name or name == "..":
        return None
    run_dir = manager.runs_dir / name
    return RunHandle.from_dir(run_dir) if run_dir.is_dir() else None


def _log_text(handle: RunHandle, log_tail: list[str]) -> str:
    """train.log once the engine writes it; before that (model loading, a crash at start) its stdout."""
    return "\n".join(log_tail or tail_lines(handle.run_dir / PROCESS_LOG, LOG_LINES))


class _Frames:
    """The charts' data frames per run and chart version, built once for all viewers of the run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: dict[Path, tuple[int, Any, Any]] = {}

    def get(self, run_dir: Path, chart: ChartData) -> tuple[Any, Any]:
        with self._lock:
            cached = self._frames.get(run_dir)
            if cached is None or cached[0] != chart.version:
                # None, not an empty frame: a LinePlot first drawn from an empty frame keeps an empty colour scale
                # in Gradio 6.31 and draws every later line without colour.
                rows = chart.rows
                cached = (chart.version, view.loss_frame(rows) if rows else None, view.lr_frame(rows) if rows else None)
                self._frames[run_dir] = cached
            return cached[1], cached[2]


def _default_run(manager: RunManager) -> str | None:
    """On page load: a running run if there is one, else the newest."""
    handles = manager.discover()
    for handle in handles:
        if manager.status(handle, log_lines=0).state in _RUNNING:
            return handle.name
    return handles[0].name if handles else None


@dataclass
class StartSection:
    """The new run's name, Start and Add to queue, and the question asked when a run is going already."""

    run_name: gr.Textbox
    start_button: gr.Button
    enqueue_button: gr.Button
    busy_row: gr.Row
    busy_queue: gr.Button
    busy_both: gr.Button
    busy_cancel: gr.Button


@dataclass
class QueueSection:
    """The queued runs and the control to take one out of the queue."""

    view: gr.Markdown
    row: gr.Row
    pick: gr.Dropdown
    remove: gr.Button


@dataclass
class RunSection:
    """The chosen run: its picker, status, controls, log, charts, samples and checkpoints."""

    picker: gr.Dropdown
    demo_button: gr.Button
    message: gr.Markdown
    error_box: gr.Markdown
    status_line: gr.Markdown
    memory: gr.Markdown  # measured peak memory beside the run's memory plan
    progress: gr.HTML
    buttons: dict[str, gr.Button]  # stop, save, sample, resume
    tensorboard_button: gr.Button
    tensorboard_link: gr.Markdown
    log: gr.Textbox
    loss_plot: gr.LinePlot
    lr_plot: gr.LinePlot
    gallery: gr.Gallery
    checkpoints: gr.Markdown


@dataclass
class ViewerState:
    """What a viewer keeps between ticks, and the tick's timer."""

    cache: gr.State
    samples_key: gr.Textbox
    owners: gr.State
    timer: gr.Timer


def _start_section() -> StartSection:
    with gr.Row(equal_height=True):
        run_name = gr.Textbox(label="New run's name", placeholder="(the output name)", elem_id="train-name",
                              scale=2, info="Start uses the settings of the Parameters tab; the dataset "
                                            "doctor checks them first.")
        start_button = gr.Button("Start training", elem_id="train-start", variant="primary", scale=1)
        enqueue_button = gr.Button("Add to queue", elem_id="train-enqueue", scale=1)
    # Shown when Start is pressed while a run is going: two runs on one GPU only when the user says so.
    with gr.Row(visible=False, elem_id="train-busy") as busy_row:
        busy_queue = gr.Button("Queue it (start after the running run)", elem_id="train-busy-queue",
                               variant="primary")
        busy_both = gr.Button("Start both at once (they share the GPU)", elem_id="train-busy-both")
        busy_cancel = gr.Button("Cancel", elem_id="train-busy-cancel")
    return StartSection(run_name, start_button, enqueue_button, busy_row, busy_queue, busy_both, busy_cancel)


def _queue_section() -> QueueSection:
    queue_view = gr.Markdown(elem_id="run-queue")
    with gr.Row(visible=False, elem_id="queue-controls") as queue_row:
        queue_pick = gr.Dropdown(choices=[], value=None, label="Queued run", elem_id="queue-pick", scale=3)
        queue_remove = gr.Button("Remove from queue", elem_id="queue-remove", scale=1)
    return QueueSection(queue_view, queue_row, queue_pick, queue_remove)


def _run_section(manager: RunManager) -> RunSection:
    with gr.Row():
        picker = gr.Dropdown(choices=view.run_choices(manager.discover()), value=None, label="Run",
                             elem_id="run-picker", scale=3, info="Runs in the runs folder, newest first.")
        demo_button = gr.Button("Try the demo", elem_id="try-demo", variant="primary", scale=1)
    message = gr.Markdown(elem_id="train-message")
    error_box = gr.Markdown(visible=False, elem_id="run-error")
    status_line = gr.Markdown("No run selected. New here? **Try the demo**: a tiny model that trains on a "
                              "CPU in about a minute.", elem_id="run-status")
    memory = gr.Markdown(elem_id="run-memory")
    progress = gr.HTML(elem_id="run-progress")
    with gr.Row():
        buttons = {"stop": gr.Button("Stop", elem_id="run-stop", interactive=False),
                   "save": gr.Button("Save now", elem_id="run-save", interactive=False),
                   "sample": gr.Button("Sample now", elem_id="run-sample", interactive=False),
                   "resume": gr.Button("Resume", elem_id="run-resume", interactive=False)}
        tensorboard_button = gr.Button("Open TensorBoard", elem_id="run-tensorboard")
    tensorboard_link = gr.Markdown(elem_id="tensorboard-link")
    log = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False, autoscroll=True, elem_id="run-log")
    with gr.Row():
        loss_plot = gr.LinePlot(None, x="step", y="value", color="series", title="Loss",
                                color_map=view.LOSS_COLORS,
                                elem_id="loss-chart", height=260)
        lr_plot = gr.LinePlot(None, x="step", y="lr", title="Learning rate", elem_id="lr-chart",
                              height=260)
    gallery = gr.Gallery(label="Samples", columns=4, height=280, elem_id="run-samples")
    checkpoints = gr.Markdown(elem_id="run-checkpoints")
    return RunSection(picker, demo_button, message, error_box, status_line, memory, progress, buttons,
                      tensorboard_button, tensorboard_link, log, loss_plot, lr_plot, gallery, checkpoints)


def _viewer_state() -> ViewerState:
    cache = gr.State({})
    # The samples' fingerprint; its change event draws the gallery. A hidden component, not a gr.State: the page
    # runs a state's change event only after queued events, and the tick is not queued.
    samples_key = gr.Textbox(visible="hidden", elem_id="run-samples-key")
    # Which run each of these texts is about (None: about no run), so a text about another run goes away
    # when the picker changes (view.stale_texts).
    owners = gr.State({"message": None, "tensorboard": None})
    timer = gr.Timer(TICK_SECONDS)
    return ViewerState(cache, samples_key, owners, timer)


_FRAMES = _Frames()  # one for all pages (and apps) of this process


def content(ctx: TabContext, services: TrainServices) -> None:
    """The tab's sections and their events, for one page, built when it first opens the tab (gui/tabs/first_open.py,
    which also makes the `services` every page shares)."""
    start = _start_section()
    queue = _queue_section()
    run = _run_section(services.manager)
    viewer = _viewer_state()
    TrainTab(ctx, services, start, queue, run, viewer).wire()


class TrainTab:
    """The tab's event handlers, over its sections."""

    def __init__(self, ctx: TabContext, services: TrainServices, start: StartSection, queue: QueueSection,
                 run: RunSection, viewer: ViewerState):
        self.ctx, self.manager = ctx, services.manager
        self.start, self.queue, self.run, self.viewer = start, queue, run, viewer
        self.frames = _FRAMES
        self.boards = services.boards

    def run_view(self, name: str, handle: RunHandle, seen: dict) -> tuple[dict, dict]:
        """The run's part of a tick: the updates, and what the viewer keeps to compare next time (hashes and the
        chart's version, never the rows).

        Text parts are sent every tick as plain values, which Gradio passes through almost for free; a skipped
        output or a component update (gr.Button(...)) costs it a component rebuild. So only the charts, thousands
        of values, are skipped while unchanged; an unchanged button gets its label back (a plain value, which
        leaves it as it is). The gallery is no output at all (skipping it costs Gradio 3 ms, its data model's JSON
        schema): the tick sets samples_key, whose change event draws it."""
        r = self.run
        status = self.manager.status(handle, log_lines=LOG_LINES)
        chart = self.manager.chart(handle)
        flags = (status.state in _RUNNING, view.can_resume(status))
        error_text = view.error_markdown(status)
        drawn = {"error": hash(error_text), "flags": flags, "chart": chart.version}
        updates: dict[Any, Any] = {
            r.status_line: view.status_markdown(name, status), r.memory: view.memory_markdown(status),
            r.progress: view.progress_html(status),
            r.log: _log_text(handle, status.log_tail), r.checkpoints: view.checkpoints_markdown(status),
            r.error_box: error_text if drawn["error"] == seen.get("error") else gr.Markdown(error_text,
                                                                                             visible=bool(error_text)),
        }
        for key, button in r.buttons.items():
            enabled = flags[1] if key == "resume" else flags[0]
            updates[button] = button.value if flags == seen.get("flags") else gr.Button(interactive=enabled)
        if drawn["chart"] != seen.get("chart"):
            updates[r.loss_plot], updates[r.lr_plot] = self.frames.get(handle.run_dir, chart)
        updates[self.viewer.samples_key] = str(hash((name, tuple(status.samples))))
        return updates, drawn

    def tick(self, name: str | None, seen: dict) -> dict:
        q, cache = self.queue, self.viewer.cache
        names = [handle.name for handle in self.manager.discover()]
        updates: dict[Any, Any] = {}
        if names != seen.get("names"):
            updates[self.run.picker] = gr.Dropdown(choices=names)
        queued = self.manager.queue()
        updates[q.view] = view.queue_markdown(queued)
        queue_names = view.queue_choices(queued)
        if queue_names != seen.get("queue"):
            updates[q.pick] = gr.Dropdown(choices=queue_names, value=queue_names[0] if queue_names else None)
            updates[q.row] = gr.Row(visible=bool(queue_names))
        seen = {**seen, "names": names, "queue": queue_names}
        handle = _handle(self.manager, name)
        if handle is None:
            return updates | {cache: seen, self.viewer.samples_key: ""}
        if seen.get("run") != name:
            seen = {"run": name, "names": names, "queue": queue_names}  # another run: every part is drawn anew
        run_updates, drawn = self.run_view(name, handle, seen)
        return updates | run_updates | {cache: {**seen, **drawn}}

    def on_demo(self, owned: dict) -> Iterator[dict]:
        message, owners = self.run.message, self.viewer.owners
        yield {message: "Building the tiny demo model and images (about 20 s the first time)…",
               owners: {**owned, "message": None}}
        try:
            handle = start_demo(self.manager)
        except (DemoError, RunError, ConfigError, OSError) as error:
            yield {message: f"**The demo could not start:** {error}"}
            return
        names = [entry.name for entry in self.manager.discover()]
        yield {message: f"Started the demo run `{handle.name}`.", owners: {**owned, "message": handle.name},
               self.run.picker: gr.Dropdown(choices=names, value=handle.name)}

    def on_start(self, config: dict | None, name: str, owned: dict, mode: str) -> dict:
        busy_row, message, owners = self.start.busy_row, self.run.message, self.viewer.owners
        updates: dict[Any, Any] = {busy_row: gr.Row(visible=False), owners: {**owned, "message": None}}
        running = [handle.name for handle in self.manager.running()]
        if start_choice(running, mode) == "ask":
            listed = ", ".join(f"`{run}`" for run in running)
            return updates | {busy_row: gr.Row(visible=True), message: (
                f"**{listed} {'is' if len(running) == 1 else 'are'} running.** Queue this run to start when it has "
                "ended, or start both at once: they then share the GPU's memory and each trains slower.")}
        try:
            result = start_run(self.manager, config, name=name, queue=mode == "queue", alongside=mode == "both",
                               roots=self.ctx.roots)
        except (RunError, ConfigError, OSError) as error:
            return updates | {message: f"**Could not start:** {error}"}
        updates[message] = result.message
        if result.handle is not None and result.handle.name not in view.queue_choices(self.manager.queue()):
            names = [entry.name for entry in self.manager.discover()]
            updates[self.run.picker] = gr.Dropdown(choices=names, value=result.handle.name)
            updates[owners] = {**owned, "message": result.handle.name}
        return updates

    def on_remove(self, queued: str | None, owned: dict) -> dict:
        message = self.run.message
        handle = _handle(self.manager, queued)
        updates: dict[Any, Any] = {self.viewer.owners: {**owned, "message": None}}
        if handle is None:
            return updates | {message: "Choose a queued run first."}
        if not self.manager.dequeue(handle):
            return updates | {message: f"`{queued}` is not in the queue any more (it may have started)."}
        return updates | {message: f"Removed `{queued}` from the queue (its run folder is deleted; it never started)."}

    def on_tensorboard(self, name: str | None, owned: dict) -> tuple[str, dict]:
        handle = _handle(self.manager, name)
        if handle is None:
            return "Choose a run first.", {**owned, "tensorboard": None}
        try:
            url = self.boards.url_for(view.log_dir(handle))
        except (TensorBoardError, ConfigError, ValueError, OSError) as error:
            return f"**TensorBoard could not start:** {error}", {**owned, "tensorboard": name}
        return view.tensorboard_markdown(name, url), {**owned, "tensorboard": name}

    def control(self, action: Callable[[RunHandle], Any], done: str
                ) -> Callable[[str | None, dict], tuple[str, dict]]:
        manager = self.manager

        def run(name: str | None, owned: dict) -> tuple[str, dict]:
            handle = _handle(manager, name)
            if handle is None:
                return "Choose a run first.", {**owned, "message": None}
            try:
                action(handle)
            except (RunError, ConfigError, OSError) as error:
                return f"**Could not {done}:** {error}", {**owned, "message": name}
            return f"Asked `{name}` to {done}.", {**owned, "message": name}
        return run

    def drop_stale(self, name: str | None, owned: dict) -> dict:
        """The picker shows another run: clear what was said about the one before."""
        stale = view.stale_texts(owned, name)
        texts = {"message": self.run.message, "tensorboard": self.run.tensorboard_link}
        return {texts[key]: "" for key in stale} | {self.viewer.owners: {**owned, **dict.fromkeys(stale)}}

    def resume(self, handle: RunHandle) -> None:
        state = self.manager.status(handle, log_lines=0).resume_state
        if not state:
            raise RunError("this run has no saved state to resume from")
        self.manager.resume(handle, state)

    def draw_samples(self, name: str | None) -> gr.Gallery:
        handle = _handle(self.manager, name)
        if handle is None:
            return gr.Gallery(value=[], label="Samples")
        status = self.manager.status(handle, log_lines=0)
        return gr.Gallery(value=view.gallery_items(status), label=view.gallery_label(status))

    def wire(self) -> None:
        """The tab's events, in the order the page registers them."""
        s, q, r, v, manager = self.start, self.queue, self.run, self.viewer, self.manager
        outputs = [r.picker, v.cache, v.samples_key, q.view, q.pick, q.row, r.status_line, r.memory, r.progress,
                   r.error_box, r.log, r.checkpoints, r.loss_plot, r.lr_plot, *r.buttons.values()]
        v.timer.tick(self.tick, inputs=[r.picker, v.cache], outputs=outputs, show_progress="hidden", queue=False)
        r.picker.change(self.tick, inputs=[r.picker, v.cache], outputs=outputs, show_progress="hidden")
        r.picker.change(self.drop_stale, inputs=[r.picker, v.owners], outputs=[r.message, r.tensorboard_link, v.owners],
                        show_progress="hidden", queue=False)
        r.log.change(None, js=FOLLOW_LOG_JS, queue=False)
        v.samples_key.change(self.draw_samples, inputs=r.picker, outputs=r.gallery, show_progress="hidden",
                             queue=False)
        gr.on(None, lambda: gr.Dropdown(choices=[h.name for h in manager.discover()], value=_default_run(manager)),
              outputs=r.picker)
        r.demo_button.click(self.on_demo, inputs=v.owners, outputs=[r.message, r.picker, v.owners])
        start_outputs = [r.message, r.picker, s.busy_row, v.owners]
        for button, mode in ((s.start_button, "start"), (s.enqueue_button, "queue"), (s.busy_queue, "queue"),
                             (s.busy_both, "both")):
            button.click(lambda config, name, owned, mode=mode: self.on_start(config, name, owned, mode),
                         inputs=[self.ctx.config, s.run_name, v.owners], outputs=start_outputs)
        s.busy_cancel.click(lambda: (gr.Row(visible=False), "Not started."), outputs=[s.busy_row, r.message])
        q.remove.click(self.on_remove, inputs=[q.pick, v.owners], outputs=[r.message, v.owners])
        r.tensorboard_button.click(self.on_tensorboard, inputs=[r.picker, v.owners],
                                   outputs=[r.tensorboard_link, v.owners])
        for key, action, done in (("stop", manager.stop, "stop (it saves a resumable state first)"),
                                  ("save", manager.save_now, "save now"), ("sample", manager.sample_now, "sample now"),
                                  ("resume", self.resume, "resume")):
            r.buttons[key].click(self.control(action, done), inputs=[r.picker, v.owners], outputs=[r.message, v.owners])
