"""blocks_to_swap and cpu_offload_checkpointing for SD1 / SD2 / SDXL in the config rules and the memory plan
(issue 16): accepted within the family's limit, refused above it, and for full fine-tuning only with the fused
backward pass; the plan counts the
swapped UNet blocks on the host, and Fit to my GPU proposes swapping for SDXL."""

from __future__ import annotations

import pytest
import torch

from engine.config.errors import ConfigError
from engine.config.io import deep_merge, validate_config
from engine.models.families import FAMILY_INFO

SD = ("sd1", "sd2", "sdxl")


def problems(family: str, **sections: dict) -> list[tuple[str, str]]:
    """Every error as (path, message); [] when the config validates."""
    data = deep_merge({"model": {"model_family": family}}, sections)
    try:
        validate_config(data, check_packages=False)
    except ConfigError as error:
        return [(problem.path, problem.message) for problem in error.problems]
    return []


@pytest.mark.parametrize("family", SD)
def test_swapping_up_to_the_family_limit_is_accepted(family):
    limit = FAMILY_INFO[family].max_blocks_to_swap
    assert limit == (85 if family == "sdxl" else 36)
    assert problems(family, training={"blocks_to_swap": limit}) == []
    assert problems(family, training={"blocks_to_swap": 1}) == []
    # Textual Inversion leaves the UNet frozen too
    assert problems(family, method="textual_inversion", embedding={"token_string": "mychar"},
                    training={"blocks_to_swap": 4}) == []


@pytest.mark.parametrize("family", SD)
def test_more_blocks_than_the_family_has_are_refused_with_the_limit(family):
    limit = FAMILY_INFO[family].max_blocks_to_swap
    [(path, message)] = problems(family, training={"blocks_to_swap": limit + 1})
    assert path == "training.blocks_to_swap"
    assert message == (f"{FAMILY_INFO[family].label} can swap at most {limit} blocks, not {limit + 1}; use {limit} "
                       "or fewer")


@pytest.mark.parametrize("method", ["dreambooth", "finetune"])
def test_swapping_blocks_that_train_needs_the_fused_backward_pass(method):
    """Trained weights must be stepped while their block is on the device, as for SD3 (sd-scripts' way)."""
    training = {"blocks_to_swap": 4, "mixed_precision": "bf16"}
    found = problems("sdxl", method=method, training=training)
    [message] = [message for path, message in found if path == "training.blocks_to_swap"]
    assert "optimizer.fused_backward_pass = true" in message and "blocks_to_swap = 0" in message
    fused = {"optimizer_type": "Adafactor", "fused_backward_pass": True}
    assert [path for path, _ in problems("sdxl", method=method, optimizer=fused, training=training)
            if path == "training.blocks_to_swap"] == []


@pytest.mark.parametrize("family", SD)
def test_cpu_offload_checkpointing_is_accepted_with_checkpointing_and_not_with_swapping(family):
    assert problems(family, training={"cpu_offload_checkpointing": True, "gradient_checkpointing": True}) == []
    alone = problems(family, training={"cpu_offload_checkpointing": True})
    assert [path for path, _ in alone] == ["training.cpu_offload_checkpointing"]
    assert "gradient_checkpointing = true" in alone[0][1]
    both = problems(family, training={"cpu_offload_checkpointing": True, "gradient_checkpointing": True,
                                      "blocks_to_swap": 4})
    assert [path for path, _ in both] == ["training.cpu_offload_checkpointing"]


def test_the_descriptions_say_which_families_have_them():
    from engine.config.describe import iter_fields

    specs = {spec.path: spec for spec in iter_fields()}
    for path in ("training.blocks_to_swap", "training.cpu_offload_checkpointing"):
        assert all(specs[path].applies_to(family) for family in FAMILY_INFO), path  # shown and read for all
        assert "SD1/SD2/SDXL" in specs[path].description and "FLUX" in specs[path].description, path


