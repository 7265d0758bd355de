"""Assembles the browser app from its tabs. `app.py` at the repository root parses arguments and launches it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from engine.config.io import default_config_dict
from gui.context import TabContext
from gui.file_browser import FileRoots
from gui.tabs import captioning, dataset, parameters, regularization, tools, train

TITLE = "Atelier"
# In the order a newcomer works: prepare images, caption them, add regularization, set parameters, train.
TABS = (dataset, captioning, regularization, parameters, train, tools)


@dataclass(frozen=True)
class AppOptions:
    runs_dir: Path
    presets_dir: Path | None = None
    allowed_paths: tuple[Path, ...] = field(default_factory=tuple)  # besides the home folder

    def roots(self) -> FileRoots:
        """What the file browser may show and the page may load images from: home, --allow-path, the runs."""
        return FileRoots.from_paths([*self.allowed_paths, self.runs_dir])


def build_app(options: AppOptions) -> gr.Blocks:
    # analytics_enabled=False: no calls home, ever (the app must work on an offline machine).
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nTrain Stable Diffusion LoRA, DreamBooth and Textual Inversion models. Runs are "
                    f"kept in `{options.runs_dir}`.", elem_id="app-header")
        ctx = TabContext(runs_dir=options.runs_dir, presets_dir=options.presets_dir,
                         roots=options.roots(),
                         config=gr.State(default_config_dict()), config_patch=gr.State(None))
        with gr.Tabs():
            for tab in TABS:
                tab.build(ctx)
    return app
