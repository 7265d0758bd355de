"""Where the frozen model's parts live during training, and in which precision.

Frozen weights go to the device in the mixed-precision dtype; models whose outputs are cached go back to the CPU;
trained weights stay float32 unless full_fp16/bf16. How the denoiser's checkpointing is switched on is the family
loader's (``FamilyInfo.loader``, ``_CHECKPOINTING``); every denoiser is then placed the same way: tensor by tensor,
fp8-stored weights kept in fp8, the weights of swapped blocks left on the CPU (``engine.models.flux.fp8``,
``engine.models.block_swap``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.config.schema import RunConfig
from engine.models.families import family_info
from engine.models.vae import vae_dtype
from engine.train.precision import trained_dtype as weights_trained_dtype
from engine.train.setup import RunInputError

__all__ = ["enable_checkpointing", "place_models", "store_frozen_in_fp8"]


def store_frozen_in_fp8(config: RunConfig, model: Any, dtype: torch.dtype) -> None:
    """model.fp8_base / fp8_base_unet: the transformer's linear weights in float8 (and, with fp8_base alone, the
    text encoders'), computed in the mixed-precision dtype. Must run before the LoRA wraps the layers."""
    section = config.model
    if not (section.fp8_base or section.fp8_base_unet):
        return
    from engine.models.flux.fp8 import store_in_fp8

    field = "model.fp8_base" if section.fp8_base else "model.fp8_base_unet"
    try:
        store_in_fp8(model.unet, dtype)
        if section.fp8_base and not section.fp8_base_unet:
            for encoder in model.text.encoders:
                _text_encoder_in_fp8(encoder, dtype)
    except (RuntimeError, ValueError) as error:
        raise RunInputError(str(error), "set training.mixed_precision to bf16, or turn fp8 off", field) from error


