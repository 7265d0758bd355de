"""BLIP captioning (transformers ``BlipForConditionalGeneration``), after sd-scripts' ``finetune/make_captions.py``.

Defaults follow sd-scripts: nucleus sampling (top_p 0.9) unless ``beam_search``, min_length 5, max_length 75,
seed 42. sd-scripts runs Salesforce's original BLIP code; here the same model comes from the hub in transformers
form (``Salesforce/blip-image-captioning-large``), so preprocessing is the folder's own processor config.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

BLIP_DEFAULT = "Salesforce/blip-image-captioning-large"
BLIP_MODELS = (BLIP_DEFAULT, "Salesforce/blip-image-captioning-base")
# What a download needs: configs, tokenizer vocab and the PyTorch weights (models.resolve_model skips the .bin copy
# when safetensors exist, and TF/Flax weights always).
BLIP_ALLOW_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.bin"]

# BLIP's own decoder samples with this penalty (sd-scripts' finetune/blip/blip.py hard-codes it); beam search uses 1.0.
_SAMPLING_REPETITION_PENALTY = 1.1
_SAMPLING_TOP_K = 50  # transformers' historical default, which sd-scripts' sampling ran with


@dataclass(frozen=True)
class BlipOptions:
    """How BLIP generates; defaults are sd-scripts' ``make_captions.py`` ones."""

    num_beams: int = 1
    beam_search: bool = False  # off = nucleus sampling with top_p
    top_p: float = 0.9
    min_length: int = 5  # in tokens, counting the start token and the prompt (as BLIP does)
    max_length: int = 75
    prompt: str = ""  # conditional captioning, e.g. "a photo of": the caption then starts with it
    seed: int = 42
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.batch_size < 1:
            raise ValueError("num_beams and batch_size must be at least 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length} and {self.max_length}")


class BlipCaptioner:
    """Captions images with a BLIP model folder; see `BlipOptions`."""

    name = "blip"
    separator = ""  # sentences, not tags

    def __init__(self, model_dir: str | Path, options: BlipOptions | None = None, *, device: str = "auto") -> None:
        folder = check_model_folder(Path(model_dir))
        check_model_type(folder, "blip", "BLIP")
        self.options = options or BlipOptions()
        self.device = resolve_device(device)
        self.processor = load_processor(folder, "BlipProcessor", "BlipImageProcessorPil")
        self.model = load_model(folder, "BlipForConditionalGeneration", self.device)
        self._rng = _RngStream(self.options.seed, self.device)
        self._decoded_prompt = self._round_trip(self.options.prompt)

    def describe_device(self) -> str:
        return describe_torch_device(self.device)

    def caption(self, images: Sequence[Image.Image]) -> list[CaptionOutput]:
        """Caption ``images`` in chunks of ``batch_size``, in order."""
        return caption_in_batches(images, self.options.batch_size, self._caption_batch)

    def _caption_batch(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        prompt = self.options.prompt.strip()
        text = [prompt] * len(images) if prompt else None
        inputs = self.processor(images=[to_rgb(im) for im in images], text=text, return_tensors="pt").to(self.device)
        with torch.inference_mode(), self._rng.active():
            ids = self.model.generate(**inputs, **self._generate_kwargs())
        return [self._finish(t) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def _generate_kwargs(self) -> dict[str, Any]:
        o = self.options
        kwargs: dict[str, Any] = {"max_length": o.max_length, "min_length": o.min_length}
        if o.beam_search:
            kwargs.update(do_sample=False, num_beams=o.num_beams)
        else:
            kwargs.update(
                do_sample=True,
                num_beams=1,
                top_p=o.top_p,
                top_k=_SAMPLING_TOP_K,
                repetition_penalty=_SAMPLING_REPETITION_PENALTY,
            )
        return kwargs

    def _round_trip(self, text: str) -> str:
        """``text`` as the tokenizer gives it back (lower-cased, re-spaced), to find it in decoded output."""
        if not text.strip():
            return ""
        ids = self.processor.tokenizer(text.strip(), add_special_tokens=False).input_ids
        return " ".join(self.processor.tokenizer.decode(ids, skip_special_tokens=True).split())

    def _finish(self, decoded: str) -> str:
        return join_prompt(self.options.prompt, self._decoded_prompt, decoded)


def join_prompt(prompt: str, decoded_prompt: str, decoded: str) -> str:
    """Put the user's ``prompt`` (as typed) in front of what BLIP generated after it.

    BLIP's output repeats the prompt tokens in tokenizer form (``decoded_prompt``: lower-cased, re-spaced) and the
    model sometimes restates it ("a photo of a photo of a dog"); one copy, spelt as the user typed it, is kept.
    """
    text = " ".join(decoded.split())
    prompt = " ".join(prompt.split())
    if not prompt:
        return text
    rest = text
    while decoded_prompt and (rest == decoded_prompt or rest.startswith(decoded_prompt + " ")):
        rest = rest[len(decoded_prompt) :].strip()
    return f"{prompt} {rest}".strip()


class _RngStream:
    """A private random stream: seeded once, continued across batches, leaving torch's global RNG untouched.

    Seeding once per captioner (not per batch) mirrors sd-scripts, which seeds once per run; the same seed and
    batch size therefore give the same captions for the same folder.
    """

    def __init__(self, seed: int, device: str) -> None:
        self._seed = seed
        self._cuda = device.startswith("cuda")
        self._device = device
        self._state: tuple[Any, Any] | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        import torch

        devices = [torch.device(self._device).index or 0] if self._cuda else []
        with torch.random.fork_rng(devices=devices):
            self._restore()
            yield
            cuda_state = torch.cuda.get_rng_state(self._device) if self._cuda else None
            self._state = (torch.get_rng_state(), cuda_state)

    def _restore(self) -> None:
        import torch

        if self._state is None:
            torch.manual_seed(self._seed)
            return
        cpu_state, cuda_state = self._state
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self._device)
