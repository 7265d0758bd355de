"""The memory sample images take during a run, for the plan (engine.plan.estimate).

Samples are drawn between steps (engine.train.sample_hooks): the step's activations and gradients are free then, but
the text encoders and the VAE come to the GPU when their outputs are cached (they wait on the host), the denoiser runs
without gradients at the largest sample size (a batch of 2 with CFG: the prompt and the negative one together), and
the VAE decodes the result. So the GPU's peak while sampling is the resident weights, plus the parts that visit, plus
the larger of the denoiser's and the VAE decoder's working memory. Both are traced with fake tensors, like the step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.config.schema import RunConfig
from engine.models.families import family_info
from engine.plan.architecture import latent_scale
from engine.plan.trace import PeakBytes, StepShape

__all__ = ["sample_shape", "sampling_plan", "trace_vae", "trace_vae_decode"]


def sample_shape(config: RunConfig, base_dir: Path, family: str, text_tokens: int) -> StepShape | None:
    """The largest sample the run draws (batch 2 when any prompt uses CFG), or None when it draws none."""
    section = config.sampling
    if not (section.sample_every_n_steps or section.sample_every_n_epochs or section.sample_at_first):
        return None
    from engine.train.sampling import sample_requests

    try:
        requests = sample_requests(section, base_dir, family=family,
                                   default_size=family_info(family).default_resolution)
    except (OSError, ValueError):  # the run refuses these at start; the plan has nothing to count
        return None
    if not requests:
        return None
    width, height = max(((request.width, request.height) for request in requests), key=lambda wh: wh[0] * wh[1])
    batch = 2 if any(request.scale != 1.0 for request in requests) else 1
    return StepShape(batch, height, width, text_tokens)


def trace_vae_decode(vae_config: dict[str, Any], shape: StepShape, dtype: torch.dtype) -> int:
    """The bytes the VAE's decoder allocates to decode one sample of `shape` (batch 1: samples decode one by one)."""
    return trace_vae(vae_config, StepShape(1, shape.height, shape.width, shape.text_tokens), dtype, encode=False)


def trace_vae(vae_config: dict[str, Any], shape: StepShape, dtype: torch.dtype, *, encode: bool) -> int:
    """The bytes the VAE allocates (no gradients) to encode a batch of `shape`'s images, or to decode their
    latents, on top of its weights."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config).to(dtype)
    scale = latent_scale(vae_config)
    with FakeTensorMode(allow_non_fake_inputs=True):
        vae.to_empty(device="cpu")
        vae.eval()
        tracker = PeakBytes(vae)
        with tracker, torch.no_grad():
            if encode:
                pixels = torch.randn(shape.batch_size, vae.config.in_channels, shape.height, shape.width, dtype=dtype)
                vae.encode(pixels).latent_dist.sample()
            else:
                latents = torch.randn(shape.batch_size, vae.config.latent_channels, shape.height // scale,
                                      shape.width // scale, dtype=dtype)
                vae.decode(latents)
    return tracker.peak


def sampling_plan(*, visiting: int, denoiser_bytes: int, vae_bytes: int, step_bytes: int,
                  shape: StepShape) -> tuple[int, str]:
    """(bytes the samples need beyond the step's memory, which is free while they run; a line saying why)."""
    working = max(denoiser_bytes, vae_bytes)
    need = visiting + working
    gib = 1024**3
    detail = (f"{shape.width}x{shape.height}, batch {shape.batch_size}: {need / gib:.2f} GiB while the step's "
              f"{step_bytes / gib:.2f} GiB is free (text encoders and VAE visiting {visiting / gib:.2f} GiB, the "
              f"denoiser {denoiser_bytes / gib:.2f} GiB, the VAE decoder {vae_bytes / gib:.2f} GiB)")
    return max(0, need - step_bytes), detail
