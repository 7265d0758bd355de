"""Sample images during training (spec §7): prompts, sd-scripts' samplers, and generation that leaves no trace.

Generation goes through diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` built around the
modules being trained (nothing copied or reloaded), or for FLUX.1 and Chroma through our flow-matching Euler sampler
(``engine.train.flux_sampling``, FLUX spec §7); which one is the family's ``FamilyInfo.sampler``. Prompts are
encoded by our ``encode_captions`` so samples see the same chunking and clip_skip as training. Sampling must not
change the run: the global RNGs, every module's train/eval flag and the VAE's device are put back afterwards, so a
run with samples trains exactly like one without.

Importing this module is cheap (no torch, no diffusers): the config and GUI side can use :func:`sample_requests`.
"""

from __future__ import annotations

import contextlib
import io
import random
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config.prompts import load_prompt_file, parse_prompt_line
from engine.config.sections_output import SamplingSection
from engine.files import atomic_write_bytes
from engine.models.families import family_info

if TYPE_CHECKING:
    import torch

    from engine.models.encoded_text import EncodedText
    from engine.models.text_encoders import LoadedTextEncoders

__all__ = ["SAMPLERS", "SampleImage", "SampleRequest", "SamplerParts", "generate_samples", "make_sample_scheduler",
           "prompt_defaults", "sample_requests"]

# --- schedulers ---------------------------------------------------------------------------------------------------

# sd-scripts builds every sample scheduler with SD's training noise schedule, whatever the model's own config says.
_NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear"}

SchedulerBuilder = Callable[..., Any]  # (*, v_prediction: bool) -> a diffusers scheduler


def _build_scheduler(class_name: str, options: dict[str, Any], *, v_prediction: bool) -> Any:
    import diffusers

    prediction = "v_prediction" if v_prediction else "epsilon"
    with warnings.catch_warnings():
        # diffusers deprecates algorithm_type "dpmsolver" in favour of "dpmsolver++"; sd-scripts offers both and the
        # choice is the user's, so the warning would only be noise in every sampling round's log.
        warnings.filterwarnings("ignore", message=".*algorithm_type dpmsolver is deprecated", category=FutureWarning)
        scheduler = getattr(diffusers, class_name)(**_NOISE_SCHEDULE, prediction_type=prediction, **options)
    if "clip_sample" in scheduler.config:
        scheduler.register_to_config(clip_sample=True)  # sd-scripts forces it on wherever the scheduler has it
    return scheduler


def _scheduler(class_name: str, **options: Any) -> SchedulerBuilder:
    return partial(_build_scheduler, class_name, options)


# Every name of engine.config.choices.Sampler; the k_ names are sd-scripts' aliases of the plain ones.
SAMPLERS: dict[str, SchedulerBuilder] = {
    "ddim": _scheduler("DDIMScheduler"),
    "pndm": _scheduler("PNDMScheduler"),
    "lms": _scheduler("LMSDiscreteScheduler"),
    "euler": _scheduler("EulerDiscreteScheduler"),
    "euler_a": _scheduler("EulerAncestralDiscreteScheduler"),
    "heun": _scheduler("HeunDiscreteScheduler"),
    "dpm_2": _scheduler("KDPM2DiscreteScheduler"),
    "dpm_2_a": _scheduler("KDPM2AncestralDiscreteScheduler"),
    # diffusers accepts plain "dpmsolver" only with the final step ending at sigma_min (not zero), which is also
    # what every diffusers release did before final_sigmas_type existed.
    "dpmsolver": _scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    "dpmsolver++": _scheduler("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++"),
    "dpmsingle": _scheduler("DPMSolverSinglestepScheduler"),
    "k_lms": _scheduler("LMSDiscreteScheduler"),
    "k_euler": _scheduler("EulerDiscreteScheduler"),
    "k_euler_a": _scheduler("EulerAncestralDiscreteScheduler"),
    "k_dpm_2": _scheduler("KDPM2DiscreteScheduler"),
    "k_dpm_2_a": _scheduler("KDPM2AncestralDiscreteScheduler"),
}


