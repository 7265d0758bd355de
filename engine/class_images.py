"""Class images for regularization: N images of one prompt from the base model, written into a reg folder.

Generation goes through training's sampler (:func:`engine.train.sampling.generate_samples`): the same pipelines,
schedulers and prompt encoding as the samples a run makes, so a class image looks like what the untrained model
draws for that prompt. Each image is made in a private hidden folder and renamed into place as ``NNNN.png`` next to
a ``NNNN.txt`` caption holding the prompt; numbering continues after the folder's highest number and never reuses
a name, so a second round adds images and a user's own files are never touched.

Image ``i`` of a round uses seed ``seed + i``: a round is reproducible, and so is each image on its own.
Importing this module is cheap (no torch): torch and diffusers load when generation starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.files import atomic_write_text
from engine.models.families import FAMILY_INFO

if TYPE_CHECKING:
    from engine.models.loading import LoadedModel
    from engine.train.sampling import SamplerParts

__all__ = ["ClassImageSettings", "generate_class_images", "image_seed", "native_size", "next_number",
           "sampler_parts"]

_SEED_SPACE = 2**32  # torch.Generator.manual_seed takes any int, but sd-scripts and A1111 show 32-bit seeds
_MAX_TOKENS = 75  # one CLIP window, as a plain pipeline encodes: long prompts are cut, not chunked


@dataclass(frozen=True)
class ClassImageSettings:
    """What to generate. ``width``/``height`` None mean the model's native size (see :func:`native_size`)."""

    prompt: str
    count: int
    seed: int
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance: float = 7.5
    sampler: str = "euler_a"
    clip_skip: int = 1


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` (0-based) of a round started with ``seed``."""
    return (seed + index) % _SEED_SPACE


def native_size(family: str, v_prediction: bool) -> int:
    """The side the family was trained at: 512 (SD1, SD2-base), 768 (SD2 v-prediction), 1024 (SDXL)."""
    return FAMILY_INFO[family].resolution_for(v_prediction)


def next_number(folder: Path) -> int:
    """One past the highest number naming an entry of ``folder`` (``0007.png``, ``0007.txt`` ...), else 1."""
    if not folder.is_dir():
        return 1
    return max((int(entry.stem) for entry in folder.iterdir() if entry.stem.isdigit()), default=0) + 1


def sampler_parts(model: LoadedModel, *, v_prediction: bool | None = None) -> SamplerParts:
    """The loaded model's modules as the sampler takes them; ``v_prediction`` None reads the model's scheduler."""
    from engine.train.sampling import SamplerParts

    if v_prediction is None:
        v_prediction = model.scheduler_config.get("prediction_type") == "v_prediction"
    return SamplerParts(unet=model.unet, vae=model.vae.vae, text=model.text, family=model.family,
                        v_prediction=v_prediction, scaling_factor=model.vae.scaling_factor)


def generate_class_images(parts: SamplerParts, settings: ClassImageSettings, out_dir: Path, *, device: Any,
                          dtype: Any, on_image: Callable[[Path], None] | None = None) -> list[Path]:
    """Generate ``settings.count`` images into ``out_dir`` (created if missing), one at a time.

    Args:
        parts: the model, e.g. from :func:`sampler_parts`; its modules must already be on ``device``.
        settings: prompt, count, size, steps, guidance, sampler, seed.
        out_dir: the class folder, e.g. ``reg/1_dog``.
        device, dtype: as for :func:`engine.train.sampling.generate_samples` (float32 on a CPU).
        on_image: called with each image's path as soon as it is in place (progress reporting).

    Returns:
        The written images in order. When generation stops half-way, the images already written stay.
    """
    from engine.train.sampling import SampleRequest, generate_samples

    out_dir.mkdir(parents=True, exist_ok=True)
    side = native_size(parts.family, parts.v_prediction)
    number = next_number(out_dir)
    written: list[Path] = []
    # Hidden and private: dataset scans skip dot-folders, and nothing half-made ever carries a final name.
    scratch = Path(tempfile.mkdtemp(prefix=".class-images-", dir=out_dir))
    try:
        for index in range(settings.count):
            request = SampleRequest(settings.prompt, settings.negative_prompt, settings.width or side,
                                    settings.height or side, image_seed(settings.seed, index), settings.steps,
                                    settings.guidance, settings.sampler)
            sample = generate_samples(parts, [request], scratch, stem="class", clip_skip=settings.clip_skip,
                                      max_token_length=_MAX_TOKENS, device=device, dtype=dtype)[0]
            number, path = _place(sample.path, out_dir, number, settings.prompt)
            number += 1
            written.append(path)
            if on_image is not None:
                on_image(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return written


def _place(image: Path, out_dir: Path, number: int, prompt: str) -> tuple[int, Path]:
    """Move a finished image to the first free ``NNNN.png`` from ``number`` on and write its caption."""
    while any((out_dir / f"{number:04d}{suffix}").exists() for suffix in (".png", ".txt")):
        number += 1  # a file that appeared since the round began (another tool, the user): never overwrite it
    target = out_dir / f"{number:04d}.png"
    os.replace(image, target)  # same folder tree, so a rename: the image appears whole or not at all
    atomic_write_text(target.with_suffix(".txt"), prompt)
    return number, target
