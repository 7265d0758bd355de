"""Cross-field rules of FLUX.1, Chroma and flow matching, and of the memory options that came with them.

The files a single-file model needs, fp8 storage, block swapping and CPU-offloaded checkpointing, the fused backward
pass, what FLUX full fine-tuning trains and saves, and flow settings that would have no effect. Registered with the
same `@rule` as the rules in :mod:`engine.config.rules`, which imports this module so that `check()` runs them all.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterator
from pathlib import PurePath
from typing import TYPE_CHECKING

from engine.config.choices import FLUX_FAMILIES, family_label
from engine.config.rule_registry import Problem, RuleContext, rule
from engine.models.families import FAMILY_INFO, FamilyInfo

if TYPE_CHECKING:
    from engine.config.schema import RunConfig


# --- FLUX.1 and Chroma -------------------------------------------------------------------------------------------

# A base model given as one of these is a single transformer file; a folder or a hub id is a diffusers layout that
# carries its own text encoders and autoencoder (spec §1.5). Decided from the name only: rules do not read files.
_SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
# What a single-file model's separate text-encoder files hold (FamilyInfo.text_encoder_files names the fields).
_SEPARATE_FILES = {"clip_l": "the CLIP-L text encoder (clip_l.safetensors)",
                   "clip_g": "the CLIP-G text encoder (clip_g.safetensors)",
                   "t5xxl": "the T5-XXL text encoder (e.g. t5xxl_fp16.safetensors)"}


def _is_single_file(location: str) -> bool:
    return PurePath(location.strip()).suffix.lower() in _SINGLE_FILE_SUFFIXES


@rule
def flux_files_are_given(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    model = config.model
    family = model.model_family
    if family not in FLUX_FAMILIES or not _is_single_file(model.pretrained_model_name_or_path):
        return
    needed = {key: _SEPARATE_FILES[key] for key in FAMILY_INFO[family].text_encoder_files}
    needed["ae"] = "the autoencoder (ae.safetensors)"
    for key, what in needed.items():
        if not getattr(model, key).strip():
            yield Problem(f"model.{key}", f"a {family_label(family)} single-file model holds only the transformer; "
                          f"give {what}, or use a diffusers folder as the base model")


def installed_torch_version() -> tuple[int, int] | None:
    """(major, minor) of the installed torch, read from its package metadata without importing it."""
    try:
        text = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


# torch.float8_e4m3fn, which fp8_base stores weights in, arrived in torch 2.1.
_FP8_TORCH = (2, 1)


@rule
def flux_memory_options_combine(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    limits = FAMILY_INFO.get(config.model.model_family)
    fp8 = [key for key in ("fp8_base", "fp8_base_unet") if getattr(config.model, key)]
    yield from _swap_and_offload(config, limits)
    yield from _swap_and_compile(config)
    yield from _fp8_precision_and_method(config, fp8)
    yield from _swap_trained_blocks(config, limits)
    yield from _fp8_torch_version(context, fp8)


def _swap_and_offload(config: RunConfig, limits: FamilyInfo | None) -> Iterator[Problem]:
    """Block swapping and CPU-offloaded checkpointing: each on its own, within the family's limits."""
    training = config.training
    if training.blocks_to_swap and training.cpu_offload_checkpointing:
        yield Problem("training.cpu_offload_checkpointing", "cannot be combined with blocks_to_swap (both move "
                      "data between CPU and GPU during the backward pass); keep one")
    if limits and training.blocks_to_swap > limits.max_blocks_to_swap:
        yield Problem("training.blocks_to_swap", f"{limits.label} can swap at most {limits.max_blocks_to_swap} "
                      f"blocks, not {training.blocks_to_swap}; use {limits.max_blocks_to_swap} or fewer")
    if training.cpu_offload_checkpointing and not training.gradient_checkpointing:
        yield Problem("training.cpu_offload_checkpointing", "offloads gradient checkpointing's activations, so it "
                      "needs training.gradient_checkpointing = true")


def _swap_and_compile(config: RunConfig) -> Iterator[Problem]:
    """torch.compile and block swapping: the swapper's hooks move each block's weights in and out around its
    forward, and dynamo traces them again for every block until its recompile limit (measured with the eager backend
    on the tiny SD1 UNet, 6 blocks: the limit of 8 is hit and the rest runs uncompiled), so the compile buys nothing
    and costs its tracing. CPU-offloaded checkpointing compiles and trains as without the compile (same run)."""
    backend = config.launch.dynamo_backend
    if backend != "no" and config.training.blocks_to_swap:
        yield Problem("launch.dynamo_backend", f"torch.compile (backend {backend!r}) cannot compile a denoiser "
                      "whose blocks training.blocks_to_swap moves in and out at every step; set dynamo_backend = "
                      "'no' to keep swapping, or blocks_to_swap = 0 to compile")


def _fp8_precision_and_method(config: RunConfig, fp8: list[str]) -> Iterator[Problem]:
    if fp8 and config.training.mixed_precision == "no":
        yield Problem(f"model.{fp8[0]}", "fp8 weights are computed in fp16 or bf16; set training.mixed_precision "
                      "to 'bf16' (or 'fp16'), or turn fp8 off")
    # Both keep frozen weights out of the way of training; weights that learn (full fine-tuning) must stay put.
    if fp8 and config.method != "lora":
        yield Problem(f"model.{fp8[0]}", f"fp8 storage is for LoRA training of a frozen model; method "
                      f"{config.method!r} trains the model's own weights: turn fp8 off or use method 'lora'")


