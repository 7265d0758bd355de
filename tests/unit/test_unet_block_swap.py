"""Block swapping and CPU-offloaded checkpointing for the SD1 / SD2 / SDXL UNet (issue 16): one mechanism with FLUX
and SD3 (engine.models.block_swap, engine.models.swap_layouts, engine.models.checkpointing).

The models are the tiny SD1 and SDXL UNets (diffusers' real architecture) with their weights perturbed, so no term is
a no-op; a "training step" is a forward pass, a squared-output loss and a backward pass into the engine's LoRA network
on every layer kohya's LoRA targets. On a machine without CUDA the swapper moves weights between two copies on the
CPU (every hook and marker still runs); the CUDA test does the real host <-> device path.
"""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from train_helpers import random_up_lora

from engine.models.block_swap import BlockSwapper, place_denoiser
from engine.models.checkpointing import unet_checkpointing
from engine.models.families import FAMILY_INFO
from engine.models.swap_layouts import swap_limits, swap_split, swapped_block_names, unet_swap_units

FAMILIES = ("sd1", "sdxl")
BATCH, LATENT, TOKENS = 2, 8, 7


def _unet(tiny_models: dict[str, Path], family: str, seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models[family], subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return unet.requires_grad_(False)


def _inputs(unet: nn.Module, device: str = "cpu", seed: int = 1) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    sample = torch.randn(BATCH, config.in_channels, LATENT, LATENT, generator=generator)
    text = torch.randn(BATCH, TOKENS, config.cross_attention_dim, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and size conditioning
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(BATCH, pooled, generator=generator).to(device),
                                       "time_ids": torch.randn(BATCH, 6, generator=generator).to(device)}}
    return (sample.to(device), torch.tensor([10, 500], device=device)), {"encoder_hidden_states": text.to(device),
                                                                          **extra}


def _network(unet: nn.Module, family: str, seed: int = 5) -> nn.Module:
    """A rank-4 LoRA (and LoCon on the resnets' convolutions), applied, with random up weights."""
    return random_up_lora(unet, family, 2 if family == "sdxl" else 1, seed, conv_dim=4, conv_alpha=4)


def _step(unet: nn.Module, network: nn.Module, device: str = "cpu") -> tuple[float, list[torch.Tensor]]:
    args, kwargs = _inputs(unet, device)
    loss = unet(*args, **kwargs).sample.float().pow(2).mean()
    loss.backward()
    grads = [param.grad.detach().cpu().clone() for param in network.parameters() if param.grad is not None]
    network.zero_grad(set_to_none=True)
    return loss.item(), grads


def _run(tiny_models: dict[str, Path], family: str, blocks: int, *, checkpointing: bool = False,
         cpu_offload: bool = False, steps: int = 2) -> tuple[list[tuple[float, list[torch.Tensor]]], Any, nn.Module]:
    unet = _unet(tiny_models, family)
    network = _network(unet, family)
    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=unet_checkpointing(cpu_offload))
        unet.train(True)  # diffusers checkpoints only in training mode
    swapper = place_denoiser(unet, "cpu", torch.float32, blocks_to_swap=blocks)
    unet.starts = {}  # forward calls per swapped unit (a checkpointed unit runs again in the backward pass)
    for name in swapper.swapped_names if swapper else []:
        unet.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: unet.starts.__setitem__(name, unet.starts.get(name, 0) + 1))
    return [_step(unet, network) for _ in range(steps)], swapper, unet


def _close(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    """Equal to float32 rounding: the swapper's markers add nodes to the graph, so autograd may add the gradients of a
    tensor with several users (the UNet's skip connections) in another order (measured: 4e-9 at most)."""
    return len(first) == len(second) > 0 and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7)
                                                 for a, b in zip(first, second, strict=True))


# ------------------------------------------------------------------------------------------------ the layout


@pytest.mark.parametrize("family", FAMILIES)
def test_the_units_are_every_resnet_and_transformer_block_in_the_order_the_forward_runs(family, tiny_models):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    unet = _unet(tiny_models, family)
    units = unet_swap_units(unet)
    kinds = {name for name, module in unet.named_modules() if isinstance(module, ResnetBlock2D | BasicTransformerBlock)}
    assert set(units) == kinds and len(units) == len(kinds)
    ran: list[str] = []
    for name in units:
        unet.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: ran.append(name))
    args, kwargs = _inputs(unet)
    with torch.no_grad():
        unet(*args, **kwargs)
    assert ran == units
    assert swap_limits(unet) == len(units) - 2
    assert swap_split(3, unet) == (3,)
    assert swapped_block_names(unet, 3) == units[-3:]
    with pytest.raises(ValueError, match=f"training.blocks_to_swap {len(units) - 1} is too many .* at most"):
        swap_split(len(units) - 1, unet)


