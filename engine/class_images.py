"""Class images for regularization: N images of one prompt from the base model, written into a reg folder.

Generation goes through training's sampler (:func:`engine.train.sampling.generate_samples`): the same pipelines,
schedulers and prompt encoding as the samples a run makes, so a class image looks like what the untrained model
draws for that prompt. Each image is made in a private hidden folder and renamed into place as ``NNNN.png`` next to
a ``NNNN.txt`` caption holding the prompt; numbering continues after the folder's highest number and never reuses
a name, so a second round adds images and a user's own files are never touched.

Every family the sampler draws works, FLUX.1 and Chroma included: what a family's sampler needs (its default
steps and CFG scale, FLUX's embedded guidance and latent shift, T5's length and mask) comes from the sampler's
per-family defaults and the loaded model, never from a test of the family's name.

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
    from engine.models.loaded_model import LoadedModel
    from engine.train.sampling import SampleRequest, SamplerParts

__all__ = ["ClassImageSettings", "generate_class_images", "image_seed", "native_size", "next_number",
           "sample_request", "sampler_parts"]

_SEED_SPACE = 2**32  # torch.Generator.manual_seed takes any int, but sd-scripts and A1111 show 32-bit seeds
_MAX_TOKENS = 75  # one CLIP window, as a plain pipeline encodes: long prompts are cut, not chunked


@dataclass(frozen=True)
class ClassImageSettings:
    """What to generate. None means the family's default: ``width``/``height`` its native size (see
    :func:`native_size`); ``steps``, ``cfg_scale`` and ``guidance`` sd-scripts' sample defaults
    (``engine.train.sampling.prompt_defaults``: 30 steps and CFG 7.5 for SD; 20 steps, CFG 1.0 = off and embedded
    guidance 3.5 for FLUX.1/Chroma). ``guidance`` is the embedded guidance of models that have one; SD ignores it.
    ``sampler`` and ``clip_skip`` apply to SD only (FLUX samples with its own Euler and T5)."""

    prompt: str
    count: int
    seed: int
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    guidance: float | None = None
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


def sampler_parts(model: LoadedModel, *, v_prediction: bool | None = None, t5xxl_max_token_length: int | None = None,
                  apply_t5_attn_mask: bool = False, apply_lg_attn_mask: bool = False) -> SamplerParts:
    """The loaded model's modules as the sampler takes them, as training's samples do (engine.train.sample_hooks).

    Args:
        model: from ``engine.models.loading.load_model``.
        v_prediction: None reads the model's scheduler config (FLUX's has none: flow matching predicts velocity).
        t5xxl_max_token_length, apply_t5_attn_mask: T5's caption length (None: 512, or 256 for FLUX.1 schnell) and
            whether its padding is masked, as ``model.t5xxl_max_token_length`` / ``model.apply_t5_attn_mask``;
            families without T5 ignore them.
        apply_lg_attn_mask: SD3: pass CLIP-L's and CLIP-G's padding masks to their attention
            (``model.apply_lg_attn_mask``); other families ignore it.
    """
    from engine.config.sections_model import ModelSection
    from engine.models.text_encoding import encoding_options
    from engine.train.sampling import SamplerParts

    if v_prediction is None:
        v_prediction = model.scheduler_config.get("prediction_type") == "v_prediction"
    section = ModelSection(t5xxl_max_token_length=t5xxl_max_token_length, apply_t5_attn_mask=apply_t5_attn_mask,
                           apply_lg_attn_mask=apply_lg_attn_mask)
    options = encoding_options(section, model.scheduler_config.get("variant", ""))
    return SamplerParts(unet=model.unet, vae=model.vae.vae, text=model.text, family=model.family,
                        v_prediction=v_prediction, scaling_factor=model.vae.scaling_factor,
                        shift_factor=model.vae.shift_factor,
                        text_options={key: options[key] for key in ("t5xxl_max_token_length", "apply_t5_attn_mask",
                                                                    "apply_lg_attn_mask")})


def sample_request(settings: ClassImageSettings, family: str, *, v_prediction: bool, index: int) -> SampleRequest:
    """The sampler's request for image ``index`` of a round, unset values taken from the family's defaults."""
    from engine.train.sampling import DEFAULT_GUIDANCE, SampleRequest, prompt_defaults

    defaults, side = prompt_defaults(family), native_size(family, v_prediction)
    guidance = settings.guidance if settings.guidance is not None else defaults.guidance
    return SampleRequest(settings.prompt, settings.negative_prompt, settings.width or side, settings.height or side,
                         image_seed(settings.seed, index), settings.steps or defaults.steps,
                         settings.cfg_scale if settings.cfg_scale is not None else defaults.scale, settings.sampler,
                         guidance=DEFAULT_GUIDANCE if guidance is None else guidance)


def generate_class_images(parts: SamplerParts, settings: ClassImageSettings, out_dir: Path, *, device: Any,
                          dtype: Any, on_image: Callable[[Path], None] | None = None) -> list[Path]:
    """Generate ``settings.count`` images into ``out_dir`` (created if missing), one at a time.

    Args:
        parts: the model, e.g. from :func:`sampler_parts`; its modules must already be on ``device``.
        settings: prompt, count, size, steps, CFG scale, guidance, sampler, seed.
        out_dir: the class folder, e.g. ``reg/1_dog``.
        device, dtype: as for :func:`engine.train.sampling.generate_samples` (float32 on a CPU).
        on_image: called with each image's path as soon as it is in place (progress reporting).

    Returns:
        The written images in order. When generation stops half-way, the images already written stay.
    """
    from engine.train.sampling import generate_samples

    out_dir.mkdir(parents=True, exist_ok=True)
    number = next_number(out_dir)
    written: list[Path] = []
    # Hidden and private: dataset scans skip dot-folders, and nothing half-made ever carries a final name.
    scratch = Path(tempfile.mkdtemp(prefix=".class-images-", dir=out_dir))
    try:
        for index in range(settings.count):
            request = sample_request(settings, parts.family, v_prediction=parts.v_prediction, index=index)
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
