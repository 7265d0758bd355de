"""Sample latents from a FLUX.1 / Chroma transformer during training, as sd-scripts does (flux-sd3-spec §7).

Euler on the predicted velocity over BFL's resolution-shifted schedule: noise is drawn directly in the packed
token shape [1, L, 64], x ← x + (t_next − t)·v for each step, σ fed to the model as the timestep. Guidance is the
embedded kind (``guidance_in`` of FLUX.1 dev, Chroma's approximator; schnell ignores it); a CFG scale other than
1 also runs the negative prompt, as one batch of 2 with the positive one, and mixes ``neg + cfg·(pos − neg)``.

Differences from sd-scripts, on purpose:
* The noise comes from a CPU generator seeded with the seed, so a seed gives the same sample on any device
  (sd-scripts seeds a generator on the accelerator; neither reproduces ComfyUI/diffusers images, spec App. A #12).
* The latents are kept in float32 between steps (only the model's inputs are cast), like diffusers' scheduler;
  sd-scripts keeps them, and σ, in the weight dtype.

As in sd-scripts, the schedule is shifted for schnell too (BFL's own CLI samples schnell unshifted; spec App. A
#12): pass ``shift=False`` for that. The latents returned are in training's latent space; decode with
``z / 0.3611 + 0.1159`` (the AE's scale and shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.train.flow import image_ids, inference_schedule, text_ids, unpack_latents

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from engine.models.encoded_text import EncodedText

__all__ = ["DEFAULT_CFG_SCALE", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "FlowConditioning", "denoise", "sample_latents",
           "sample_size"]

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.5
DEFAULT_CFG_SCALE = 1.0
LATENT_CHANNELS = 16
_SIZE_MULTIPLE, _MIN_SIZE = 16, 64  # pixels: 8 for the AE × 2 for the 2×2 token patches
_AE_FACTOR = 8


@dataclass(frozen=True)
class FlowConditioning:
    """What the transformer is conditioned on besides the latents, for a batch of B prompts.

    Attributes:
        txt: T5 hidden states [B, Lt, C].
        y: CLIP-L pooled vectors [B, 768]; None for Chroma.
        txt_mask: T5 padding mask [B, Lt] bool, or None to attend to every text token.
    """

    txt: torch.Tensor
    y: torch.Tensor | None
    txt_mask: torch.Tensor | None

    @classmethod
    def from_encoded(cls, encoded: Sequence[EncodedText], *, apply_t5_attn_mask: bool, device: torch.device,
                     dtype: torch.dtype) -> FlowConditioning:
        """One batch from prompts encoded one by one (same T5 length); the mask only with ``apply_t5_attn_mask``."""
        txt = torch.cat([item.hidden_states for item in encoded]).to(device, dtype)
        pooled = [item.pooled for item in encoded]
        y = None if any(p is None for p in pooled) else torch.cat(pooled).to(device, dtype)  # type: ignore[arg-type]
        masks = [item.mask for item in encoded]
        use_mask = apply_t5_attn_mask and all(m is not None for m in masks)
        txt_mask = torch.cat(masks).to(device, torch.bool) if use_mask else None  # type: ignore[arg-type]
        return cls(txt, y, txt_mask)


def sample_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) floored to multiples of 16 px, at least 64 (sd-scripts' sample sizes for FLUX)."""
    return (max(_MIN_SIZE, int(width) // _SIZE_MULTIPLE * _SIZE_MULTIPLE),
            max(_MIN_SIZE, int(height) // _SIZE_MULTIPLE * _SIZE_MULTIPLE))


@torch.no_grad()
def denoise(transformer: Callable[..., torch.Tensor], noise: torch.Tensor, latent_hw: tuple[int, int],
            conditioning: FlowConditioning, schedule: Sequence[float], *, guidance: float, cfg_scale: float,
            dtype: torch.dtype) -> torch.Tensor:
    """Euler over ``schedule`` (σ from 1 to 0) from packed ``noise`` [1, L, 64]; returns the tokens in float32.

    ``conditioning`` holds one prompt, or two (positive first, then negative) when ``cfg_scale`` != 1: both run
    as one batch of 2 and the velocity is ``neg + cfg_scale·(pos − neg)``.
    """
    batch = conditioning.txt.shape[0]
    if batch != (1 if cfg_scale == 1.0 else 2):
        raise ValueError(f"denoise: {batch} prompt(s) given for cfg_scale {cfg_scale}; pass the positive prompt, "
                         "and the negative one after it when cfg_scale is not 1")
    device = noise.device
    img_ids = image_ids(batch, latent_hw, device=device, dtype=dtype)
    txt_ids = text_ids(batch, conditioning.txt.shape[1], device=device, dtype=dtype)
    guidance_vec = torch.full((batch,), float(guidance), device=device, dtype=torch.float32)
    x = noise.float()
    for t_current, t_next in zip(schedule[:-1], schedule[1:], strict=True):
        timesteps = torch.full((batch,), float(t_current), device=device, dtype=torch.float32)
        pred = transformer(img=x.to(dtype).expand(batch, -1, -1), img_ids=img_ids, txt=conditioning.txt,
                           txt_ids=txt_ids, timesteps=timesteps, y=conditioning.y, guidance=guidance_vec,
                           txt_mask=conditioning.txt_mask).float()
        if batch == 2:
            positive, negative = pred[:1], pred[1:]
            pred = negative + cfg_scale * (positive - negative)
        x = x + (t_next - t_current) * pred
    return x


def sample_latents(transformer: Any, positive: EncodedText, negative: EncodedText | None = None, *,
                   width: int = 512, height: int = 512, steps: int = DEFAULT_STEPS,
                   guidance: float = DEFAULT_GUIDANCE, cfg_scale: float = DEFAULT_CFG_SCALE, seed: int,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   apply_t5_attn_mask: bool = False, shift: bool = True) -> torch.Tensor:
    """One sample's latents [1, 16, h, w] (float32, training's latent space) from an encoded prompt.

    Args:
        transformer: the FLUX transformer (``engine.models.flux.transformer.Flux`` or anything with its forward
            signature), in eval mode, on ``device``.
        positive: the prompt, encoded for one image (``EncodedText`` [1, Lt, C]; pooled None for Chroma).
        negative: the negative prompt, encoded the same way; used only when ``cfg_scale`` != 1.
        width, height: pixels, floored to multiples of 16 (at least 64).
        steps: Euler steps (sd-scripts' --s, default 20).
        guidance: the embedded guidance (--g, default 3.5).
        cfg_scale: true CFG (--l, default 1.0 = off).
        seed: seeds the CPU generator the packed noise [1, L, 64] is drawn from.
        device, dtype: where the sampling runs and the model inputs' dtype; default the transformer's.
        apply_t5_attn_mask: pass the prompts' T5 padding mask to the transformer, as training does with
            ``model.apply_t5_attn_mask`` (required for Chroma); otherwise no mask, as sd-scripts.
        shift: the resolution-shifted schedule (sd-scripts: always, schnell included).
    """
    device = torch.device(device) if device is not None else transformer.device
    dtype = dtype if dtype is not None else transformer.dtype
    width, height = sample_size(width, height)
    latent_hw = (height // _AE_FACTOR, width // _AE_FACTOR)
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    use_cfg = cfg_scale != 1.0
    if use_cfg and negative is None:
        raise ValueError(f"a CFG scale of {cfg_scale} needs a negative prompt (an empty one is fine)")
    prompts = [positive, negative] if use_cfg else [positive]
    conditioning = FlowConditioning.from_encoded(prompts, apply_t5_attn_mask=apply_t5_attn_mask, device=device,
                                                 dtype=dtype)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(1, tokens, LATENT_CHANNELS * 4, generator=generator).to(device)
    schedule = inference_schedule(steps, tokens, shift=shift)
    packed = denoise(transformer, noise, latent_hw, conditioning, schedule, guidance=guidance, cfg_scale=cfg_scale,
                     dtype=dtype)
    return unpack_latents(packed, latent_hw)
