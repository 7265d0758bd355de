"""Sample latents from an SD3 / SD3.5 MMDiT during training, as diffusers' StableDiffusion3Pipeline does.

The schedule is diffusers' ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (the shift of every SD3 variant's
scheduler config) after ``set_timesteps(steps)``: ``steps`` timesteps evenly spaced from 1000·σ_max to
1000·σ_min of the shifted 1000-step table, each divided by 1000 and shifted, then a final 0. Euler on the
predicted velocity, ``x ← x + (σ_next − σ)·v``, with t = σ·1000 fed to the model; with a CFG scale other than 1
the negative prompt runs in the same batch (negative first, as diffusers orders it) and
``v = neg + scale·(pos − neg)``. The noise is ``randn`` [1, 16, h/8, w/8] from a CPU generator seeded with the
seed, like the pipeline given that generator, so a seed gives diffusers' sample on any device.

sd-scripts' own ``do_sample`` (spec §8.8) takes the same σ values through k-diffusion-style maths; it differs in
running CFG even at scale 1, computing the schedule in float32 and keeping the latents in the weight dtype.
Here the latents stay float32 between steps (only the model's inputs are cast), as diffusers' scheduler computes
each step. The shift is the scheduler's 3.0, never ``flow.training_shift`` (as in sd-scripts, spec App. A #25).

The latents returned are in training's latent space; decode them with ``LoadedVae.denormalize`` (z/1.5305 +
0.0609), as the pipeline does with its VAE config's factors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.models.encoded_text import EncodedText

__all__ = ["DEFAULT_CFG_SCALE", "DEFAULT_SHIFT", "DEFAULT_STEPS", "LATENT_CHANNELS", "SIZE_MULTIPLE", "denoise",
           "inference_sigmas", "request_latents", "sample_latents"]

DEFAULT_STEPS = 30
DEFAULT_CFG_SCALE = 7.5
DEFAULT_SHIFT = 3.0  # the shift of diffusers' scheduler config for SD3 medium, SD3.5 medium and SD3.5 large
SIZE_MULTIPLE = 16  # pixels: 8 for the VAE × 2 for the MMDiT's 2×2 patches (spec §10)
LATENT_CHANNELS = 16
_VAE_FACTOR = 8
_NUM_TRAIN_TIMESTEPS = 1000


def inference_sigmas(steps: int, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """The ``steps + 1`` σ of ``FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps)``, float32, ending at 0.

    Computed as diffusers does, in the same precisions: σ_max and σ_min from the float32 shifted training table,
    ``numpy.linspace`` in float64 between 1000·σ_max and 1000·σ_min, /1000, shifted again, then float32. (The low
    end is shifted twice, as in diffusers and sd-scripts alike: σ_min is already a shifted value.)
    """
    import numpy as np

    from engine.train.flow import shift_sigmas, sigma_table

    if steps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
    table = sigma_table(float(shift), _NUM_TRAIN_TIMESTEPS)
    sigma_max, sigma_min = table[0].item(), table[-1].item()
    timesteps = np.linspace(sigma_max * _NUM_TRAIN_TIMESTEPS, sigma_min * _NUM_TRAIN_TIMESTEPS, steps)
    sigmas = torch.from_numpy(shift_sigmas(timesteps / _NUM_TRAIN_TIMESTEPS, float(shift))).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


@torch.no_grad()
def denoise(mmdit: Any, noise: torch.Tensor, context: torch.Tensor, y: torch.Tensor, sigmas: torch.Tensor, *,
            cfg_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Euler over ``sigmas`` from ``noise`` [1, 16, h, w]; returns the latents in float32.

    ``context`` and ``y`` hold one prompt, or two (negative first, then positive) when ``cfg_scale`` != 1: both
    run as one batch of 2 and the velocity is ``neg + cfg_scale·(pos − neg)``.
    """
    batch = context.shape[0]
    if batch != (1 if cfg_scale == 1.0 else 2):
        raise ValueError(f"denoise: {batch} prompt(s) given for cfg_scale {cfg_scale}; pass the negative prompt "
                         "before the positive one when cfg_scale is not 1, else the positive prompt alone")
    x = noise.float()
    sigmas = sigmas.to(x.device, torch.float32)
    timesteps = sigmas * _NUM_TRAIN_TIMESTEPS  # what the model sees: t on 0..1000, as the pipeline feeds it
    for index in range(len(sigmas) - 1):
        t = timesteps[index].expand(batch)
        pred = mmdit(x=x.to(dtype).expand(batch, -1, -1, -1), t=t, y=y, context=context).float()
        if batch == 2:
            negative, positive = pred.chunk(2)
            pred = negative + cfg_scale * (positive - negative)
        x = x + (sigmas[index + 1] - sigmas[index]) * pred
    return x