@pytest.mark.parametrize("family, units", [("sd1", 38), ("sd2", 38), ("sdxl", 87)])
def test_the_family_limits_are_the_standard_unets_units_minus_two(family, units):
    """FamilyInfo.max_blocks_to_swap (what the config rules check) is what the real architectures allow."""
    from diffusers import UNet2DConditionModel

    from engine.models.configs import shipped_configs

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped_configs(family)["unet"])
    assert len(unet_swap_units(unet)) == units
    assert swap_limits(unet) == FAMILY_INFO[family].max_blocks_to_swap == units - 2
    # Nearly all of the UNet's weights are in the units (what swapping them can take off the device).
    in_units = sum(p.numel() for name in unet_swap_units(unet) for p in unet.get_submodule(name).parameters())
    assert in_units > 0.9 * sum(p.numel() for p in unet.parameters())


# ------------------------------------------------------------------------------------------------ swapping


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("checkpointing", "cpu_offload"), [(False, False), (True, False), (True, True)],
                         ids=["plain", "checkpointing", "cpu-offload-checkpointing"])
def test_swapping_the_most_blocks_changes_no_loss_or_gradient(family, checkpointing, cpu_offload, tiny_models):
    base, _, _ = _run(tiny_models, family, 0, checkpointing=checkpointing, cpu_offload=cpu_offload)
    limit = swap_limits(_unet(tiny_models, family))
    swapped, swapper, unet = _run(tiny_models, family, limit, checkpointing=checkpointing, cpu_offload=cpu_offload)
    assert [loss for loss, _ in swapped] == [loss for loss, _ in base]
    assert all(_close(a, b) for (_, a), (_, b) in zip(swapped, base, strict=True))
    assert swapper is not None and swapper.swapped_names == swapped_block_names(unet, limit)
    # In and out once in the forward pass and once in the backward pass, per swapped block and step.
    assert swapper.swap_ins == swapper.swap_outs == 2 * 2 * len(swapper.blocks)
    # Checkpointing still recomputes the swapped units in the backward pass (the swapper leaves saving to it), all
    # but the middle block's first resnet, which diffusers runs outside a checkpoint.
    once = {name for name, starts in unet.starts.items() if starts == 2}
    assert set(unet.starts.values()) <= {2, 4} and len(unet.starts) == len(swapper.blocks)
    assert once == (set(unet.starts) if not checkpointing else {"mid_block.resnets.0"} & set(unet.starts))
    for block in swapper.blocks:  # between steps every swapped weight is its host copy
        assert not block.resident and block.params
        assert all(param.data_ptr() == store.data_ptr() for param, store in zip(block.params, block.stores,
                                                                                  strict=True))


def test_resnet_convolutions_and_transformer_linears_move_norms_and_biases_stay(tiny_models):
    unet = _unet(tiny_models, "sd1")
    swapper = BlockSwapper(unet, 10, device="cpu")
    moved = {id(param) for param in swapper.swapped_parameters()}
    resnet = unet.get_submodule("up_blocks.1.resnets.1")
    block = unet.get_submodule("up_blocks.1.attentions.1.transformer_blocks.0")
    assert {id(resnet.conv1.weight), id(resnet.conv2.weight), id(resnet.time_emb_proj.weight),
            id(block.attn1.to_q.weight), id(block.ff.net[2].weight)} <= moved
    assert not {id(resnet.conv1.bias), id(resnet.norm1.weight), id(block.norm1.weight)} & moved
    assert id(unet.conv_in.weight) not in moved  # outside the units: stays on the device
    swapper.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_offload_checkpointing_gives_the_gradients_of_plain_checkpointing(family, tiny_models):
    plain, _, _ = _run(tiny_models, family, 0, checkpointing=True, steps=1)
    offloaded, _, _ = _run(tiny_models, family, 0, checkpointing=True, cpu_offload=True, steps=1)
    unchecked, _, _ = _run(tiny_models, family, 0, steps=1)
    assert offloaded[0][0] == plain[0][0] == unchecked[0][0]
    assert all(torch.equal(a, b) for a, b in zip(offloaded[0][1], plain[0][1], strict=True))
    assert _close(offloaded[0][1], unchecked[0][1])


def test_sampling_between_steps_swaps_and_matches(tiny_models):
    """A no-grad forward (sampling) brings each block in and out again; training then goes on as before."""
    reference = _unet(tiny_models, "sdxl")
    unet = _unet(tiny_models, "sdxl")
    swapper = place_denoiser(unet, "cpu", torch.float32, blocks_to_swap=swap_limits(unet))
    args, kwargs = _inputs(unet)
    with torch.no_grad():
        assert torch.equal(unet(*args, **kwargs).sample, reference(*args, **kwargs).sample)
    assert swapper is not None and not any(block.resident for block in swapper.blocks)


