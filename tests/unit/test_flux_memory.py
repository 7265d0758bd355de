"""engine.models.flux.fp8 and .block_swap: fp8 storage, block swapping, their composition with LoRA and checkpointing.

The models are tiny FLUX transformers with random weights; a "training step" is a forward pass under bf16 autocast,
a squared-output loss and a backward pass into a real LoRA network (engine.networks.lora). On a machine without
CUDA the swapper moves weights between two copies on the CPU (every hook and marker still runs); the CUDA test
does the real host <-> device path.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from train_helpers import random_up_lora  # noqa: E402

from engine.models.flux.block_swap import (  # noqa: E402
    BlockSwapper,
    place_transformer,
    swap_limits,
    swap_split,
    swapped_block_names,
)
from engine.models.flux.fp8 import is_stored_in_fp8, store_in_fp8  # noqa: E402
from engine.models.flux.params import CHROMA, FLUX_DEV, FLUX_SCHNELL, FluxParams  # noqa: E402
from engine.models.flux.transformer import Flux  # noqa: E402
from engine.networks.lora_modules import LoRAModule  # noqa: E402

TINY = FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                  axes_dim=(4, 14, 14))
# Enough blocks to swap some: at most N - 2 of each kind, so (4, 6) blocks allow blocks_to_swap up to 4.
SWAPPABLE = replace(TINY, depth=4, depth_single_blocks=6)
TINY_CHROMA = replace(TINY, depth=4, depth_single_blocks=6, guidance_embed=False, chroma=True,
                      approximator_hidden=32, approximator_depth=2)
BATCH, TOKENS, TEXT = 2, 12, 7
FP8 = torch.float8_e4m3fn


def _model(params: FluxParams = TINY, seed: int = 0) -> Flux:
    """Random weights (norm scales around 1), so no term of the forward pass is a no-op."""
    model = Flux(params)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator) * 0.1
            tensor.copy_(1 + noise if name.endswith(".scale") else noise)
    return model.requires_grad_(False)


def _inputs(params: FluxParams, device: str = "cpu", seed: int = 1) -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(BATCH, TOKENS, 3)
    img_ids[..., 1] = torch.arange(TOKENS) // 4
    img_ids[..., 2] = torch.arange(TOKENS) % 4
    inputs = dict(
        img=torch.randn(BATCH, TOKENS, params.in_channels, generator=generator),
        img_ids=img_ids,
        txt=torch.randn(BATCH, TEXT, params.context_in_dim, generator=generator),
        txt_ids=torch.zeros(BATCH, TEXT, 3),
        timesteps=torch.tensor([0.3, 0.85]),
        y=None if params.chroma else torch.randn(BATCH, params.vec_in_dim, generator=generator),
        guidance=torch.tensor([3.5, 1.0]) if params.guidance_embed else None,
    )
    return {key: None if value is None else value.to(device) for key, value in inputs.items()}


def _network(model: Flux, seed: int = 5, network_args: dict | None = None) -> nn.Module:
    """A rank-4 LoRA on every block layer, applied, with random up weights so its gradients are not trivial."""
    chroma = model.params.chroma
    return random_up_lora(model, "chroma" if chroma else "flux1", 1 if chroma else 2, seed,
                          network_args=network_args)


def _step(model: Flux, network: nn.Module, device: str = "cpu") -> tuple[float, list[torch.Tensor]]:
    """One training-style forward and backward; the loss and the LoRA gradients (which are then cleared)."""
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = model(**_inputs(model.params, device))
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = [param.grad.detach().float().cpu().clone() for param in network.parameters() if param.grad is not None]
    network.zero_grad(set_to_none=True)
    return loss.item(), grads


def _same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# ------------------------------------------------------------------------------------------------ fp8 storage


def test_fp8_linear_weights_take_one_byte_and_the_rest_computes_in_bf16() -> None:
    model = _model()
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert store_in_fp8(model, torch.bfloat16) == len(linears)
    assert is_stored_in_fp8(model)
    for module in linears:
        assert module.weight.dtype == FP8 and module.weight.element_size() == 1
        assert not module.weight.requires_grad
        assert module.bias is None or module.bias.dtype == torch.bfloat16
    others = [param for module in model.modules() if not isinstance(module, nn.Linear)
              for param in module.parameters(recurse=False)]
    assert others and all(param.dtype == torch.bfloat16 for param in others)  # the RMSNorm scales
    weight_bytes = sum(module.weight.numel() * module.weight.element_size() for module in linears)
    assert weight_bytes == sum(module.weight.numel() for module in linears)


def _rounded_through_fp8(model: Flux) -> Flux:
    """The plain bf16 model with each Linear weight rounded to fp8 and back (fp8 values are exact in bf16)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(module.weight.to(FP8).float())
    return model.to(torch.bfloat16)


