"""Block swapping and fp8 storage for the SD3 / SD3.5 MMDiT (engine.models.flux.block_swap, engine.models.flux.fp8).

The models are tiny MMDiTs of each variant's architecture (engine.models.sd3.mmdit) with four joint blocks and random
weights; a "training step" is a forward pass under bf16 autocast, a squared-output loss and a backward pass into
LoRA modules (engine.networks.lora_modules) on every Linear of the joint blocks. On a machine without CUDA the swapper
moves weights between two copies on the CPU, and every hook and marker still runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.models.flux.block_swap import (  # noqa: E402
    BlockSwapper,
    place_transformer,
    swap_limits,
    swap_split,
    swapped_block_names,
)
from engine.models.flux.fp8 import store_in_fp8  # noqa: E402
from engine.models.sd3.params import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, SD3Params, tiny_params  # noqa: E402
from engine.networks.lora_modules import LoRAModule  # noqa: E402

VARIANTS = ("medium", "5-medium", "5-large")
BATCH, SIZE, TEXT = 2, 8, 5


def _params(variant: str) -> SD3Params:
    """Four joint blocks, so two can swap (depth - 2); 5-medium keeps attn2 on blocks 0 and 3 (a swapped one)."""
    params = replace(tiny_params(variant), depth=4)
    return replace(params, attn2_layers=(0, 3)) if params.attn2_layers else params


def _model(params: SD3Params, seed: int = 0) -> nn.Module:
    from engine.models.sd3.mmdit import MMDiT

    torch.manual_seed(seed)
    model = MMDiT(params)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.1
                norm_scale = name.endswith(("ln_q.weight", "ln_k.weight", "norm.weight"))
                tensor.copy_(1 + noise if norm_scale else noise)
    return model.requires_grad_(False)


def _inputs(params: SD3Params, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(BATCH, params.in_channels, SIZE, SIZE, generator=generator),
            "t": torch.tensor([300.0, 850.0]),
            "y": torch.randn(BATCH, params.adm_in_channels, generator=generator),
            "context": torch.randn(BATCH, TEXT, params.context_in_dim, generator=generator)}


def _lora(model: nn.Module, seed: int = 5) -> list[LoRAModule]:
    """A rank-4 LoRA on every Linear of every joint block, applied, with random up weights."""
    torch.manual_seed(seed)
    modules = []
    for name, layer in model.joint_blocks.named_modules():
        if isinstance(layer, nn.Linear):
            module = LoRAModule("lora_unet_joint_blocks_" + name.replace(".", "_"), layer, lora_dim=4, alpha=4)
            module.apply_to()
            with torch.no_grad():
                module.lora_up.weight.normal_(0, 0.1)
            modules.append(module)
    return modules


def _step(model: nn.Module, lora: list[LoRAModule]) -> tuple[float, list[torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**_inputs(model.params))
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = []
    for module in lora:
        for param in module.parameters():
            grads.append(param.grad.detach().float().clone())
            param.grad = None
    return loss.item(), grads


def _same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _run(params: SD3Params, blocks: int, *, fp8: bool, checkpointing: bool, steps: int = 2
         ) -> tuple[list[float], list[list[torch.Tensor]], BlockSwapper | None]:
    model = _model(params)
    if fp8:
        store_in_fp8(model, torch.bfloat16)
    lora = _lora(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
    swapper = place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=blocks)
    results = [_step(model, lora) for _ in range(steps)]
    return [loss for loss, _ in results], [grads for _, grads in results], swapper


# --------------------------------------------------------------------------------------------------- limits


def test_limits_are_depth_minus_two_per_variant() -> None:
    assert swap_limits(SD3_MEDIUM) == swap_limits(SD35_MEDIUM) == 22
    assert swap_limits(SD35_LARGE) == 36
    assert swap_split(36, SD35_LARGE) == (36,)
    assert swap_split(0, SD3_MEDIUM) == (0,)
    assert swapped_block_names(SD3_MEDIUM, 3) == ["joint_blocks.21", "joint_blocks.22", "joint_blocks.23"]
    assert swap_limits(tiny_params("medium")) == 0


@pytest.mark.parametrize(("params", "limit"), [(SD3_MEDIUM, 22), (SD35_MEDIUM, 22), (SD35_LARGE, 36)],
                         ids=["medium", "5-medium", "5-large"])
def test_more_than_depth_minus_two_is_refused_by_name(params: SD3Params, limit: int) -> None:
    with pytest.raises(ValueError, match=rf"training\.blocks_to_swap {limit + 1} .*\({params.depth} joint blocks\)"
                                         rf".*at most {limit}"):
        swap_split(limit + 1, params)


def test_place_refuses_too_many_before_moving_anything() -> None:
    params = _params("5-large")
    model = _model(params)
    with pytest.raises(ValueError, match=r"training\.blocks_to_swap 3 .*at most 2"):
        place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=3)
    assert next(model.parameters()).dtype == torch.float32


# ------------------------------------------------------------------------------------------------- swapping


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("fp8", "checkpointing"), [(False, False), (True, False), (False, True)],
                         ids=["bf16", "fp8", "checkpointing"])
def test_swapping_the_most_blocks_changes_no_loss_or_gradient(variant: str, fp8: bool, checkpointing: bool) -> None:
    params = _params(variant)
    base_losses, base_grads, none = _run(params, 0, fp8=fp8, checkpointing=checkpointing)
    assert none is None
    limit = swap_limits(params)
    assert limit == params.depth - 2
    losses, grads, swapper = _run(params, limit, fp8=fp8, checkpointing=checkpointing)
    assert losses == base_losses
    assert all(_same(a, b) for a, b in zip(grads, base_grads, strict=True))
    assert swapper is not None and swapper.blocks_to_swap == limit
    assert swapper.swapped_names == ["joint_blocks.2", "joint_blocks.3"] == swapped_block_names(params, limit)
    # In and out once in the forward pass and once in the backward pass, per swapped block and step.
    assert swapper.swap_ins == swapper.swap_outs == 2 * 2 * len(swapper.blocks)


def test_between_steps_the_swapped_weights_are_their_host_copies() -> None:
    params = _params("5-medium")
    model = _model(params)
    store_in_fp8(model, torch.bfloat16)
    lora = _lora(model)
    swapper = place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=2)
    assert swapper is not None
    _step(model, lora)
    last = model.joint_blocks[3]
    linears = [layer for layer in last.modules() if isinstance(layer, nn.Linear)]
    swapped = {id(param) for param in swapper.swapped_parameters()}
    assert {id(layer.weight) for layer in linears} <= swapped  # attn2 of the swapped 5-medium block too
    assert any(".attn2." in name for name, _ in last.named_modules())
    for block in swapper.blocks:
        assert not block.resident and block.holds == 0
        for param, store in zip(block.params, block.stores, strict=True):
            assert param.data_ptr() == store.data_ptr() and param.dtype == torch.float8_e4m3fn
    # Biases and the blocks that stay are untouched by the swapper.
    assert all(layer.bias is None or layer.bias.dtype == torch.bfloat16 for layer in linears)
    assert id(model.joint_blocks[0].x_block.attn.qkv.weight) not in swapped


def test_sampling_without_gradients_equals_the_unswapped_model() -> None:
    params = _params("medium")
    reference = _model(params)
    place_transformer(reference, "cpu", torch.bfloat16)
    model = _model(params)
    swapper = place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=2)
    assert swapper is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(**_inputs(params)), reference(**_inputs(params)))
    assert not any(block.resident for block in swapper.blocks)
    swapper.close()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(**_inputs(params)), reference(**_inputs(params)))


def test_fp8_stores_every_linear_of_the_mmdit_and_trains_a_lora() -> None:
    params = _params("5-large")
    model = _model(params)
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert store_in_fp8(model, torch.bfloat16) == len(linears)
    assert all(module.weight.dtype == torch.float8_e4m3fn for module in linears)
    lora = _lora(model)
    loss, grads = _step(model, lora)
    assert loss > 0 and all(torch.isfinite(grad).all() for grad in grads)
    assert any(grad.abs().sum() > 0 for grad in grads)
    assert all(module.weight.grad is None for module in linears)


# ------------------------------------------------------------------------------- full fine-tuning with swapping


# The vector c (timestep + pooled text) enters every joint block, so its gradient is a sum over the blocks, and the
# swapped blocks' input markers change the order autograd adds it up in: the embedders that make c get gradients
# that differ in the last bits (float addition), which bf16 autocast and a few Adafactor steps then amplify.
C_EMBEDDERS = ("t_embedder", "y_embedder")


def _full_run(params: SD3Params, blocks: int, *, fused: bool = True, checkpointing: bool = False, steps: int = 3,
              train_c_embedders: bool = False, autocast: bool = True
              ) -> tuple[list[float], dict[str, torch.Tensor], BlockSwapper | None, nn.Module]:
    """The MMDiT's weights train in float32 (bf16 autocast), Adafactor stepping each tensor in the backward pass."""
    from transformers.optimization import Adafactor

    from engine.train.fused_backward import FusedBackward

    model = _model(params)
    if checkpointing:
        model.enable_gradient_checkpointing()
    swapper = place_transformer(model, "cpu", torch.float32, blocks_to_swap=blocks, trainable=True)
    model.requires_grad_(True)  # what the trainer does after placing a model that trains
    if not train_c_embedders:
        for name in C_EMBEDDERS:
            getattr(model, name).requires_grad_(False)
    optimizer = Adafactor([param for param in model.parameters() if param.requires_grad], lr=1e-2,
                          relative_step=False, scale_parameter=False, warmup_init=False)
    if fused:
        FusedBackward(optimizer, max_grad_norm=1.0)
    losses = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**_inputs(params, seed=10 + step))
        loss = out.float().pow(2).mean()
        loss.backward()
        if not fused:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {key: value.clone() for key, value in model.state_dict().items()}, swapper, model


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "checkpointing"), [*((variant, False) for variant in VARIANTS),
                                                       ("5-medium", True)])