# ------------------------------------------------------------------------------------------------ placement


@pytest.mark.parametrize("family, blocks", [("sd1", 6), ("sdxl", 10)])
def test_placement_keeps_the_swapped_blocks_on_the_cpu_and_the_rest_on_the_device(family, blocks, tiny_models,
                                                                                   tmp_path):
    """The meta device stands for the GPU: after placement the swapped blocks' moved weights are on the CPU,
    everything else of the UNet and the LoRA on the "GPU", in the compute dtype."""
    from train_helpers import write_config

    from engine.config.io import load_config
    from engine.models.loading import load_model
    from engine.train.methods import create_method
    from engine.train.placement import place_models

    config = load_config(write_config(tmp_path / "config.toml", tiny_models, family,
                                      network={"train_unet_only": True},
                                      training={"mixed_precision": "bf16", "blocks_to_swap": blocks,
                                                "gradient_checkpointing": True}))
    model = load_model(tiny_models[family], family=family)
    method = create_method(config, model, tmp_path)
    swapper = place_models(config, model, method, SimpleNamespace(device=torch.device("meta")), torch.bfloat16,
                           latents_cached=True, texts_cached=True)
    assert swapper is not None and len(swapper.blocks) == blocks

    swapped = {id(param) for param in swapper.swapped_parameters()}
    assert swapped and all(param.device.type == "cpu" for param in swapper.swapped_parameters())
    assert all(param.device.type == "meta" for param in model.unet.parameters() if id(param) not in swapped)
    assert all(param.dtype == torch.bfloat16 for param in model.unet.parameters())
    assert {param.device.type for param in method.network.parameters()} == {"meta"}
    # (No step can run on the meta device: a CPU parameter cannot take meta data in place. The swapping tests above
    # check that the swapped weights are their host copies again after every step.)


def _allocated_after_forward(unet: nn.Module) -> int:
    """CUDA bytes allocated once the forward pass and the loss are done (what the backward pass will need)."""
    torch.cuda.synchronize()
    args, kwargs = _inputs(unet, "cuda")
    loss = unet(*args, **kwargs).sample.float().pow(2).mean()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    loss.backward()
    return allocated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the host <-> device path")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_swapping_matches_and_keeps_weights_on_the_host(family, tiny_models):
    results, allocated, swapped_bytes = [], [], 0
    for blocks in (0, 8):
        unet = _unet(tiny_models, family)
        network = _network(unet, family).to("cuda")
        swapper = place_denoiser(unet, "cuda", torch.float32, blocks_to_swap=blocks)
        results.append([_step(unet, network, "cuda") for _ in range(2)])
        allocated.append(_allocated_after_forward(unet))
        network.zero_grad(set_to_none=True)
        if swapper is not None:
            for param in swapper.swapped_parameters():
                assert param.device.type == "cpu" and param.is_pinned()
                swapped_bytes += param.numel() * param.element_size()
            assert unet.conv_in.weight.device.type == "cuda"
        del unet, network, swapper
        gc.collect()  # the patched forwards and the swapper's wrappers make reference cycles
        torch.cuda.empty_cache()
    (base, swapped) = results
    for (loss_a, grads_a), (loss_b, grads_b) in zip(base, swapped, strict=True):
        # cuDNN may pick other kernels for the other memory: compared to TF32 tolerance
        assert loss_a == pytest.approx(loss_b, rel=1e-3)
        assert all(torch.allclose(a, b, rtol=1e-2, atol=1e-5) for a, b in zip(grads_a, grads_b, strict=True))
    # Between the forward and the backward pass the swapped weights are not held on the device.
    assert swapped_bytes > 0 and allocated[0] - allocated[1] >= swapped_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to see the activations leave the device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_cpu_offload_checkpointing_keeps_the_checkpoints_inputs_off_the_device(family, tiny_models):
    """Between the forward and the backward pass a checkpointed unit's input (hidden states made for it alone: the
    concatenated skip connection of an up-path resnet, a transformer block's flattened tokens) waits on the CPU."""
    allocated, results = [], []
    for cpu_offload in (False, True):
        unet = _unet(tiny_models, family)
        network = _network(unet, family).to("cuda")
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=unet_checkpointing(cpu_offload))
        unet.train(True)
        place_denoiser(unet, "cuda", torch.float32)
        results.append(_step(unet, network, "cuda"))
        allocated.append(_allocated_after_forward(unet))
        del unet, network
        gc.collect()
        torch.cuda.empty_cache()
    assert allocated[1] < allocated[0]
    (plain_loss, plain_grads), (offloaded_loss, offloaded_grads) = results
    assert offloaded_loss == pytest.approx(plain_loss, rel=1e-3)
    assert all(torch.allclose(a, b, rtol=1e-2, atol=1e-5) for a, b in zip(plain_grads, offloaded_grads, strict=True))