@pytest.mark.parametrize("params", [TINY, TINY_CHROMA], ids=["flux", "chroma"])
def test_fp8_training_step_equals_the_rounded_bf16_model(params: FluxParams) -> None:
    fp8 = _model(params)
    store_in_fp8(fp8, torch.bfloat16)
    fp8_loss, fp8_grads = _step(fp8, _network(fp8))

    rounded = _rounded_through_fp8(_model(params))
    rounded_loss, rounded_grads = _step(rounded, _network(rounded))
    assert fp8_loss == rounded_loss
    assert _same(fp8_grads, rounded_grads)

    plain = _model(params).to(torch.bfloat16)
    plain_loss, _ = _step(plain, _network(plain))
    # Measured: 0.06 % (flux) and 1.2 % (chroma, whose approximator output feeds every modulation) on these random
    # 0.1-scale weights; fp8's 3 mantissa bits round each weight by up to 6 %.
    assert abs(fp8_loss - plain_loss) / plain_loss < 0.03


def test_fp8_file_weights_go_through_the_same_path() -> None:
    """A model loaded from an fp8 file (every tensor float8_e4m3fn) keeps its weights and up-casts the rest."""
    from_file = _model().to(FP8)
    store_in_fp8(from_file, torch.bfloat16)
    assert from_file.img_in.weight.dtype == FP8 and from_file.img_in.bias.dtype == torch.bfloat16
    file_loss, file_grads = _step(from_file, _network(from_file))

    reference = _model()
    with torch.no_grad():
        for param in reference.parameters():  # the file held every tensor in fp8
            param.copy_(param.to(FP8).float())
    store_in_fp8(reference, torch.bfloat16)
    reference_loss, reference_grads = _step(reference, _network(reference))
    assert file_loss == reference_loss and _same(file_grads, reference_grads)


def test_lora_on_an_fp8_layer_trains_and_the_layer_stays_frozen() -> None:
    layer = nn.Linear(16, 8)
    container = nn.Sequential(layer)
    store_in_fp8(container, torch.bfloat16)
    lora = LoRAModule("lora_unet_test", layer, lora_dim=4, alpha=4)
    lora.apply_to()
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = container(x)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert lora.lora_down.weight.grad is not None and lora.lora_down.weight.grad.abs().sum() > 0
    assert lora.lora_up.weight.grad is not None and lora.lora_up.weight.grad.abs().sum() > 0
    assert layer.weight.grad is None and not layer.weight.requires_grad and layer.weight.dtype == FP8
    assert x.grad is not None and x.grad.dtype == torch.float32
    lora.restore()  # the LoRA gives back the fp8 forward it wrapped
    assert is_stored_in_fp8(container)


def test_fp8_after_the_lora_is_refused() -> None:
    model = _model()
    _network(model)
    with pytest.raises(RuntimeError, match="before the network's apply_to"):
        store_in_fp8(model, torch.bfloat16)


def test_other_float8_kinds_are_refused_by_name() -> None:
    model = _model()
    with torch.no_grad():
        model.txt_in.weight.data = model.txt_in.weight.data.to(torch.float8_e5m2)
    with pytest.raises(ValueError, match=r"txt_in\.weight \(float8_e5m2\).*float8_e4m3fn"):
        store_in_fp8(model, torch.bfloat16)
    assert model.img_in.weight.dtype == torch.float32  # refused before anything changed