def make_sample_scheduler(name: str, *, v_prediction: bool) -> Any:
    """A fresh diffusers scheduler for sd-scripts' sampler ``name`` (schedulers keep per-run state, so never share).

    Raises:
        ValueError: an unknown name (sd-scripts silently falls back to DDIM; a typo should not go unnoticed).
    """
    try:
        builder = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}") from None
    return builder(v_prediction=v_prediction)


# --- requests -----------------------------------------------------------------------------------------------------

DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
DEFAULT_GUIDANCE = 3.5  # FLUX's embedded guidance (--g), sd-scripts' default


@dataclass(frozen=True)
class _PromptDefaults:
    steps: int
    scale: float  # CFG scale (--l); 1.0 turns CFG off for FLUX
    size_multiple: int  # sizes are floored to a multiple of this
    guidance: float | None = None  # the embedded guidance (--g) of models that have one (FLUX); None: none


# By FamilyInfo.sampler: sd-scripts' defaults for its SD and FLUX sampling (spec §7, FLUX spec §7).
_PROMPT_DEFAULTS = {"sd": _PromptDefaults(DEFAULT_STEPS, DEFAULT_SCALE, 8),
                    "sdxl": _PromptDefaults(DEFAULT_STEPS, DEFAULT_SCALE, 8),
                    "flux": _PromptDefaults(20, 1.0, 16, DEFAULT_GUIDANCE),
                    "sd3": _PromptDefaults(DEFAULT_STEPS, DEFAULT_SCALE, 16)}


def prompt_defaults(family: str) -> _PromptDefaults:
    """sd-scripts' defaults for a sample of ``family`` (steps, CFG scale, size multiple, embedded guidance)."""
    return _PROMPT_DEFAULTS[family_info(family).sampler]


