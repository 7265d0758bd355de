"""The tabs a page builds when it first opens them (gui/deferred.py): every tab but the first, Dataset.

For each: what all pages share, made when the app starts (running jobs, the run queue, TensorBoards), and the tab's
module (gui/tabs/<tab>.py), whose `content` builds the tab for one page. That module, with its views, is imported
on the first opening, not at start: together they were most of the GUI's import time. The Parameters tab's part made
at start (the page's form, which other tabs read and write before it is opened) is gui/tabs/parameters_page.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from types import ModuleType

import gradio as gr

from gui.context import TabContext
from gui.deferred import built_on_first_open, tab_built_on_first_open
from gui.jobs import FolderJobs
from gui.runner import RunManager
from gui.tensorboard import TensorBoards
from gui.train_start import start_queue_worker


def tab_module(name: str) -> ModuleType:
    """gui/tabs/<name>.py, imported on the first call."""
    return import_module(f"gui.tabs.{name}")


def captioning(ctx: TabContext) -> None:
    jobs = FolderJobs()  # one for all pages: a reloaded page's Stop finds the job an earlier page started
    tab_built_on_first_open("Captioning", "captioning", lambda: tab_module("captioning").content(ctx, jobs))


def regularization(ctx: TabContext) -> None:
    running = FolderJobs()  # class folder -> its generation job (the Stop button's target)
    tab_built_on_first_open("Regularization", "regularization",
                            lambda: tab_module("regularization").content(ctx, running))


@dataclass(frozen=True)
class TrainServices:
    """What every page's Train tab shares: the runs and their queue, and the TensorBoards it started."""

    manager: RunManager
    boards: TensorBoards


def train_services(runs_dir: Path) -> TrainServices:
    """The runs of `runs_dir`, with the queue running from now on (queued runs start whether a page is open or not)."""
    manager = RunManager(runs_dir)
    start_queue_worker(manager)
    gr.set_static_paths([manager.runs_dir])  # sample images are served from the run directories
    return TrainServices(manager, TensorBoards())


def train(ctx: TabContext) -> None:
    services = train_services(ctx.runs_dir)
    tab_built_on_first_open("Train", "train", lambda: tab_module("train").content(ctx, services))


def compare(ctx: TabContext) -> None:
    running = FolderJobs()  # run folder -> its comparison (the Stop button's target)
    with gr.Tab("Compare", id="compare") as tab:
        built_on_first_open(tab, "compare", lambda: tab_module("compare").content(ctx, running, tab))


def tools(ctx: TabContext) -> None:
    tab_built_on_first_open("Tools", "tools", lambda: tab_module("tools").content(ctx))