def test_full_fine_tuning_with_the_most_blocks_swapped_trains_the_same_weights(variant: str,
                                                                              checkpointing: bool) -> None:
    params = _params(variant)
    base_losses, base_state, _, _ = _full_run(params, 0, checkpointing=checkpointing)
    losses, state, swapper, model = _full_run(params, params.depth - 2, checkpointing=checkpointing)
    assert losses == base_losses and len(set(losses)) == len(losses)  # the weights moved between the steps
    assert state.keys() == base_state.keys()
    for key, tensor in base_state.items():
        assert torch.equal(state[key], tensor), key
    assert swapper is not None and swapper.swapped_names == ["joint_blocks.2", "joint_blocks.3"]
    for block in swapper.blocks:  # between steps the trained weights are their (updated) host copies
        assert not block.resident and not block.dirty
        assert block.params and all(param.requires_grad for param in block.params)
        for param, store in zip(block.params, block.stores, strict=True):
            assert param.data_ptr() == store.data_ptr() and param.grad is None
    reference = _model(params)
    trained_weight, initial = (m.joint_blocks[3].x_block.mlp.fc2.weight for m in (model, reference))
    assert not torch.equal(trained_weight, initial)
    # Sampling (no gradients) and close() see the trained weights.
    with torch.no_grad():
        sampled = model(**_inputs(params))
        swapper.close()
        assert torch.equal(model(**_inputs(params)), sampled)