def test_fp8_needs_half_precision_compute_and_a_torch_with_float8(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="mixed_precision"):
        store_in_fp8(_model(), torch.float32)
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(RuntimeError, match="model.fp8_base needs torch.float8_e4m3fn"):
        store_in_fp8(_model(), torch.bfloat16)


def test_cpu_offload_checkpointing_composes_with_fp8() -> None:
    plain = _model()
    store_in_fp8(plain, torch.bfloat16)
    plain_loss, plain_grads = _step(plain, _network(plain))
    for cpu_offload in (False, True):
        checkpointed = _model()
        store_in_fp8(checkpointed, torch.bfloat16)
        network = _network(checkpointed)
        checkpointed.enable_gradient_checkpointing(cpu_offload=cpu_offload)
        loss, grads = _step(checkpointed, network)
        assert loss == plain_loss and _same(grads, plain_grads)


# ------------------------------------------------------------------------------------------------ swap limits


def test_swap_limits_and_split_follow_sd_scripts() -> None:
    assert swap_limits(FLUX_DEV) == swap_limits(FLUX_SCHNELL) == swap_limits(CHROMA) == 35
    assert swap_split(35, FLUX_DEV) == (17, 36)
    assert swap_split(18, FLUX_DEV) == (9, 18)
    assert swap_split(7, FLUX_DEV) == (3, 8)
    assert swap_split(0, FLUX_DEV) == (0, 0)
    with pytest.raises(ValueError, match="training.blocks_to_swap 36 .* at most 35"):
        swap_split(36, FLUX_DEV)
    with pytest.raises(ValueError, match="must not be negative"):
        swap_split(-1, FLUX_DEV)
    assert swap_limits(TINY) == 0  # two of each: N - 2 = 0
    assert swap_limits(SWAPPABLE) == 4 and swap_split(4, SWAPPABLE) == (2, 4)
    assert swap_limits(replace(FLUX_DEV, depth=8)) == 13  # pruned: 6 double blocks at most
    assert swapped_block_names(SWAPPABLE, 3) == ["double_blocks.3", "single_blocks.2", "single_blocks.3",
                                                  "single_blocks.4", "single_blocks.5"]


# ------------------------------------------------------------------------------------------------ block swapping


class _HostCopyWatch(TorchDispatchMode):
    """Records every op, forward or backward, that reads a swapped weight's host copy (not the copy that moves it)."""

    def __init__(self, swapper: BlockSwapper) -> None:
        super().__init__()
        self.stores = {store.untyped_storage().data_ptr() for block in swapper.blocks for store in block.stores}
        self.misuses: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func not in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            for arg in [*args, *(kwargs or {}).values()]:
                if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() in self.stores:
                    self.misuses.append(str(func))
        return func(*args, **(kwargs or {}))


def _swapped_run(params: FluxParams, blocks: int, *, fp8: bool, checkpointing: bool, steps: int = 2
                 ) -> tuple[list[float], list[list[torch.Tensor]], BlockSwapper | None, Flux]:
    model = _model(params)
    if fp8:
        store_in_fp8(model, torch.bfloat16)
    network = _network(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
    swapper = place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=blocks)
    losses, grads = [], []
    for step in range(steps):
        if swapper is None or step < steps - 1:
            loss, step_grads = _step(model, network)
        else:  # the watch slows every op down, so it looks at the last step only
            with _HostCopyWatch(swapper) as watch:
                loss, step_grads = _step(model, network)
            assert watch.misuses == []
        losses.append(loss)
        grads.append(step_grads)
    return losses, grads, swapper, model


@pytest.mark.parametrize(("params", "checkpointing", "fp8"), [
    (SWAPPABLE, False, False), (SWAPPABLE, False, True), (SWAPPABLE, True, False), (SWAPPABLE, True, True),
    (TINY_CHROMA, False, True), (TINY_CHROMA, True, False),
], ids=["flux-bf16", "flux-fp8", "flux-checkpointing-bf16", "flux-checkpointing-fp8", "chroma-fp8",
        "chroma-checkpointing-bf16"])
