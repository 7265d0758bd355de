"""Sample images from inside a run: the session's models, its prompts, its naming, and models moved as needed.

When latents or text-encoder outputs are cached, the VAE and text encoders wait on the CPU; they visit the GPU
only while samples are drawn, then go back, so sampling never costs training memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from engine.train.setup import Session


def sample_stem(output_name: str, *, epoch: int, step: int, kind: str) -> str:
    """sd-scripts' sample names: `<name>_e000001` after an epoch, `<name>_000500` after a step."""
    return f"{output_name}_e{epoch:06d}" if kind == "epoch" else f"{output_name}_{step:06d}"


@contextmanager
def _on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    homes = [next(module.parameters()).device for module in modules]
    for module in modules:
        torch.nn.Module.to(module, device=device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes, strict=True):
            torch.nn.Module.to(module, device=home)


def sample_now(session: Session, *, epoch: int, step: int, kind: str) -> list[dict[str, Any]]:
    """Draw every sample prompt; returns one dict per image (path, index, prompt, seed) for the `sample` event."""
    from engine.models.families import family_info
    from engine.train.sampling import generate_samples, sample_requests, sampler_parts

    config = session.config
    requests = sample_requests(config.sampling, session.base_dir, family=session.model.family,
                               default_size=family_info(session.model.family).default_resolution)
    if not requests:
        return []
    prepare = getattr(session.method, "prepare_prompt", None)  # e.g. Textual Inversion's multi-vector token
    if prepare is not None:
        requests = [replace(request, prompt=prepare(request.prompt),
                            negative_prompt=prepare(request.negative_prompt)) for request in requests]
    model = session.model
    parts = sampler_parts(config, model)
    # The VAE is moved by generate_samples itself; the text encoders are moved here.
    with _on_device(list(model.text.encoders), session.device):
        images = generate_samples(parts, requests, session.output_dir / "samples",
                                  stem=sample_stem(session.output_name, epoch=epoch, step=step, kind=kind),
                                  clip_skip=config.model.clip_skip, max_token_length=config.model.max_token_length,
                                  device=session.device, dtype=session.weight_dtype)
    return [{"path": str(image.path), "index": image.index, "prompt": image.prompt, "seed": image.seed}
            for image in images]