def sample_latents(mmdit: Any, positive: EncodedText, negative: EncodedText | None = None, *, width: int = 512,
                   height: int = 512, steps: int = DEFAULT_STEPS, cfg_scale: float = DEFAULT_CFG_SCALE, seed: int,
                   shift: float = DEFAULT_SHIFT, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """One sample's latents [1, 16, h, w] (float32, training's latent space) from an encoded prompt.

    Args:
        mmdit: the SD3 MMDiT (``engine.models.sd3.mmdit.MMDiT`` or anything with its forward signature
            ``(x, t, y, context)``), in eval mode, on ``device``.
        positive: the prompt encoded for one image (``EncodedText``: context [1, 77 + L, C], pooled y [1, adm]).
        negative: the negative prompt encoded the same way (same T5 length); needed when ``cfg_scale`` != 1.
        width, height: pixels, floored to multiples of 16 (at least 64).
        steps: Euler steps (sd-scripts' --s, default 30).
        cfg_scale: the CFG scale (--l, default 7.5); 1 runs the positive prompt alone.
        seed: seeds the CPU generator the noise [1, 16, h/8, w/8] is drawn from.
        shift: the scheduler's shift (3.0 for every SD3 variant).
        device, dtype: where the sampling runs and the model inputs' dtype; default the MMDiT's.
    """
    from engine.train.flux_sampling import sample_size

    device = torch.device(device) if device is not None else mmdit.device
    dtype = dtype if dtype is not None else mmdit.dtype
    width, height = sample_size(width, height)  # FLUX's rule too: multiples of 16, at least 64
    use_cfg = cfg_scale != 1.0
    if use_cfg and negative is None:
        raise ValueError(f"a CFG scale of {cfg_scale} needs a negative prompt (an empty one is fine)")
    prompts = [negative, positive] if use_cfg else [positive]
    if any(p.pooled is None for p in prompts):  # type: ignore[union-attr]
        raise ValueError("SD3 sampling needs each prompt's pooled CLIP-L + CLIP-G vector (EncodedText.pooled)")
    context = torch.cat([p.hidden_states for p in prompts]).to(device, dtype)  # type: ignore[union-attr]
    y = torch.cat([p.pooled for p in prompts]).to(device, dtype)  # type: ignore[union-attr,misc]
    generator = torch.Generator("cpu").manual_seed(int(seed))
    shape = (1, LATENT_CHANNELS, height // _VAE_FACTOR, width // _VAE_FACTOR)
    noise = torch.randn(shape, generator=generator).to(device)
    return denoise(mmdit, noise, context, y, inference_sigmas(steps, shift), cfg_scale=cfg_scale, dtype=dtype)


def request_latents(parts: Any, request: Any, positive: EncodedText, negative: EncodedText, seed: int,
                    settings: Any) -> torch.Tensor:
    """``engine.train.sampling._GENERATORS["sd3"]``: one sample request's latents with the trained MMDiT.

    (parts, request, positive, negative, seed, settings) as that registry passes them: ``parts.unet`` is the MMDiT,
    ``request`` a ``SampleRequest`` (width, height, steps, scale), ``settings`` carries the device and dtype.
    """
    return sample_latents(parts.unet, positive, negative, width=request.width, height=request.height,
                          steps=request.steps, cfg_scale=request.scale, seed=seed, device=settings.device,
                          dtype=settings.dtype)
