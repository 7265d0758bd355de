"""Fit to my GPU: the changes that bring a run's plan under the card's memory, cheapest in speed first.

Each proposal is a config patch with why it saves memory and what it costs; they are tried in order and kept
cumulatively, re-planning after each, until the plan fits (CPU-offloaded checkpointing is kept only where it makes
the run fit: it excludes block swapping). Nothing is proposed that changes what the run learns, except fewer images
per batch, which keeps the effective batch with gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.schema import RunConfig
from engine.models.families import FAMILY_INFO, family_info
from engine.plan.estimate import MemoryPlan, make_plan

__all__ = ["Change", "FitResult", "fit_to_gpu"]


@dataclass(frozen=True)
class Change:
    key: str  # dotted config key, e.g. "training.gradient_checkpointing"
    value: Any
    reason: str  # what it saves and what it costs
    gpu_needed_bytes: int = 0  # the plan's need once this change and those before it are made

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "reason": self.reason,
                "gpu_needed_bytes": self.gpu_needed_bytes}


@dataclass
class FitResult:
    plan: MemoryPlan  # after the changes
    changes: list[Change]

    @property
    def fits(self) -> bool:
        return bool(self.plan.fits)

    def as_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "changes": [change.as_dict() for change in self.changes],
                "plan": self.plan.as_dict()}


def fit_to_gpu(config: RunConfig, base_dir: Path, gpu_capacity: int, *, traces: dict | None = None) -> FitResult:
    """The cheapest list of changes that makes `config` fit `gpu_capacity` bytes (all of them when none suffices).
    `traces`: steps already traced for this run (make_plan's), which the plans of the proposals reuse."""
    traces = {} if traces is None else traces  # the step traced once per shape and precision the proposals lead to
    plan = make_plan(config, base_dir, gpu_capacity=gpu_capacity, traces=traces)
    changes: list[Change] = []
    for proposal in _proposals():
        if plan.fits:
            break
        patch = proposal(config, plan.family)
        if patch is None:
            continue
        key, value, reason = patch
        try:
            changed = _with(config, key, value)
            changed_plan = make_plan(changed, base_dir, gpu_capacity=gpu_capacity, traces=traces)
        except ValueError:  # not possible for this model (more blocks to swap than it has, a refused combination)
            continue
        if proposal in _ONLY_IF_IT_FITS and not changed_plan.fits:
            continue
        config, plan = changed, changed_plan
        changes.append(Change(key, value, reason, plan.gpu_needed))
        if key == "dataset.general.batch_size":
            accumulation = config.training.gradient_accumulation_steps * 2
            config = _with(config, "training.gradient_accumulation_steps", accumulation)
            changes.append(Change("training.gradient_accumulation_steps", accumulation,
                                  "keeps the effective batch (images per optimizer step) the same", plan.gpu_needed))
    return FitResult(plan, changes)


def _with(config: RunConfig, key: str, value: Any) -> RunConfig:
    data = config.model_dump(mode="json")
    section, *path, name = key.split(".")
    target = data[section]
    for part in path:
        target = target[part]
    target[name] = value
    return RunConfig.model_validate(data, context={"check_packages": False})


Patch = tuple[str, Any, str] | None
Proposal = Callable[[RunConfig, str], Patch]


def _cache_texts(config: RunConfig, family: str) -> Patch:
    training = config.training
    trains_text = config.method == "textual_inversion" or (config.method == "lora" and not
                                                            config.network.train_unet_only)
    if training.cache_text_encoder_outputs or trains_text:
        return None
    return ("training.cache_text_encoder_outputs", True,
            "the text encoders stay on the CPU once every caption is encoded; no cost per step")


def _cache_latents(config: RunConfig, family: str) -> Patch:
    if config.training.cache_latents:
        return None
    return ("training.cache_latents", True, "the VAE stays on the CPU once every image is encoded; no cost per step "
            "(random crops and colour augmentation are then off)")


def _checkpointing(config: RunConfig, family: str) -> Patch:
    if config.training.gradient_checkpointing:
        return None
    return ("training.gradient_checkpointing", True, "keeps a few activations and recomputes the rest in backward: "
            "much less activation memory, about 20-30 % slower steps")


def _eight_bit(config: RunConfig, family: str) -> Patch:
    if config.optimizer.optimizer_type != "AdamW":
        return None
    return ("optimizer.optimizer_type", "AdamW8bit", "AdamW's two moments in 8 bits instead of 32: a quarter of the "
            "optimizer state; barely slower (needs bitsandbytes)")


def _fp8(config: RunConfig, family: str) -> Patch:
    if family_info(family).loader == "ldm" or config.model.fp8_base or config.model.fp8_base_unet:
        return None
    if config.training.mixed_precision == "no":
        return None
    return ("model.fp8_base", True, "the frozen base model's Linear weights in 8 bits: about half their memory, "
            "slightly less exact, a little slower")


def _offload_checkpoints(config: RunConfig, family: str) -> Patch:
    """Only where it makes the run fit (see _ONLY_IF_IT_FITS): it excludes block swapping, which saves more."""
    training = config.training
    if not training.gradient_checkpointing or training.cpu_offload_checkpointing or training.blocks_to_swap:
        return None
    return ("training.cpu_offload_checkpointing", True, "gradient checkpointing's saved block inputs wait in system "
            "RAM instead of on the GPU: about 15 % slower steps (the copies to and from the CPU)")


def _swap(config: RunConfig, family: str) -> Patch:
    """More swapped blocks (a frozen denoiser only), in sixths of the family's limit and at least 6 at a time: FLUX
    and SD3 go 6, 12, ... (their 35 or 36 blocks), SDXL's 85 resnets and transformer blocks 14, 28, ..."""
    limits = FAMILY_INFO.get(family)
    if limits is None or not limits.max_blocks_to_swap or config.method not in ("lora", "textual_inversion"):
        return None
    blocks = config.training.blocks_to_swap + max(6, limits.max_blocks_to_swap // 6)
    return ("training.blocks_to_swap", blocks, f"{blocks} blocks of the denoiser wait on the CPU and are copied in "
            "when used: their weights leave the GPU, each step waits for the copies (slower the more are swapped)")


def _smaller_batch(config: RunConfig, family: str) -> Patch:
    batch = config.dataset.general.batch_size
    if config.dataset.datasets or config.dataset.config_file or batch <= 1:
        return None
    return ("dataset.general.batch_size", batch // 2, f"batch size {batch // 2} instead of {batch}: about half the "
            "activations; the same images per optimizer step with twice the gradient accumulation")


# Proposals kept only when the run then fits: offloaded checkpointing cannot be combined with swapping
# (engine.config.rules_flux), so a run it does not bring under the card goes on to swapping instead.
_ONLY_IF_IT_FITS: frozenset[Proposal] = frozenset({_offload_checkpoints})


def _proposals() -> Iterator[Proposal]:
    """In order of what each costs in speed (none first), each one possibly several times (swapping, batch)."""
    yield from (_cache_texts, _cache_latents, _checkpointing, _eight_bit, _fp8, _offload_checkpoints)
    for _ in range(6):
        yield _swap
    for _ in range(4):
        yield _smaller_batch
