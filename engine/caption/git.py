"""GIT captioning (transformers ``GitForCausalLM``), after sd-scripts' ``finetune/make_captions_by_git.py``.

Like sd-scripts: greedy decoding with ``max_length`` 50 and the folder's own processor. Unlike sd-scripts, the
"remove words" cleaning is on by default: GIT-textcaps reads text in images ("a sign that says stop") and those
phrases make poor training captions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.caption.base import CaptionOutput
from engine.caption.models import (
    caption_in_batches,
    check_model_folder,
    check_model_type,
    describe_torch_device,
    load_model,
    load_processor,
    resolve_device,
)
from engine.data.images import to_rgb

if TYPE_CHECKING:
    from PIL import Image

GIT_DEFAULT = "microsoft/git-large-textcaps"
GIT_MODELS = (GIT_DEFAULT, "microsoft/git-base-textcaps", "microsoft/git-large-coco", "microsoft/git-base-coco")
GIT_ALLOW_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.bin"]

# sd-scripts' PATTERN_REPLACE (make_captions_by_git.py), verbatim and in its order: GIT-textcaps likes to quote
# text it thinks it reads ("with the words xxx", "that says xxx"), which is mostly misread noise.
REMOVE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(
        r'(has|with|and) the (words?|letters?|name) (" ?[^"]*"|\w+)( ?(is )?(on|in) (the |her |their |him )?\w+)?'
    ),
    re.compile(r'(with a sign )?that says ?(" ?[^"]*"|\w+)( ?on it)?'),
    re.compile(r"(with a sign )?that says ?(' ?(i'm)?[^']*'|\w+)( ?on it)?"),
    re.compile(r"with the number \d+ on (it|\w+ \w+)"),
    re.compile(r'with the words "'),
    re.compile(r"word \w+ on it"),
    re.compile(r"that says the word \w+ on it"),
    re.compile("that says'the word \"( on it)?"),
)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")


def remove_words(caption: str) -> str:
    """Drop sd-scripts' "text in the image" phrases from ``caption``, then tidy the spaces they leave behind.

    >>> remove_words("a red sign that says stop on a pole")
    'a red sign on a pole'
    """
    for pattern in REMOVE_PATTERNS:
        caption = pattern.sub("", caption)
    # sd-scripts leaves double and trailing spaces here; they would end up in the caption files.
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(caption.split()))


@dataclass(frozen=True)
class GitOptions:
    """How GIT generates; defaults are sd-scripts' ``make_captions_by_git.py`` ones (except remove_words)."""

    max_length: int = 50  # in tokens, counting the start token
    num_beams: int = 1  # 1 = greedy, as sd-scripts
    remove_words: bool = True
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.max_length < 2 or self.num_beams < 1 or self.batch_size < 1:
            raise ValueError("need max_length >= 2, num_beams >= 1 and batch_size >= 1")


class GitCaptioner:
    """Captions images with a GIT model folder; see `GitOptions`."""

    name = "git"
    separator = ""  # sentences, not tags

    def __init__(self, model_dir: str | Path, options: GitOptions | None = None, *, device: str = "auto") -> None:
        folder = check_model_folder(Path(model_dir))
        check_model_type(folder, "git", "GIT")
        self.options = options or GitOptions()
        self.device = resolve_device(device)
        self.processor = load_processor(folder, "GitProcessor", "CLIPImageProcessorPil")
        self.model = load_model(folder, "GitForCausalLM", self.device)

    def describe_device(self) -> str:
        return describe_torch_device(self.device)

    def caption(self, images: Sequence[Image.Image]) -> list[CaptionOutput]:
        """Caption ``images`` in chunks of ``batch_size``, in order."""
        return caption_in_batches(images, self.options.batch_size, self._caption_batch)

    def _caption_batch(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        o = self.options
        pixels = self.processor(images=[to_rgb(im) for im in images], return_tensors="pt").pixel_values
        with torch.inference_mode():
            ids = self.model.generate(
                pixel_values=pixels.to(self.device), max_length=o.max_length, num_beams=o.num_beams, do_sample=False
            )
        texts = [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return [remove_words(t) for t in texts] if o.remove_words else texts
