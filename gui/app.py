"""Assembles the browser app from its tabs. `app.py` at the repository root parses arguments and launches it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from gui.tabs import parameters, train

TITLE = "Atelier"


@dataclass(frozen=True)
class AppOptions:
    runs_dir: Path
    presets_dir: Path | None = None


def build_app(options: AppOptions) -> gr.Blocks:
    # analytics_enabled=False: no calls home, ever (the app must work on an offline machine).
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nTrain Stable Diffusion LoRA, DreamBooth and Textual Inversion models. Runs are "
                    f"kept in `{options.runs_dir}`.", elem_id="app-header")
        with gr.Tabs():
            parameters.build(options.presets_dir)
            train.build(options.runs_dir)
    return app