def _swap_trained_blocks(config: RunConfig, limits: FamilyInfo | None) -> Iterator[Problem]:
    """Swapping blocks that full training updates works only where the family swaps trained blocks; LoRA and Textual
    Inversion leave the denoiser frozen."""
    if not config.training.blocks_to_swap or config.method in ("lora", "textual_inversion"):
        return
    if limits is not None and limits.swaps_trained_blocks:
        if not config.optimizer.fused_backward_pass:
            yield Problem("training.blocks_to_swap", f"swapping blocks while method {config.method!r} trains "
                          "them needs each block's weights updated inside the backward pass; set "
                          "optimizer.fused_backward_pass = true (Adafactor) or blocks_to_swap = 0")
    else:
        yield Problem("training.blocks_to_swap", f"swapping blocks needs a frozen model (LoRA); method "
                      f"{config.method!r} trains the blocks themselves: set blocks_to_swap = 0 or use method "
                      "'lora'")


def _fp8_torch_version(context: RuleContext, fp8: list[str]) -> Iterator[Problem]:
    if fp8 and context.check_packages:
        version = installed_torch_version()
        if version is not None and version < _FP8_TORCH:
            yield Problem(f"model.{fp8[0]}", f"the installed torch {version[0]}.{version[1]} has no float8_e4m3fn "
                          "type; update torch to 2.1 or newer, or turn fp8 off")


@rule
def flux_training_fits(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    family = config.model.model_family
    if family not in FLUX_FAMILIES:
        return
    label = family_label(family)
    if config.method == "textual_inversion":
        yield Problem("method", f"Textual Inversion is not available for {label}; train a LoRA instead")
    elif config.method != "lora":
        if config.optimizer.text_encoder_lr:
            yield Problem("optimizer.text_encoder_lr", f"{label} full fine-tuning trains only the transformer; "
                          "leave text_encoder_lr empty, or train a LoRA to adapt the text encoders")
        if config.training.stop_text_encoder_training:
            yield Problem("training.stop_text_encoder_training", f"{label} full fine-tuning does not train the text "
                          "encoders; set it back to 0")
    yield from _as_trained(config, family)
    training = config.training
    if training.loss_type in ("huber", "smooth_l1") and training.huber_schedule == "snr":
        yield Problem("training.huber_schedule", f"the snr schedule needs a noise schedule {label}'s flow matching "
                      "does not have; use 'constant' or 'exponential'")


def _as_trained(config: RunConfig, family: str) -> Iterator[Problem]:
    """Settings the family's model was trained with and needs (Chroma: T5's mask, guidance 0)."""
    info, label = FAMILY_INFO[family], family_label(family)
    if info.t5_attn_mask_required and not config.model.apply_t5_attn_mask:
        yield Problem("model.apply_t5_attn_mask", f"{label} is trained with T5's padding hidden; set it to true")
    guidance = info.trained_guidance_scale
    if guidance is not None and config.flow.guidance_scale != guidance:
        yield Problem("flow.guidance_scale", f"{label} is trained with guidance {guidance:g}; other values are not "
                      "what it learned", "warning")


@rule
def flow_settings_take_effect(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if config.model.model_family not in FLUX_FAMILIES:
        return
    flow = config.flow
    if flow.model_prediction_type == "sigma_scaled":
        yield Problem("flow.model_prediction_type", "sigma_scaled (sd-scripts' default) compares an image estimate "
                      "with the velocity target; 'raw' is how FLUX was trained and is recommended", "warning")
    shapes_sampling = flow.timestep_sampling == "sigma" and flow.weighting_scheme in ("logit_normal", "mode")
    weights_loss = flow.model_prediction_type == "sigma_scaled" and flow.weighting_scheme in ("sigma_sqrt", "cosmap")
    if flow.weighting_scheme not in ("uniform", "none") and not (shapes_sampling or weights_loss):
        yield Problem("flow.weighting_scheme", f"{flow.weighting_scheme} has no effect here: logit_normal and mode "
                      "shape timestep_sampling 'sigma', sigma_sqrt and cosmap weight the loss of "
                      "model_prediction_type 'sigma_scaled'", "warning")
    if flow.discrete_flow_shift != 3.0 and flow.timestep_sampling not in ("sigma", "shift"):
        yield Problem("flow.discrete_flow_shift", f"has no effect with timestep_sampling "
                      f"'{flow.timestep_sampling}' (only 'sigma' and 'shift' use it)", "warning")


# --- memory options and full fine-tuning -------------------------------------------------------------------------


@rule
def fused_backward_pass_fits(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    """The fused pass updates each weight inside the backward pass (engine.train.fused_backward)."""
    optimizer, training = config.optimizer, config.training
    if not optimizer.fused_backward_pass:
        return
    if optimizer.optimizer_type != "Adafactor":
        yield Problem("optimizer.fused_backward_pass", f"works only with optimizer_type 'Adafactor', not "
                      f"{optimizer.optimizer_type!r}; switch to Adafactor or turn fused_backward_pass off")
    if training.gradient_accumulation_steps != 1:
        yield Problem("training.gradient_accumulation_steps", "must be 1 with optimizer.fused_backward_pass, which "
                      "applies each gradient as soon as it is computed; set it to 1 or turn fused_backward_pass off")
    if training.mixed_precision == "fp16":
        yield Problem("training.mixed_precision", "fp16 loss scaling can only skip a whole optimizer step, and "
                      "optimizer.fused_backward_pass splits the step per weight; use 'bf16' or turn "
                      "fused_backward_pass off")


@rule
def flux_full_model_format(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if config.model.model_family in FLUX_FAMILIES and config.method in ("dreambooth", "finetune") \
            and config.saving.save_model_as == "ckpt":
        yield Problem("saving.save_model_as", f"{family_label(config.model.model_family)} full fine-tuning saves a "
                      "BFL file ('safetensors') or a diffusers folder ('diffusers', 'diffusers_safetensors'), not "
                      "a .ckpt")