def test_swapping_the_most_blocks_changes_no_loss_or_gradient(params: FluxParams, fp8: bool,
                                                              checkpointing: bool) -> None:
    base_losses, base_grads, _, _ = _swapped_run(params, 0, fp8=fp8, checkpointing=checkpointing)
    limit = swap_limits(params)
    losses, grads, swapper, model = _swapped_run(params, limit, fp8=fp8, checkpointing=checkpointing)
    assert losses == base_losses
    assert all(_same(a, b) for a, b in zip(grads, base_grads, strict=True))
    assert swapper is not None and swapper.blocks_to_swap == limit
    # In and out once in the forward pass and once in the backward pass, per swapped block and step.
    assert swapper.swap_ins == swapper.swap_outs == 2 * 2 * len(swapper.blocks)
    assert swapper.swapped_names == swapped_block_names(params, limit)


def test_between_steps_the_swapped_weights_are_their_host_copies() -> None:
    _, _, swapper, model = _swapped_run(SWAPPABLE, 3, fp8=True, checkpointing=False, steps=1)
    assert swapper is not None
    swapped = {id(param) for param in swapper.swapped_parameters()}
    assert len(swapped) == 1 * 10 + 4 * 3  # a double block has 10 Linear layers (5 a stream), a single 3
    for block in swapper.blocks:
        for param, store in zip(block.params, block.stores, strict=True):
            assert param.device == swapper.offload_device and param.data_ptr() == store.data_ptr()
            assert param.dtype == FP8
        assert not block.resident and block.holds == 0
    moved_in = swapper.bytes_in
    assert moved_in == 2 * sum(store.numel() for block in swapper.blocks for store in block.stores)  # fp8: 1 byte
    # Biases, norm scales and the blocks that stay are in the compute dtype, untouched by the swapper.
    assert model.double_blocks[3].img_attn.qkv.bias.dtype == torch.bfloat16
    assert model.double_blocks[3].img_attn.norm.query_norm.scale.dtype == torch.bfloat16
    assert id(model.double_blocks[0].img_attn.qkv.weight) not in swapped


def test_sampling_and_an_abandoned_step_leave_the_layout_as_it_was() -> None:
    """A no-grad forward (sampling) swaps in and out; a forward whose backward never runs is undone next time."""
    reference = _model(SWAPPABLE)
    network_ref = _network(reference)
    place_transformer(reference, "cpu", torch.bfloat16)
    model = _model(SWAPPABLE)
    network = _network(model)
    swapper = place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=4)
    assert swapper is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sampled = model(**_inputs(SWAPPABLE))
        expected = reference(**_inputs(SWAPPABLE))
    assert torch.equal(sampled, expected)
    assert not any(block.resident for block in swapper.blocks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**_inputs(SWAPPABLE))  # abandoned: no backward
    swapper.prepare_for_forward()
    assert not any(block.resident or block.holds for block in swapper.blocks)
    loss, grads = _step(model, network)
    reference_loss, reference_grads = _step(reference, network_ref)
    assert loss == reference_loss and _same(grads, reference_grads)


def test_blocks_without_a_backward_pass_move_once_a_step() -> None:
    """LoRA on the last two single blocks only: the swapped blocks before them have no backward pass, and the first
    trained one gets no gradient through its input (nothing says when its backward ends: it stays in until the next
    forward)."""
    args = {"train_blocks": "single", "train_single_block_indices": "4-5"}
    results = []
    for blocks in (0, 4):
        model = _model(SWAPPABLE)
        network = _network(model, network_args=args)
        swapper = place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=blocks)
        results.append([_step(model, network) for _ in range(2)])
    (base, swapped) = results
    assert all(loss_a == loss_b and _same(a, b) for (loss_a, a), (loss_b, b) in zip(base, swapped, strict=True))
    assert swapper is not None and len(swapper.blocks) == 6
    assert swapper.swap_ins == 2 * (6 + 2)  # all six in the forward pass, single blocks 4 and 5 in the backward pass
    assert [block.name for block in swapper.blocks if block.resident] == ["single_blocks.4"]
    swapper.prepare_for_forward()
    assert not any(block.resident for block in swapper.blocks)


