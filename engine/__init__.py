"""Atelier's engine: configuration, data, models, training and captioning. Never imports gradio or gui."""

__version__ = "0.1.0"
