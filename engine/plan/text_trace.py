"""The text encoders a run trains, in the plan's trace of one step (engine.plan.trace): which ones, their trained
weights, and their forward on the batch's tokens, whose activations stay for the backward pass while the denoiser
runs.

Which encoders train is the engine's decision, by the engine's own rules: a LoRA's
(engine.train.learning_rates.lora_trains_text_encoders; T5 only with network_args train_t5xxl, which the network
itself decides); DreamBooth and fine-tuning train the encoders' own weights where the family's full method does
(SD1/SD2/SDXL: learning_rates.full_trains_text_encoders; SD3: CLIP-L and CLIP-G by
engine.train.method_full_sd3.text_encoder_rates; FLUX.1 never).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.config.schema import RunConfig
from engine.models.families import family_info

__all__ = ["FULL_METHODS", "cast_encoders", "encode_for_loss", "encoder_training", "prepare_encoders"]

FULL_METHODS = ("dreambooth", "finetune")
_CLIP_TOKENS = 77


def encoder_training(config: RunConfig, family: str, count: int) -> list[bool]:
    """Whether the run trains each of the family's `count` text encoders (LoRA modules on it, or its weights)."""
    if count == 0 or config.training.cache_text_encoder_outputs or config.method == "textual_inversion":
        return [False] * count
    from engine.train.learning_rates import lora_trains_text_encoders

    if config.method == "lora":
        return lora_trains_text_encoders(config, count)
    return _FULL_TRAINING[family_info(family).loader](config, count)


def _sd_full(config: RunConfig, count: int) -> list[bool]:
    from engine.train.learning_rates import full_trains_text_encoders

    return full_trains_text_encoders(config, count)


def _sd3_full(config: RunConfig, count: int) -> list[bool]:
    from engine.train.method_full_sd3 import text_encoder_rates

    return [rate > 0 for rate in text_encoder_rates(config)][:count]


# By FamilyInfo.loader: which encoders the family's full fine-tuning trains.
_FULL_TRAINING: dict[str, Callable[[RunConfig, int], list[bool]]] = {
    "ldm": _sd_full, "flux": lambda config, count: [False] * count, "sd3": _sd3_full}


def cast_encoders(config: RunConfig, encoders: list[nn.Module], *, frozen_dtype: torch.dtype,
                  trained_dtype: torch.dtype) -> None:
    """The trained encoders (still on the meta device) in placement's dtype: the trained dtype when full fine-tuning
    trains their own weights, the weight dtype under a LoRA."""
    for encoder in encoders:
        encoder.to(trained_dtype if config.method in FULL_METHODS else frozen_dtype)


def prepare_encoders(config: RunConfig, encoders: list[nn.Module]) -> list[nn.Parameter]:
    """The trained encoders as placement leaves them, made fake on the CPU (inside the trace's FakeTensorMode): in
    training mode, checkpointed with gradient checkpointing, their own weights trained by full fine-tuning and
    frozen under a LoRA. Returns the encoders' own trained weights."""
    full = config.method in FULL_METHODS
    trained: list[nn.Parameter] = []
    for encoder in encoders:
        encoder.to_empty(device="cpu").requires_grad_(full).train(True)
        if config.training.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        if full:
            trained.extend(encoder.parameters())
    return trained


def encode_for_loss(encoders: list[nn.Module], family: str, batch: int, text_tokens: int) -> torch.Tensor:
    """The trained encoders' forward on the batch's token ids, as a term of the loss (0 without encoders) so that
    backward goes through them. SD1/SD2/SDXL's CLIPs read one row of 77 per chunk and the run uses the
    penultimate layer; FLUX's and SD3's CLIPs read 77 tokens, T5 the run's T5 length, and their last outputs (the
    pooled and projected ones) are used."""
    total = torch.zeros(())
    from engine.networks.lora_names import is_t5_encoder

    chunked = family_info(family).loader == "ldm"
    for encoder in encoders:
        if is_t5_encoder(encoder):
            ids = torch.zeros(batch, text_tokens, dtype=torch.long)
        else:
            chunks = max(1, text_tokens // _CLIP_TOKENS) if chunked else 1
            ids = torch.zeros(batch * chunks, _CLIP_TOKENS, dtype=torch.long)
        out = encoder(input_ids=ids, output_hidden_states=chunked)
        used = out.hidden_states[-2] if chunked else out[0]
        total = total + used.float().mean() * 0.0
    return total