def test_two_forwards_before_one_backward() -> None:
    """Gradient accumulation inside one graph: each call of a block holds its weights for its own backward."""
    results = []
    for blocks in (0, 4):
        model = _model(SWAPPABLE)
        network = _network(model)
        place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=blocks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = model(**_inputs(SWAPPABLE, seed=1))
            second = model(**_inputs(SWAPPABLE, seed=2))
        (first.float().pow(2).mean() + second.float().abs().mean()).backward()
        results.append([param.grad.clone() for param in network.parameters() if param.grad is not None])
    assert _same(*results)


def test_trainable_weights_stay_put_and_close_brings_everything_back() -> None:
    model = _model(SWAPPABLE)
    model.single_blocks[5].linear2.weight.requires_grad_(True)
    swapper = BlockSwapper(model, 1, device="cpu")
    assert swapper.swapped_names == ["single_blocks.4", "single_blocks.5"]
    assert all(param is not model.single_blocks[5].linear2.weight for param in swapper.swapped_parameters())
    with torch.no_grad():
        before = model(**_inputs(SWAPPABLE))
    swapper.close()
    assert "forward" not in model.single_blocks[5].__dict__
    with torch.no_grad():
        assert torch.equal(model(**_inputs(SWAPPABLE)), before)


def test_a_swapped_weight_made_trainable_later_is_refused() -> None:
    model = _model(SWAPPABLE)
    place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=2)
    model.requires_grad_(True)  # what full fine-tuning would do after placing the model
    with pytest.raises(RuntimeError, match="only frozen weights can be swapped"):
        model(**_inputs(SWAPPABLE))


def test_too_many_blocks_are_refused_before_anything_moves() -> None:
    model = _model(SWAPPABLE)
    with pytest.raises(ValueError, match="at most 4"):
        place_transformer(model, "cpu", torch.bfloat16, blocks_to_swap=5)
    assert model.img_in.weight.dtype == torch.float32


def _allocated_after_forward(model: Flux, device: str) -> int:
    """CUDA bytes allocated once the forward pass and the loss are done (what the backward pass will need)."""
    torch.cuda.synchronize()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**_inputs(model.params, device)).float().pow(2).mean()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    loss.backward()
    return allocated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the host <-> device path")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_cuda_swapping_matches_and_keeps_weights_on_the_host(fp8: bool, checkpointing: bool) -> None:
    results, allocated = [], []
    swapped_bytes = 0
    for blocks in (0, 4):
        model = _model(SWAPPABLE)
        if fp8:
            store_in_fp8(model, torch.bfloat16)
        network = _network(model).to("cuda")
        if checkpointing:
            model.enable_gradient_checkpointing()
        swapper = place_transformer(model, "cuda", torch.bfloat16, blocks_to_swap=blocks)
        results.append([_step(model, network, "cuda") for _ in range(2)])
        allocated.append(_allocated_after_forward(model, "cuda"))
        network.zero_grad(set_to_none=True)
        if swapper is not None:
            for param in swapper.swapped_parameters():
                assert param.device.type == "cpu" and param.is_pinned()
                swapped_bytes += param.numel() * param.element_size()
            assert model.single_blocks[5].linear1.bias.device.type == "cuda"
            assert model.single_blocks[0].linear1.weight.device.type == "cuda"
            assert swapper.swap_ins == 3 * 2 * len(swapper.blocks)
        del model, network, swapper
        gc.collect()  # the patched forwards and the swapper's wrappers make reference cycles
        torch.cuda.empty_cache()
    base, swapped = results
    for (loss_a, grads_a), (loss_b, grads_b) in zip(base, swapped, strict=True):
        assert loss_a == loss_b and _same(grads_a, grads_b)
    # Between the forward and the backward pass the swapped weights are not held on the device.
    assert allocated[0] - allocated[1] >= swapped_bytes