def _text_encoder_in_fp8(encoder: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every linear layer but T5's feed-forward output (`wo`): transformers casts the gated activations to `wo`'s
    weight dtype, so an fp8 `wo` would run the activations themselves in fp8 (sd-scripts keeps it too)."""
    from engine.models.flux.fp8 import store_in_fp8

    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "wo":
            store_in_fp8(module, dtype)


def _unet_checkpointing(unet: Any, cpu_offload: bool) -> None:
    from engine.models.checkpointing import unet_checkpointing

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=unet_checkpointing(cpu_offload))


def _transformer_checkpointing(transformer: Any, cpu_offload: bool) -> None:
    transformer.enable_gradient_checkpointing(cpu_offload=cpu_offload)


# By FamilyInfo.loader: (denoiser, cpu_offload_checkpointing) switches gradient checkpointing on. Every family's
# blocks are checkpointed by engine.models.checkpointing, which the block swapper relies on to know that a checkpoint
# saves nothing inside a swapped block.
_CHECKPOINTING: dict[str, Callable[[Any, bool], None]] = {
    "ldm": _unet_checkpointing, "flux": _transformer_checkpointing, "sd3": _transformer_checkpointing}


def enable_checkpointing(denoiser: Any, family: str, cpu_offload: bool) -> None:
    """Gradient checkpointing of the family's denoiser as a run switches it on (the memory plan traces the same)."""
    _CHECKPOINTING[family_info(family).loader](denoiser, cpu_offload)


def _place_denoiser(config: RunConfig, model: Any, device: torch.device, dtype: torch.dtype, trains: bool) -> Any:
    """The denoiser on the device (its swapped blocks' weights on the CPU); returns the block swapper, if any."""
    from engine.models.block_swap import place_denoiser

    training, denoiser = config.training, model.unet
    denoiser.requires_grad_(False)
    if training.gradient_checkpointing:
        enable_checkpointing(denoiser, model.family, training.cpu_offload_checkpointing)
    try:
        return place_denoiser(denoiser, device, dtype, blocks_to_swap=training.blocks_to_swap, trainable=trains)
    except ValueError as error:  # more swapped blocks than this (possibly pruned) model has
        raise RunInputError(str(error), "lower training.blocks_to_swap", "training.blocks_to_swap") from error


def _move(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """`.to(device, dtype)`, except that fp8-stored weights keep their 1 byte a parameter."""
    if any("float8" in str(parameter.dtype) for parameter in module.parameters()):
        from engine.models.block_swap import place_denoiser

        place_denoiser(module, device, dtype)
    else:
        torch.nn.Module.to(module, device=device, dtype=dtype)


def place_models(config: RunConfig, model: Any, method: Any, accelerator: Any, dtype: torch.dtype, *,
                 latents_cached: bool, texts_cached: bool) -> Any:
    """Put every part where training needs it; returns the denoiser's block swapper (None without one)."""
    device = accelerator.device
    gradient_checkpointing = config.training.gradient_checkpointing
    # Trained weights stay in float32 under mixed precision (autocast computes in half), unless full_fp16/bf16.
    # A part that trains is placed in that dtype directly: a cast to half first would round the weights for good.
    trained_dtype = weights_trained_dtype(config.training)
    trained = method.trainable_modules()
    unet_trains = any(module is model.unet for module in trained)
    swapper = _place_denoiser(config, model, device, trained_dtype if unet_trains else dtype, unet_trains)
    # diffusers only checkpoints in training mode; the frozen denoiser has no dropout, so train() changes nothing else.
    model.unet.train(gradient_checkpointing)
    # Encoders whose outputs are cached wait on the host for the samples, which run them on the device in `dtype`:
    # kept in that dtype, a FLUX T5-XXL takes 9.5 GB of system RAM instead of 19, and comes to the GPU as it is.
    # A CPU run computes them where they are, in float32 as before.
    host_dtype = torch.float32 if device.type == "cpu" else dtype
    for encoder, trains in zip(model.text.encoders, method.trains_text_encoders, strict=True):
        encoder.requires_grad_(False)
        encoder_trains = any(module is encoder for module in trained)
        target_dtype = trained_dtype if encoder_trains else dtype
        _move(encoder, "cpu" if texts_cached else device, host_dtype if texts_cached else target_dtype)
        if trains and gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        encoder.train(trains)
    vae_device = "cpu" if latents_cached else device
    torch.nn.Module.to(model.vae.vae, device=vae_device,
                       dtype=vae_dtype(config.model.no_half_vae, torch.device(vae_device).type, dtype))
    for module in trained:
        # A swapping denoiser is already placed: its swapped blocks' weights live on the CPU between uses.
        if not (module is model.unet and swapper is not None):
            torch.nn.Module.to(module, device=device, dtype=trained_dtype)
        module.requires_grad_(True)  # a method may narrow this down when it builds its parameter groups
    if latents_cached and device.type == "cuda":
        torch.cuda.empty_cache()
    return swapper


# C++ compilers torch's inductor backend can build its CPU kernels with.
_CPP_COMPILERS = ("g++", "c++", "clang++")


def check_compile_backend(config: RunConfig, device: torch.device) -> None:
    """Refuse, before anything is loaded, a launch.dynamo_backend this machine cannot run.

    Raises:
        RunInputError: "cudagraphs" without a CUDA device; "inductor" on a CPU without a C++ compiler.
    """
    import shutil

    from engine.train.setup import RunInputError

    backend = config.launch.dynamo_backend
    if backend == "cudagraphs" and device.type != "cuda":
        raise RunInputError("launch.dynamo_backend = \"cudagraphs\" needs a CUDA GPU",
                            "use \"inductor\" or \"no\"", "launch.dynamo_backend")
    if backend == "inductor" and device.type == "cpu" and not any(shutil.which(name) for name in _CPP_COMPILERS):
        raise RunInputError("launch.dynamo_backend = \"inductor\" compiles C++ on a CPU, and no C++ compiler "
                            f"({', '.join(_CPP_COMPILERS)}) was found", "install one (e.g. Debian's g++), or use "
                            "\"aot_eager\" or \"no\"", "launch.dynamo_backend")


def compile_denoiser(config: RunConfig, model: Any, log: Any) -> None:
    """launch.dynamo_backend: compile the denoiser's forward with torch.compile, after the network is applied (its
    layers are part of the traced forward). `Module.compile` compiles in place, so the state-dict keys, attributes
    and saved files stay as they are. Nothing else compiles it: the engine never hands the model to accelerate's
    `prepare`, where the launcher's --dynamo_backend would apply.

    A float multiplier that changes between batches (datasets' network_multiplier) or the switch to eval mode for
    samples makes torch.compile trace again; that is a one-time cost per value.
    """
    backend = config.launch.dynamo_backend
    if backend == "no":
        return
    model.unet.compile(backend=backend)
    log.line(f"the denoiser is compiled with torch.compile (backend {backend}); the first steps trace it")