@dataclass(frozen=True)
class SampleRequest:
    """One sample image to make; ``seed`` None draws a fresh random seed each time."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int | None
    steps: int
    scale: float
    sampler: str
    guidance: float = DEFAULT_GUIDANCE  # FLUX's embedded guidance; SD ignores it


def sample_requests(section: SamplingSection, base_dir: Path, *, default_size: int,
                    family: str = "sd1") -> list[SampleRequest]:
    """The sample requests of a run: the prompt file when one is set (relative to ``base_dir``), else the prompts.

    Values missing from a prompt take sd-scripts' defaults: ``default_size`` (the family's native resolution),
    30 steps, CFG scale 7.5, the section's sampler and a random seed (FLUX: 20 steps, CFG 1.0 = off, guidance
    3.5). Sizes are floored to multiples of 8 (16 for FLUX; at least 64) and steps clamped to 1..1000, as
    sd-scripts does, for .toml/.json entries too.

    Raises:
        FileNotFoundError: the prompt file does not exist.
        ValueError: an entry that cannot be read (the message names it).
    """
    if section.sample_prompts_file:
        path = Path(base_dir) / Path(section.sample_prompts_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"sample prompt file not found: {path} (sampling.sample_prompts_file)")
        entries = load_prompt_file(path)
    else:
        entries = [parse_prompt_line(line) for line in section.sample_prompts]
    requests = []
    for number, entry in enumerate(entries, start=1):
        try:
            requests.append(_request(entry, section.sample_sampler, default_size,
                                     _PROMPT_DEFAULTS[family_info(family).sampler]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"sample prompt {number}: {error}") from None
    return requests


def _request(entry: dict[str, Any], sampler: str, default_size: int, defaults: _PromptDefaults) -> SampleRequest:
    prompt = str(entry.get("prompt", "")).strip()
    if not prompt:
        raise ValueError("the prompt text is empty")
    name = str(entry.get("sample_sampler", sampler)).lower()
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}")
    seed = entry.get("seed")
    return SampleRequest(
        prompt=prompt,
        negative_prompt=str(entry.get("negative_prompt") or ""),
        width=_size(entry.get("width", default_size), defaults.size_multiple),
        height=_size(entry.get("height", default_size), defaults.size_multiple),
        seed=None if seed is None else int(seed),
        steps=min(1000, max(1, int(entry.get("sample_steps", defaults.steps)))),
        scale=float(entry.get("scale", defaults.scale)),
        sampler=name,
        guidance=float(entry.get("guidance_scale", DEFAULT_GUIDANCE)),
    )


def _size(value: Any, multiple: int = 8) -> int:
    return max(64, int(value) // multiple * multiple)


# --- generation ---------------------------------------------------------------------------------------------------


@dataclass
class SamplerParts:
    """The modules of the model being trained, used in place (a LoRA patched into the UNet is sampled with it).

    Attributes:
        unet: the diffusers UNet, already on the sampling device (unwrapped from accelerate/DDP).
        vae: the diffusers AutoencoderKL; moved to the sampling device for the round if it is parked elsewhere.
        text: the tokenizers and text encoders; prompts are encoded wherever the encoders are.
        family: a key of ``engine.models.families.FAMILY_INFO``.
        v_prediction: whether the model predicts v rather than the noise.
        scaling_factor: the latent scale training uses (``LoadedVae.scaling_factor``), not the VAE config's.
        shift_factor: the latent shift training uses (``LoadedVae.shift_factor``; FLUX's AE).
        text_options: keyword arguments of ``encode_captions`` beyond clip_skip and max_token_length (FLUX's T5
            length and mask).
    """

    unet: Any
    vae: Any
    text: LoadedTextEncoders
    family: str
    v_prediction: bool
    scaling_factor: float
    shift_factor: float = 0.0
    text_options: dict[str, Any] | None = None


def sampler_parts(config: Any, model: Any) -> SamplerParts:
    """The sampler's view of a loaded model (engine.models.loaded_model.LoadedModel) under a run's config."""
    from engine.models.text_encoding import encoding_options

    options = encoding_options(config.model, model.scheduler_config.get("variant", ""))
    return SamplerParts(unet=model.unet, vae=model.vae.vae, text=model.text, family=model.family,
                        v_prediction=config.model.v_parameterization, scaling_factor=model.vae.scaling_factor,
                        shift_factor=model.vae.shift_factor,
                        text_options={key: options[key] for key in ("t5xxl_max_token_length", "apply_t5_attn_mask",
                                                                    "apply_lg_attn_mask")})


@dataclass(frozen=True)
class SampleImage:
    """A saved sample: its file, its prompt's index in the requests, the prompt and the seed it was made with."""

    path: Path
    index: int
    prompt: str
    seed: int


@dataclass(frozen=True)
class _Settings:
    out_dir: Path
    stem: str
    clip_skip: int
    max_token_length: int
    device: torch.device
    dtype: torch.dtype


def generate_samples(parts: SamplerParts, requests: list[SampleRequest], out_dir: Path, *, stem: str,
                     clip_skip: int, max_token_length: int, device: Any, dtype: Any,
                     on_image: Callable[[SampleImage], None] | None = None) -> list[SampleImage]:
    """Generate and save one PNG per request as ``<out_dir>/<stem>_<index:02d>_<YYYYmmddHHMMSS>_<seed>.png``.

    Args:
        parts: the model's modules, used as they are.
        requests: from :func:`sample_requests`; the index in the file name is the position in this list.
        out_dir: the samples folder (created if missing).
        stem: e.g. ``last_e000001`` after an epoch or ``last_000500`` after a step, as sd-scripts names them.
        clip_skip, max_token_length: as in training (see ``engine.models.text_encoding.encode_captions``).
        device: where the UNet is and the sampling runs.
        dtype: latents and prompt embeddings are made in it; float16/bfloat16 also turn on ``torch.autocast``, so
            modules kept in other precisions (float32 LoRA weights, a ``no_half_vae`` VAE) mix as under training's
            mixed precision.
        on_image: called with each image as soon as it is saved (a caller reporting progress per image draws many
            in one call, and so sets up and restores the models once).

    Returns:
        The saved images, in request order, each with the seed it used (drawn at random where none was given).
    """
    import torch

    settings = _Settings(Path(out_dir), stem, clip_skip, max_token_length, torch.device(device), dtype)
    modules = [parts.unet, parts.vae, *parts.text.encoders]
    images = []
    with _rng_preserved(), _modes_preserved(modules), _moved(parts.vae, settings.device), torch.no_grad():
        for index, request in enumerate(requests):
            images.append(_generate_one(parts, request, index, settings))
            if on_image is not None:
                on_image(images[-1])
    return images


def _generate_one(parts: SamplerParts, request: SampleRequest, index: int, settings: _Settings) -> SampleImage:
    import torch

    seed = request.seed if request.seed is not None else secrets.randbits(32)
    half = settings.dtype in (torch.float16, torch.bfloat16)
    # The prompts too: text encoders kept in half precision carry a trained float32 LoRA, as in training.
    with torch.autocast(settings.device.type, dtype=settings.dtype, enabled=half):
        positive, negative = _encode(parts, request, settings)
        latents = _GENERATORS[family_info(parts.family).sampler](parts, request, positive, negative, seed, settings)
        pixels = _decode(parts, latents)
    path = settings.out_dir / f"{settings.stem}_{index:02d}_{time.strftime('%Y%m%d%H%M%S')}_{seed}.png"
    atomic_write_bytes(path, _png(pixels))
    return SampleImage(path=path, index=index, prompt=request.prompt, seed=seed)


def _encode(parts: SamplerParts, request: SampleRequest, settings: _Settings) -> tuple[EncodedText, EncodedText]:
    """Prompt and negative prompt encoded as in training, in one batch, moved to the sampling device and dtype."""
    from engine.models.encoded_text import EncodedText
    from engine.models.text_encoding import encode_captions

    encoded = encode_captions(parts.text, [request.prompt, request.negative_prompt], clip_skip=settings.clip_skip,
                              max_token_length=settings.max_token_length, **(parts.text_options or {}))
    states = encoded.hidden_states.to(settings.device, settings.dtype)
    pooled = None if encoded.pooled is None else encoded.pooled.to(settings.device, settings.dtype)
    mask = None if encoded.mask is None else encoded.mask.to(settings.device)

    def one(i: int) -> EncodedText:
        return EncodedText(states[i:i + 1], None if pooled is None else pooled[i:i + 1],
                           None if mask is None else mask[i:i + 1])

    return one(0), one(1)


def _decode(parts: SamplerParts, latents: torch.Tensor) -> torch.Tensor:
    """Latents → [H, W, 3] uint8 on the CPU, with the scale training uses (a VAE's config may state another)."""
    import torch

    vae = parts.vae
    image = vae.decode((latents / parts.scaling_factor + parts.shift_factor).to(vae.dtype)).sample[0]
    return (image.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu()


def _png(pixels: torch.Tensor) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


# --- pipelines ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PipelineKind:
    build: Callable[[SamplerParts, Any], Any]  # (parts, scheduler) -> pipeline
    # (prompt, negative, request) -> the pipeline's conditioning arguments
    inputs: Callable[[EncodedText, EncodedText, SampleRequest], dict[str, Any]]
    # what the pipeline's own __init__ would change on a scheduler (with a deprecation warning), set beforehand
    scheduler_config: dict[str, Any]


def _pipeline_scheduler(kind: _PipelineKind, sampler: str, v_prediction: bool) -> Any:
    scheduler = make_sample_scheduler(sampler, v_prediction=v_prediction)
    overrides = {key: value for key, value in kind.scheduler_config.items() if key in scheduler.config}
    if overrides:
        scheduler.register_to_config(**overrides)
    return scheduler


def _sd_pipeline(parts: SamplerParts, scheduler: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text.encoders[0], tokenizer=parts.text.tokenizers[0], unet=parts.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sd_inputs(positive: EncodedText, negative: EncodedText, request: SampleRequest) -> dict[str, Any]:
    return {"prompt_embeds": positive.hidden_states, "negative_prompt_embeds": negative.hidden_states}


def _sdxl_pipeline(parts: SamplerParts, scheduler: Any) -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text.encoders[0], text_encoder_2=parts.text.encoders[1],
        tokenizer=parts.text.tokenizers[0], tokenizer_2=parts.text.tokenizers[1], unet=parts.unet,
        scheduler=scheduler, add_watermarker=False,
    )


def _sdxl_inputs(positive: EncodedText, negative: EncodedText, request: SampleRequest) -> dict[str, Any]:
    # Micro-conditioning as sd-scripts samples: the requested size is both the original and the target size.
    size = (request.height, request.width)
    return {"prompt_embeds": positive.hidden_states, "pooled_prompt_embeds": positive.pooled,
            "negative_prompt_embeds": negative.hidden_states, "negative_pooled_prompt_embeds": negative.pooled,
            "original_size": size, "target_size": size, "crops_coords_top_left": (0, 0)}


# sd-scripts' SD pipeline subclasses diffusers' StableDiffusionPipeline, whose __init__ sets steps_offset 1 and
# turns clip_sample off; its SDXL pipeline is its own class and keeps the scheduler as built. Doing the same here
# keeps samples alike and spares the deprecation warnings diffusers prints when it makes those changes itself.
_SD = _PipelineKind(_sd_pipeline, _sd_inputs, {"steps_offset": 1, "clip_sample": False})
_SDXL = _PipelineKind(_sdxl_pipeline, _sdxl_inputs, {})
_PIPELINES: dict[str, _PipelineKind] = {"sd": _SD, "sdxl": _SDXL}


def _pipeline_latents(parts: SamplerParts, request: SampleRequest, positive: EncodedText, negative: EncodedText,
                      seed: int, settings: _Settings) -> Any:
    """SD/SDXL: diffusers' pipeline around the trained modules, stopped at the latents."""
    import torch

    kind = _PIPELINES[family_info(parts.family).sampler]
    # A pipeline only references the modules, so one per request is cheap, and schedulers carry per-run state.
    pipe = kind.build(parts, _pipeline_scheduler(kind, request.sampler, parts.v_prediction))
    pipe.set_progress_bar_config(disable=True)
    # A CPU generator draws the same noise on any device, so a seed gives the same sample on CPU and GPU.
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(**kind.inputs(positive, negative, request), width=request.width, height=request.height,
                num_inference_steps=request.steps, guidance_scale=request.scale, generator=generator,
                output_type="latent").images


def _flow_latents(parts: SamplerParts, request: SampleRequest, positive: EncodedText, negative: EncodedText,
                  seed: int, settings: _Settings) -> Any:
    """FLUX.1 / Chroma: flow-matching Euler with the resolution-shifted schedule (FLUX spec §7)."""
    from engine.train.flux_sampling import sample_latents

    return sample_latents(parts.unet, positive, negative, width=request.width, height=request.height,
                          steps=request.steps, guidance=request.guidance, cfg_scale=request.scale, seed=seed,
                          device=settings.device, dtype=settings.dtype,
                          apply_t5_attn_mask=bool((parts.text_options or {}).get("apply_t5_attn_mask")))


def _sd3_latents(parts: SamplerParts, request: SampleRequest, positive: EncodedText, negative: EncodedText,
                 seed: int, settings: _Settings) -> Any:
    """SD3 / SD3.5: flow-matching Euler on diffusers' FlowMatchEulerDiscreteScheduler(shift 3.0) sigmas."""
    from engine.train.sd3_sampling import request_latents

    return request_latents(parts, request, positive, negative, seed, settings)


# By FamilyInfo.sampler: (parts, request, positive, negative, seed, settings) -> latents as training sees them.
_GENERATORS: dict[str, Callable[..., Any]] = {"sd": _pipeline_latents, "sdxl": _pipeline_latents,
                                              "flux": _flow_latents, "sd3": _sd3_latents}


# --- leaving no trace ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Python, numpy, torch CPU and CUDA RNG states restored afterwards, so training draws what it would have."""
    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _modes_preserved(modules: list[Any]) -> Iterator[None]:
    """Everything in eval mode while sampling; afterwards each submodule gets back its own flag (they may differ)."""
    flags = [(module, module.training) for root in modules for module in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _moved(module: Any, device: torch.device) -> Iterator[None]:
    """``module`` on ``device`` for the duration (sd-scripts does this for a VAE parked on the CPU), then back."""
    import torch

    home = next(module.parameters()).device
    # nn.Module.to, not diffusers' override, which warns on every call about modules it keeps in float32.
    torch.nn.Module.to(module, device)
    try:
        yield
    finally:
        torch.nn.Module.to(module, home)
