"""training.cache_on_device in the memory plan: the whole dataset's cached latents and text-encoder outputs held as
GPU tensors for the run (engine.train.dataset.caches_on_device), counted entry by entry as the caches make them.

Latents: one entry per image and bucket (engine.cache.latent_jobs.jobs_from_scan), float32 [channels, height / scale,
width / scale] at its bucket, twice with flip_aug (the flipped latents are kept too), plus its loss mask (float32 at
the bucket's pixel size) with masked loss. Text: one entry per image (the trainer looks them up by path), float32
hidden states [tokens, width] and the pooled embedding, and T5's padding mask (bool) for FLUX.1 / Chroma; the shapes
are the family's conditioning (engine.models.text_encoding) at the run's token lengths, as the step's trace feeds
the denoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.config.schema import RunConfig
from engine.models.families import family_info
from engine.plan.architecture import Architecture, latent_scale

__all__ = ["DeviceCaches", "device_caches", "latent_entry_bytes", "text_entry_bytes"]

FLOAT32 = 4


@dataclass(frozen=True)
class DeviceCaches:
    latent_entries: int
    latent_bytes: int
    text_entries: int
    text_bytes: int

    @property
    def total(self) -> int:
        return self.latent_bytes + self.text_bytes

    def detail(self) -> str:
        return (f"training.cache_on_device: {self.latent_entries} latents at their buckets "
                f"({_size(self.latent_bytes)}) and {self.text_entries} captions' text-encoder outputs "
                f"({_size(self.text_bytes)})")


def _size(count: int) -> str:
    return f"{count / 1024**3:.2f} GiB" if count >= 1024**3 else f"{count / 1024**2:.1f} MiB"


def latent_entry_bytes(channels: int, scale: int, bucket: tuple[int, int], *, flip: bool, mask: bool) -> int:
    """One cached image on the device: its latents (and the flipped ones) and its loss mask, at `bucket` (w, h)."""
    width, height = bucket
    latents = channels * (height // scale) * (width // scale) * FLOAT32
    return latents * (2 if flip else 1) + (width * height * FLOAT32 if mask else 0)


def text_entry_bytes(tokens: int, width: int, pooled: int, mask_tokens: int) -> int:
    """One caption's cached outputs on the device: hidden states, pooled embedding (float32), mask (bool)."""
    return (tokens * width + pooled) * FLOAT32 + mask_tokens


def device_caches(config: RunConfig, base_dir: Path, architecture: Architecture, text_tokens: int) -> DeviceCaches:
    """The caches the run keeps on the GPU (all zero unless training.cache_on_device). Reads the dataset's image
    headers to find each image's bucket, as the run's scan does.

    Raises:
        ValueError: the dataset cannot be cached as configured (the run refuses it too).
    """
    training = config.training
    if not training.cache_on_device:
        return DeviceCaches(0, 0, 0, 0)
    from engine.data.scan import scan_config

    scan = scan_config(config, base_dir)
    latent_entries = latent_bytes = text_entries = text_bytes = 0
    if training.cache_latents:
        from engine.cache.latent_jobs import jobs_from_scan

        channels = family_info(architecture.family).latent_channels
        scale = latent_scale(architecture.vae_config)
        jobs = jobs_from_scan(scan)
        latent_entries = len(jobs)
        latent_bytes = sum(latent_entry_bytes(channels, scale, job.record.bucket, flip=job.options.flip_aug,
                                              mask=job.record.mask is not None) for job in jobs)
    if training.cache_text_encoder_outputs:
        from engine.cache.text_encoder import jobs_from_scan as text_jobs

        text_entries = len({job.record.path for job in text_jobs(scan)})
        shape = _TEXT_SHAPES[family_info(architecture.family).text_encoding](architecture, text_tokens)
        text_bytes = text_entries * text_entry_bytes(*shape)
    return DeviceCaches(latent_entries, latent_bytes, text_entries, text_bytes)


# A caption's cached outputs by FamilyInfo.text_encoding: (tokens, width, pooled width, mask tokens), from the
# denoiser's conditioning inputs (what the outputs are fed to) and the run's token length.
TextShape = tuple[int, int, int, int]


def _sd_text(architecture: Architecture, tokens: int) -> TextShape:
    return tokens, architecture.denoiser.config.cross_attention_dim, 0, 0


def _sdxl_text(architecture: Architecture, tokens: int) -> TextShape:
    unet_config = architecture.denoiser.config
    pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    return tokens, unet_config.cross_attention_dim, pooled, 0


def _flux_text(architecture: Architecture, tokens: int) -> TextShape:
    params = architecture.denoiser.params
    # CLIP-L's pooled output where the family has CLIP-L (Chroma has none: engine.models.flux.text).
    pooled = params.vec_in_dim if "clip_l" in family_info(architecture.family).text_encoder_files else 0
    return tokens, params.context_in_dim, pooled, tokens


def _sd3_text(architecture: Architecture, tokens: int) -> TextShape:
    params = architecture.denoiser.params
    return 77 + tokens, params.context_in_dim, params.adm_in_channels, 0  # CLIP-L/G's 77 tokens, then T5's


_TEXT_SHAPES: dict[str, Callable[[Architecture, int], TextShape]] = {
    "sd": _sd_text, "sdxl": _sdxl_text, "flux": _flux_text, "sd3": _sd3_text}
