"""engine.models.sd3.convert: SAI ↔ diffusers SD3Transformer2DModel state dicts (spec §8.9).

The SAI -> diffusers direction is checked against diffusers' own single-file converter
(``convert_sd3_transformer_checkpoint_to_diffusers``), which handles every size, so the mapping, the Q/K/V split and
the (shift, scale) swaps are diffusers' reading of the SAI layout, not only ours.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.models.sd3.convert import (  # noqa: E402
    conversion_plan,
    diffusers_config,
    diffusers_to_sai,
    sai_to_diffusers,
    transformer_layout,
)
from engine.models.sd3.mmdit import MMDiT  # noqa: E402
from engine.models.sd3.params import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, VARIANTS, tiny_params  # noqa: E402


def _random_state(variant: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MMDiT(tiny_params(variant))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model.state_dict()


@pytest.mark.parametrize("variant", VARIANTS)
def test_sai_to_diffusers_matches_diffusers_converter_and_loads_strictly(variant):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = _random_state(variant)
    converted, unused = sai_to_diffusers(state)
    assert unused == []
    reference = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    assert set(converted) == set(reference)
    for key, tensor in reference.items():
        assert torch.equal(converted[key], tensor), key
    model = SD3Transformer2DModel(**diffusers_config(tiny_params(variant)))
    model.load_state_dict(converted, strict=True)  # no missing, no unexpected keys
    assert set(model.state_dict()) == set(converted)


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_directions_round_trip_exactly(variant):
    from diffusers import SD3Transformer2DModel

    state = _random_state(variant)
    diffusers_state, _ = sai_to_diffusers(state)
    back, unused = diffusers_to_sai(diffusers_state)
    assert unused == [] and set(back) == set(state)
    assert all(torch.equal(back[key], tensor) for key, tensor in state.items())

    torch.manual_seed(1)
    fresh = SD3Transformer2DModel(**diffusers_config(tiny_params(variant))).state_dict()
    sai, unused = diffusers_to_sai(fresh)
    assert unused == []
    MMDiT(tiny_params(variant)).load_state_dict(sai, strict=True)
    again, unused = sai_to_diffusers(sai)
    assert unused == [] and set(again) == set(fresh)
    assert all(torch.equal(again[key], tensor) for key, tensor in fresh.items())


def test_leftover_keys_are_reported():
    state = {**_random_state("medium"), "joint_blocks.0.x_block.extra.weight": torch.zeros(1)}
    _, unused = sai_to_diffusers(state)
    assert unused == ["joint_blocks.0.x_block.extra.weight"]


def test_the_last_blocks_context_modulation_is_the_swapped_one():
    plan = {rule.bfl: rule for rule in conversion_plan(["joint_blocks.3.x_block.attn.qkv.weight"])}
    assert plan["joint_blocks.3.context_block.adaLN_modulation.1.weight"].kind == "swap"
    assert plan["joint_blocks.2.context_block.adaLN_modulation.1.weight"].kind == "rename"
    assert "joint_blocks.3.context_block.attn.proj.weight" not in plan
    assert plan["final_layer.adaLN_modulation.1.bias"].diffusers == ("norm_out.linear.bias",)
    assert plan["joint_blocks.0.x_block.attn.qkv.weight"].diffusers == tuple(
        f"transformer_blocks.0.attn.to_{part}.weight" for part in "qkv")
    # A LoRA's keys need not reach the last block: the depth comes from the model then.
    deeper = {rule.bfl: rule for rule in conversion_plan(["joint_blocks.3.x_block.attn.qkv.weight"], depth=24)}
    assert deeper["joint_blocks.3.context_block.adaLN_modulation.1.weight"].kind == "rename"
    assert deeper["joint_blocks.23.context_block.adaLN_modulation.1.weight"].kind == "swap"


def test_layouts_are_told_apart():
    sai = _random_state("5-large")
    assert transformer_layout(sai) == "sai"
    assert transformer_layout(sai_to_diffusers(sai)[0]) == "diffusers"
    flux_diffusers = ["x_embedder.weight", "transformer_blocks.0.attn.add_k_proj.weight"]
    assert transformer_layout(flux_diffusers) is None


@pytest.mark.parametrize("params, layers, heads, dual, qk_norm, max_size", [
    (SD3_MEDIUM, 24, 24, (), None, 192),
    (SD35_MEDIUM, 24, 24, tuple(range(13)), "rms_norm", 384),
    (SD35_LARGE, 38, 38, (), "rms_norm", 192),
])
def test_diffusers_config_is_the_published_one(params, layers, heads, dual, qk_norm, max_size):
    config = diffusers_config(params)
    assert config == {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": layers, "attention_head_dim": 64,
        "num_attention_heads": heads, "joint_attention_dim": 4096, "caption_projection_dim": 64 * heads,
        "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": max_size,
        "dual_attention_layers": dual, "qk_norm": qk_norm,
    }
