"""Rendering a comparison: the run's base model loaded once, its network built once, and every checkpoint's weights
loaded into that network in turn, each shown at each strength (the network's multiplier).

Cells are drawn by training's sampler (:func:`engine.train.sampling.generate_samples`) with the run's sampler
settings, so a cell at strength 1 is the sample the run would draw with that checkpoint, and a cell at strength 0
(the network taken off the model) is the base model's picture. The models are placed as training places them
(:func:`engine.train.placement.place_models`), in the run's mixed-precision dtype.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from engine.compare.grid import Cell, GridPrompt
from engine.compare.plan import Checkpoint, CheckpointError

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.train.sampling import SampleRequest, SamplerParts

__all__ = ["Renderer", "grid_prompts", "load_renderer", "render_cells"]


@dataclass
class Renderer:
    """The loaded model and the run's network on it, ready to draw cells."""

    parts: SamplerParts
    method: Any  # engine.train.method_lora.LoraMethod: the network, and loading a checkpoint into it
    clip_skip: int
    max_token_length: int
    device: Any
    dtype: Any
    loaded: Path | None = None  # the checkpoint whose weights the network holds
    applied: bool = True  # whether the network is patched into the model (not while drawing the base model)

    def show(self, checkpoint: Checkpoint | None, strength: float) -> None:
        """Make the model draw `checkpoint` at `strength`; None (strength 0) draws the base model."""
        network = self.method.network
        if checkpoint is None:
            if self.applied:
                network.restore()  # the layers' own forward: exactly the base model, at no cost
                self.applied = False
            return
        if checkpoint.path != self.loaded:
            from engine.networks.network_file import read_network_file

            tensors, _ = read_network_file(checkpoint.path)
            try:
                self.method.load_trained_state(tensors)
            except ValueError as error:  # the load checks every module first: nothing changed
                raise CheckpointError(f"{checkpoint.path}: {error}") from None
            self.loaded = checkpoint.path
        if not self.applied:
            network.apply_to()
            self.applied = True
        network.set_multiplier(float(strength))


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_renderer(config: RunConfig, base_dir: Path, *, device: str = "auto", dtype: Any = None) -> Renderer:
    """Load the run's base model and build its network as training does, on `device`.

    Args:
        config: the run's config (method "lora").
        base_dir: where its relative paths start.
        device: "auto" (CUDA when there is one), "cpu" or "cuda".
        dtype: the frozen weights' dtype; None: the run's mixed precision, as its samples were drawn.

    Raises:
        engine.train.setup.RunInputError: the model cannot be loaded (the message says what to fix).
    """
    from engine.train.build import load_base_model
    from engine.train.method_lora import LoraMethod
    from engine.train.placement import place_models, store_frozen_in_fp8
    from engine.train.sampling import sampler_parts
    from engine.train.setup import weight_dtype

    target = _device(device)
    dtype = dtype or weight_dtype(config)
    model = load_base_model(config, base_dir, None)
    store_frozen_in_fp8(config, model, dtype)
    method = LoraMethod(config, model, base_dir)
    place_models(config, model, method, SimpleNamespace(device=target), dtype, latents_cached=False,
                 texts_cached=False)
    method.network.requires_grad_(False)
    method.network.eval()  # no dropout while drawing
    return Renderer(sampler_parts(config, model), method, config.model.clip_skip, config.model.max_token_length,
                    target, dtype)


def grid_prompts(config: RunConfig, base_dir: Path, family: str, prompt_file: Path | None = None,
                 ) -> list[tuple[GridPrompt, int | None]]:
    """The prompts to compare and each one's own seed (None: none given): `prompt_file` (sd-scripts' .txt, .toml
    or .json format) or else the run's sample prompts, with the run's sampler and the family's defaults.

    Raises:
        FileNotFoundError, ValueError: a missing prompt file or an entry that cannot be read.
    """
    from engine.models.families import family_info
    from engine.train.sampling import sample_requests

    section = config.sampling
    if prompt_file is not None:
        section = section.model_copy(update={"sample_prompts_file": str(Path(prompt_file).resolve())})
    requests = sample_requests(section, base_dir, default_size=family_info(family).default_resolution,
                               family=family)
    return [(GridPrompt(index, request.prompt, request.negative_prompt, request.width, request.height,
                        request.steps, request.scale, request.sampler, request.guidance), request.seed)
            for index, request in enumerate(requests)]


def prompt_seeds(own: Sequence[int | None], given: Sequence[int]) -> list[list[int]]:
    """Each prompt's seeds: the ones given for all, else its own, else one drawn for it (the same in every cell)."""
    return [list(given) if given else [seed if seed is not None else secrets.randbits(32)] for seed in own]


def _request(prompt: GridPrompt, seed: int) -> SampleRequest:
    from engine.train.sampling import SampleRequest

    return SampleRequest(prompt.prompt, prompt.negative_prompt, prompt.width, prompt.height, seed, prompt.steps,
                         prompt.scale, prompt.sampler, guidance=prompt.guidance)


def _render_order(cells: Sequence[Cell]) -> list[list[Cell]]:
    """The cells grouped by the file they show, in drawing order: the base model's first, then checkpoint by
    checkpoint (its weights loaded once), strength by strength."""
    by_file: dict[Path, list[Cell]] = {}
    for cell in cells:
        by_file.setdefault(cell.file, []).append(cell)
    groups = list(by_file.values())
    return sorted(groups, key=lambda group: (group[0].strength != 0, group[0].column, group[0].strength,
                                             group[0].prompt.index, group[0].seed))


def _batches(groups: list[list[Cell]]) -> list[list[list[Cell]]]:
    """Consecutive pictures drawn with the same weights and strength (the base model's all together): one sampler
    call each, so the models are set up and restored once per batch, not once per picture."""
    batches: list[list[list[Cell]]] = []
    for group in groups:
        first = group[0]
        key = (None if first.strength == 0 else first.checkpoint.path, first.strength)
        previous = batches[-1][0][0] if batches else None
        if previous is not None and (None if previous.strength == 0 else previous.checkpoint.path,
                                     previous.strength) == key:
            batches[-1].append(group)
        else:
            batches.append([group])
    return batches


def render_cells(renderer: Renderer, cells: Sequence[Cell], *,
                 on_rendered: Callable[[list[Cell]], None] | None = None) -> None:
    """Draw every cell's file (the base model's once for all its columns), each written whole under its final name.

    Args:
        renderer: from :func:`load_renderer`.
        cells: from :func:`engine.compare.grid.plan_cells`; their folder is created if missing.
        on_rendered: called with the cells a file was just written for (progress).
    """
    from engine.train.sampling import generate_samples

    groups = _render_order(cells)
    if not groups:
        return
    folder = groups[0][0].file.parent
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".compare-", dir=folder))
    try:
        for batch in _batches(groups):
            first = batch[0][0]
            renderer.show(None if first.strength == 0 else first.checkpoint, first.strength)

            def placed(sample: Any, batch: list[list[Cell]] = batch) -> None:
                group = batch[sample.index]
                os.replace(sample.path, group[0].file)  # same folder tree: the cell appears whole or not at all
                if on_rendered is not None:
                    on_rendered(group)

            generate_samples(renderer.parts, [_request(group[0].prompt, group[0].seed) for group in batch], scratch,
                             stem="cell", clip_skip=renderer.clip_skip, max_token_length=renderer.max_token_length,
                             device=renderer.device, dtype=renderer.dtype, on_image=placed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
