"""The Tools tab (being built)."""

from __future__ import annotations

import gradio as gr

from gui.context import TabContext


def build(ctx: TabContext) -> None:
    with gr.Tab("Tools", id="tools"):
        gr.Markdown("Coming in this session.")
