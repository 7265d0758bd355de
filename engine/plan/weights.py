"""The plan's weights: the denoiser's (frozen by dtype and fp8 storage, swapped blocks on the host, or trained by
full fine-tuning), the text encoders' and the VAE's (resident or waiting on the host by what is cached; trained
encoders in the trained dtype)."""

from __future__ import annotations

import torch

from engine.config.schema import RunConfig
from engine.models.block_swap import MOVED_LAYERS
from engine.plan.architecture import Architecture
from engine.plan.items import GIB, PlanItem, dtype_name
from engine.train.precision import trained_dtype as weights_trained_dtype

__all__ = ["denoiser_weights", "other_parts", "swapped_blocks"]


def denoiser_weights(config: RunConfig, architecture: Architecture, frozen: torch.dtype) -> list[PlanItem]:
    """The denoiser's weights: trained ones are counted with the trained weights; frozen ones in the weight dtype,
    fp8 for the Linear weights with fp8_base (as store_in_fp8 keeps them). When swapping, the Linear and Conv2d
    weights of the swapped blocks wait on the host (what the swapper moves; their biases and norms stay) and one
    block's at a time visits the GPU while it runs."""
    denoiser = architecture.denoiser
    if config.method in ("dreambooth", "finetune"):
        return _traineddenoiser_weights(config, architecture)
    fp8 = config.model.fp8_base or config.model.fp8_base_unet
    swapped = swapped_blocks(config, architecture)
    gpu = 0
    for module in denoiser.modules():
        # Buffers too: SD3's position table alone is 0.4 GiB at SD3.5 medium's 384 x 384.
        gpu += sum(_frozen_bytes(module, tensor, fp8, frozen)
                   for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
    moved = [sum(_frozen_bytes(layer, layer.weight, fp8, frozen) for layer in denoiser.get_submodule(block).modules()
                 if isinstance(layer, MOVED_LAYERS)) for block in swapped]
    host, in_flight = sum(moved), max(moved, default=0)
    detail = f"{dtype_name(frozen)}{', Linear weights in fp8' if fp8 else ''}"
    if swapped:
        detail += f"; one swapped block's at a time while it runs ({in_flight / GIB:.2f} GiB)"
    items = [PlanItem("denoiser weights (frozen)", gpu - host + in_flight, "gpu", detail)]
    if swapped:
        items.append(PlanItem("denoiser blocks swapped to the CPU", host, "host",
                              f"{len(swapped)} blocks (training.blocks_to_swap): their Linear and Conv2d weights, "
                              "pinned"))
    return items


def _frozen_bytes(module: torch.nn.Module, tensor: torch.Tensor, fp8: bool, frozen: torch.dtype) -> int:
    fp8_weight = fp8 and isinstance(module, torch.nn.Linear) and tensor.ndim == 2
    return tensor.numel() * (1 if fp8_weight else frozen.itemsize if tensor.is_floating_point()
                             else tensor.element_size())


def _traineddenoiser_weights(config: RunConfig, architecture: Architecture) -> list[PlanItem]:
    """Full fine-tuning: the whole denoiser in its training dtype; the swapped blocks' parameters on the host (the
    fused backward pass steps them while they visit the device)."""
    dtype = weights_trained_dtype(config.training)
    denoiser = architecture.denoiser
    count = sum(p.numel() for p in denoiser.parameters())
    swapped = swapped_blocks(config, architecture)
    on_host = sum(p.numel() for name in swapped for p in denoiser.get_submodule(name).parameters())
    items = [PlanItem("trained weights (the whole denoiser)", (count - on_host) * dtype.itemsize, "gpu",
                      f"{count - on_host:,} parameters, {dtype_name(dtype)}")]
    if on_host:
        items.append(PlanItem("trained blocks swapped to the CPU", on_host * dtype.itemsize, "host",
                              f"{len(swapped)} blocks (training.blocks_to_swap), {on_host:,} parameters"))
    return items


def swapped_blocks(config: RunConfig, architecture: Architecture) -> list[str]:
    """The module paths of the denoiser's swapped blocks (any family's: engine.models.swap_layouts); ValueError when
    the model has fewer blocks than that."""
    blocks = config.training.blocks_to_swap
    if not blocks:
        return []
    from engine.models.swap_layouts import swapped_block_names

    return list(swapped_block_names(architecture.denoiser, blocks))


def _fully_trained_encoders(config: RunConfig, architecture: Architecture) -> list[str]:
    """The encoders whose own weights the run trains (none under a LoRA, which trains modules beside them)."""
    from engine.plan.text_trace import FULL_METHODS, encoder_training

    if config.method not in FULL_METHODS:
        return []
    names = list(architecture.text_encoders)
    flags = encoder_training(config, architecture.family, len(names))
    return [name for name, trains in zip(names, flags, strict=True) if trains]


def other_parts(config: RunConfig, architecture: Architecture, frozen: torch.dtype) -> list[PlanItem]:
    """Text encoders and VAE: on the GPU in the weight dtype unless their outputs are cached (then on the host, the
    encoders in the weight dtype and the VAE in float32, as placement keeps them on a GPU run). Encoders whose own
    weights train (DreamBooth / fine-tuning) are in the trained dtype, as placement puts them."""
    training = config.training
    items = []
    counts = architecture.text_encoders
    if sum(counts.values()):
        cached = training.cache_text_encoder_outputs
        trained = _fully_trained_encoders(config, architecture)
        trained_bytes = weights_trained_dtype(training).itemsize
        size = sum(count * (trained_bytes if name in trained else frozen.itemsize) for name, count in counts.items())
        detail = ", ".join(f"{name} {count:,}" for name, count in counts.items())
        if trained:
            detail += f" ({', '.join(trained)} trained: {dtype_name(weights_trained_dtype(training))})"
        items.append(PlanItem("text encoders", size, "host" if cached else "gpu",
                              detail + (" (outputs cached)" if cached else "")))
    if architecture.vae:
        cached = training.cache_latents
        vae_dtype = 4 if cached or config.model.no_half_vae else frozen.itemsize
        items.append(PlanItem("VAE", architecture.vae * vae_dtype, "host" if cached else "gpu",
                              f"{architecture.vae:,} parameters" + (" (latents cached)" if cached else "")))
    return items