def test_with_the_c_embedders_trained_too_only_their_summation_order_differs() -> None:
    """One float32 step with every weight training: all equal but the embedders of c, which differ in the last bits."""
    params = _params("5-medium")
    _, base_state, _, _ = _full_run(params, 0, steps=1, train_c_embedders=True, autocast=False)
    _, state, _, _ = _full_run(params, 2, steps=1, train_c_embedders=True, autocast=False)
    initial = _model(params).state_dict()
    for key, tensor in base_state.items():
        if key.startswith(C_EMBEDDERS):
            assert not torch.equal(tensor, initial[key]), key  # trained
            assert torch.allclose(state[key], tensor, rtol=0, atol=1e-6), key
        else:
            assert torch.equal(state[key], tensor), key


def test_full_fine_tuning_with_swapping_needs_the_update_in_the_backward_pass() -> None:
    with pytest.raises(RuntimeError, match=r"training\.blocks_to_swap: joint_blocks\.3 trains.*"
                                           r"optimizer\.fused_backward_pass"):
        _full_run(_params("medium"), 2, fused=False, steps=1)


def test_a_lora_swapper_still_refuses_trained_weights() -> None:
    params = _params("medium")
    model = _model(params)
    place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=2)
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match="only frozen weights can be swapped"):
        model(**_inputs(params))


def test_moving_a_placed_model_again_is_refused() -> None:
    """What the trainer must not do after placing a model whose blocks swap: the host copies would be stale."""
    params = _params("5-large")
    model = _model(params)
    place_transformer(model, "cpu", torch.float32, blocks_to_swap=2, trainable=True)
    model.requires_grad_(True)
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match=r"joint_blocks\.2 were moved after place_transformer"):
        model(**_inputs(params))
