"""The interface every captioner implements, and the registry the CLI and the GUI pick them from.

A captioner turns a batch of RGB images into `CaptionOutput`s. It is built from a model folder (or a hub id
resolved by `engine.caption.models`) and its own options dataclass. Folder handling (which files, write modes,
progress, summaries) is the runner's job, not the captioner's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image


@dataclass
class CaptionOutput:
    """What a captioner produced for one image."""

    text: str  # what is written to the caption file (tags already joined for taggers)
    tags: list[str] = field(default_factory=list)  # taggers only: the tags in output order (for append/frequency)
    scores: dict[str, float] = field(default_factory=dict)  # taggers only: tag -> probability


class Captioner(Protocol):
    """What the folder runner needs. A captioner may also offer `preprocess(image) -> item` and
    `caption_preprocessed(items) -> list[CaptionOutput]`: the runner then preprocesses in its worker threads,
    overlapped with inference, instead of on the thread that runs the model."""

    name: str
    separator: str  # how this captioner's text splits into tags when appending ("" for sentence captioners)

    def caption(self, images: Sequence[Image.Image]) -> list[CaptionOutput]: ...

    def describe_device(self) -> str:
        """Where inference runs, for the log (e.g. "CPU", "CUDA (onnxruntime-gpu)")."""
        ...


@dataclass(frozen=True)
class CaptionerEntry:
    """How to build a captioner: its options type and a builder taking (model folder, options)."""

    default_model: str
    options_type: type
    build: Callable[[str, Any], Captioner]
    known_models: tuple[str, ...] = ()  # offered by name in the GUI
    # What a local model folder must hold, in words for messages (e.g. a machine that cannot download).
    model_files: str = "config.json, the weights (model.safetensors) and the processor/tokenizer files"
    allow_patterns: tuple[str, ...] | None = None  # what a download fetches (None: the whole repository)
    metadata_field: str = "caption"  # which key of a fine-tune metadata entry its output fills


# name -> entry; filled by engine.caption.registry so that importing this module stays light.
CAPTIONERS: dict[str, CaptionerEntry] = {}