# --- the memory plan -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_plan_counts_the_swapped_unet_blocks_on_the_host(tiny_models, tmp_path):
    from train_helpers import write_config

    from engine.config.io import load_config
    from engine.models.block_swap import place_denoiser
    from engine.models.swap_layouts import swapped_block_names
    from engine.plan import make_plan
    from engine.plan.architecture import build_architecture

    def plan(name: str, blocks: int):
        config = load_config(write_config(tmp_path / f"{name}.toml", tiny_models, "sdxl",
                                          training={"mixed_precision": "bf16", "blocks_to_swap": blocks}),
                             check_packages=False)
        return config, {item.name: item for item in make_plan(config, tmp_path, gpu_capacity=None).items}

    _, plain = plan("plain", 0)
    config, swapped = plan("swapped", 10)
    # What the swapper really leaves on the host: place the UNet with the meta device standing for the GPU.
    unet = build_architecture(config, tiny_models["sdxl"]).denoiser.to_empty(device="cpu").requires_grad_(False)
    swapper = place_denoiser(unet, torch.device("meta"), torch.bfloat16, blocks_to_swap=10)
    on_host = [p for p in unet.parameters() if p.device.type == "cpu"]
    assert {id(p) for p in on_host} == {id(p) for p in swapper.swapped_parameters()}
    expected = sum(p.numel() * 2 for p in on_host)  # bf16
    names = swapped_block_names(unet, 10)
    largest = max(sum(p.numel() * 2 for p in on_host if any(p is q for q in unet.get_submodule(name).parameters()))
                  for name in names)
    host = swapped["denoiser blocks swapped to the CPU"]
    assert host.where == "host" and host.bytes == expected > 0 and "10 blocks" in host.detail
    assert "denoiser blocks swapped to the CPU" not in plain
    gpu_before, gpu_after = plain["denoiser weights (frozen)"].bytes, swapped["denoiser weights (frozen)"].bytes
    assert gpu_before - gpu_after == expected - largest  # one swapped block visits the GPU while it runs


@pytest.mark.slow
def test_fit_proposes_swapping_sdxl_blocks(tiny_models, tmp_path):
    """Under the context alone every change is tried: swapping comes in steps of a sixth of SDXL's 85 blocks; the
    tiny UNet has 16 (14 swap), so the second step is more than it has and is left out."""
    from train_helpers import write_config

    from engine.config.io import load_config
    from engine.plan import GIB
    from engine.plan.fit import fit_to_gpu

    config = load_config(write_config(tmp_path / "config.toml", tiny_models, "sdxl",
                                      training={"mixed_precision": "bf16"}), check_packages=False)
    result = fit_to_gpu(config, tmp_path, int(0.5 * GIB))
    swaps = [change for change in result.changes if change.key == "training.blocks_to_swap"]
    assert [change.value for change in swaps] == [14]
    assert "denoiser blocks swapped to the CPU" in {item.name for item in result.plan.items}
    before = [change.gpu_needed_bytes for change in result.changes]
    index = result.changes.index(swaps[0])
    assert index == 0 or before[index] < before[index - 1]  # swapping lowered the need


def test_full_fine_tuning_plans_the_swapped_trained_blocks_on_the_host():
    """The SDXL UNet trained in float32 with 20 blocks swapped: their parameters leave the GPU's count."""
    import torch
    from diffusers import UNet2DConditionModel

    from engine.config.io import default_config_dict
    from engine.config.schema import RunConfig
    from engine.models.configs import shipped_configs
    from engine.models.swap_layouts import swapped_block_names
    from engine.plan.architecture import Architecture
    from engine.plan.weights import denoiser_weights

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped_configs("sdxl")["unet"])
    data = deep_merge(default_config_dict(), {
        "model": {"model_family": "sdxl"}, "method": "dreambooth",
        "optimizer": {"optimizer_type": "Adafactor", "fused_backward_pass": True},
        "training": {"mixed_precision": "bf16", "blocks_to_swap": 20}})
    config = RunConfig.model_validate(data, context={"check_packages": False})
    items = {item.name: item for item in denoiser_weights(config, Architecture("sdxl", unet, {}, 0, "test"),
                                                           torch.bfloat16)}
    swapped = sum(p.numel() for name in swapped_block_names(unet, 20) for p in unet.get_submodule(name).parameters())
    total = sum(p.numel() for p in unet.parameters())
    assert items["trained blocks swapped to the CPU"].bytes == swapped * 4 > 0  # float32 trained weights
    assert items["trained blocks swapped to the CPU"].where == "host"
    assert items["trained weights (the whole denoiser)"].bytes == (total - swapped) * 4


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux1", "sd3"])
def test_compiling_a_denoiser_whose_blocks_swap_is_refused_naming_both_fields(family):
    """The swapper's hooks make dynamo trace again for every block (engine.config.rules_flux._swap_and_compile);
    CPU-offloaded checkpointing compiles (the eager backend trains the tiny SD1 as without it)."""
    memory = {"mixed_precision": "bf16", "gradient_checkpointing": True}
    found = problems(family, launch={"dynamo_backend": "inductor"}, training={**memory, "blocks_to_swap": 4})
    assert [path for path, _ in found] == ["launch.dynamo_backend"], found
    assert "blocks_to_swap" in found[0][1] and "dynamo_backend = 'no'" in found[0][1]
    assert problems(family, launch={"dynamo_backend": "inductor"}, training={**memory,
                                                                          "cpu_offload_checkpointing": True}) == []
    assert problems(family, launch={"dynamo_backend": "no"}, training={**memory, "blocks_to_swap": 4}) == []
