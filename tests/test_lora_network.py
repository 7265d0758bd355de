"""The kohya LoRA/LoCon network (engine.networks.lora): names, maths, dropouts, optimizer groups, loading.

The strongest check is diffusers itself: a file saved from our network, loaded with ``pipe.load_lora_weights``, must
give the UNet and text-encoder outputs our patched models give. Names are checked against the spec's examples and,
for SDXL, against the original (SAI) block layout, which is fixed by the architecture and not by our code.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn
from train_helpers import load_models
from transformers.models.clip.modeling_clip import CLIPAttention

from engine.networks.lora import LoRANetwork, create_lora_network
from engine.networks.lora_modules import LoRAModule
from engine.networks.lora_names import unet_targets

FAMILIES = ("sd1", "sd2", "sdxl")


# --- helpers -----------------------------------------------------------------------------------------------------



def make_network(tiny_models, family: str, **options) -> tuple[LoRANetwork, UNet2DConditionModel, list[nn.Module]]:
    unet, encoders = load_models(tiny_models, family)
    options = {"dim": 4, "alpha": 2.0, **options}
    return create_lora_network(unet, encoders, family, **options), unet, encoders


def randomize_up(network: LoRANetwork, seed: int = 1, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * std)


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    args = (torch.randn(batch, 4, 8, 8, generator=generator), torch.tensor([10, 500][:batch]),
            torch.randn(batch, 5, config.cross_attention_dim, generator=generator))
    kwargs = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}
    return args, kwargs


def unet_output(unet: UNet2DConditionModel, inputs: tuple[tuple, dict]) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs[0], **inputs[1]).sample


def token_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 500, (batch, length), generator=torch.Generator().manual_seed(5))


def names(network: LoRANetwork) -> set[str]:
    return {lora.lora_name for lora in network.all_loras()}


# --- names -------------------------------------------------------------------------------------------------------

KOHYA_SD_EXAMPLES = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
    "lora_unet_mid_block_attentions_0_proj_in",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_0_mlp_fc1",
]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd_names_are_kohyas_and_cover_every_transformer_layer(tiny_models, family):
    network, unet, encoders = make_network(tiny_models, family)
    assert set(KOHYA_SD_EXAMPLES) <= names(network)
    # SD1 projects with 1x1 convs, SD2 with Linear layers (use_linear_projection); both take network_dim.
    proj_in = network.get_submodule("lora_unet_mid_block_attentions_0_proj_in")
    assert isinstance(proj_in.lora_down, nn.Conv2d if family == "sd1" else nn.Linear)
    # Every Linear/Conv2d under a Transformer2DModel, and nothing else, named by its diffusers path.
    expected = {"lora_unet_" + path.replace(".", "_") for path, module in unet.named_modules()
                if ".attentions." in f".{path}" and isinstance(module, (nn.Linear, nn.Conv2d))}
    assert {lora.lora_name for lora in network.unet_loras} == expected
    layer_count = len(encoders[0].encoder.layers)
    assert len(network.text_encoder_loras[0]) == 6 * layer_count  # q, k, v, out, fc1, fc2
    assert network.module_count() == {"unet": len(expected), "text_encoder": 6 * layer_count}


def test_sdxl_names_use_the_original_layout(tiny_models):
    network, _, _ = make_network(tiny_models, "sdxl", conv_dim=2)
    all_names = names(network)
    assert {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_k",  # down block 1 = input block 3 here
            "lora_unet_input_blocks_3_1_transformer_blocks_1_ff_net_2",
            "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0",
            "lora_unet_output_blocks_0_1_proj_in",
            "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_out_layers_3",
            "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_3_0_skip_connection",
            "lora_unet_input_blocks_2_0_op", "lora_unet_output_blocks_1_2_conv",
            "lora_te1_text_model_encoder_layers_0_self_attn_v_proj",
            "lora_te2_text_model_encoder_layers_1_mlp_fc2"} <= all_names
    assert not any(re.search("down_blocks|up_blocks|mid_block_", name) for name in all_names)
    assert set(network.module_count()) == {"unet", "text_encoder1", "text_encoder2"}


def test_sdxl_names_match_the_sai_block_layout():
    """An SDXL-shaped UNet (3 blocks, 2 layers each, tiny widths): block slots must be SDXL's LDM ones."""
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 2, 4),
        transformer_layers_per_block=1, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    targets = unet_targets(unet, "sdxl", include_conv_blocks=True)
    slots = {re.match(r"lora_unet_((?:input_blocks|output_blocks)_\d+_\d+|middle_block_\d+)", t.name)[1]
             for t in targets}
    inputs = {"1_0", "2_0", "3_0", "4_0", "4_1", "5_0", "5_1", "6_0", "7_0", "7_1", "8_0", "8_1"}
    outputs = {"0_0", "0_1", "1_0", "1_1", "2_0", "2_1", "2_2", "3_0", "3_1", "4_0", "4_1", "5_0", "5_1", "5_2",
               "6_0", "7_0", "8_0"}
    assert slots == ({f"input_blocks_{s}" for s in inputs} | {f"output_blocks_{s}" for s in outputs}
                     | {"middle_block_0", "middle_block_1", "middle_block_2"})
    target_names = {t.name for t in targets}
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k", "lora_unet_input_blocks_3_0_op",
            "lora_unet_input_blocks_6_0_op", "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",
            "lora_unet_middle_block_1_proj_out"} <= target_names


def test_text_encoder_attention_subclasses_are_found(tiny_models):
    unet, encoders = load_models(tiny_models, "sd1")
    layer = encoders[0].encoder.layers[0]
    layer.self_attn.__class__ = type("CLIPSomeNewAttention", (CLIPAttention,), {})
    network = create_lora_network(unet, encoders, "sd1", dim=2, alpha=1)
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj" in names(network)


def test_conv_dim_adds_3x3_convs_and_resnet_linears(tiny_models):
    plain, _, _ = make_network(tiny_models, "sd1")
    locon, _, _ = make_network(tiny_models, "sd1", conv_dim=2, conv_alpha=1)
    added = {locon.get_submodule(name) for name in names(locon) - names(plain)}
    assert names(plain) < names(locon)
    kinds = {(type(lora.lora_down).__name__, lora.lora_dim, lora.lora_name.rsplit("_", 1)[-1]) for lora in added}
    # 3x3 convs (conv1, conv2, down/upsampler conv) at conv_dim; time_emb_proj and 1x1 conv_shortcut at dim.
    assert {("Conv2d", 2, "conv1"), ("Conv2d", 2, "conv2"), ("Conv2d", 2, "conv"), ("Linear", 4, "proj"),
            ("Conv2d", 4, "shortcut")} == kinds


def test_parts_can_be_left_out(tiny_models):
    network, _, _ = make_network(tiny_models, "sdxl", train_text_encoder=[True, False])
    counts = network.module_count()
    assert counts["unet"] > 0 and counts["text_encoder1"] == 12 and counts["text_encoder2"] == 0
    network, _, _ = make_network(tiny_models, "sd1", train_unet=False)
    assert network.module_count() == {"unet": 0, "text_encoder": 12}


# --- structure and maths -------------------------------------------------------------------------------------------

def test_module_shapes_init_and_state_dict(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1", conv_dim=2, conv_alpha=1)
    for lora in network.all_loras():
        org, down, up = lora.org_module, lora.lora_down.weight, lora.lora_up.weight
        if isinstance(org, nn.Conv2d):
            assert down.shape == (lora.lora_dim, org.in_channels, *org.kernel_size)
            assert lora.lora_down.stride == org.stride and lora.lora_down.padding == org.padding
            assert up.shape == (org.out_channels, lora.lora_dim, 1, 1)
        else:
            assert down.shape == (lora.lora_dim, org.in_features) and up.shape == (org.out_features, lora.lora_dim)
        # kaiming_uniform(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); up starts at zero.
        bound = 1 / math.sqrt(down[0].numel())
        assert 0.5 * bound < down.abs().max() <= bound
        assert not up.any()
        assert lora.alpha.dim() == 0 and lora.scale == pytest.approx(lora.alpha.item() / lora.lora_dim)
    state = network.state_dict()
    assert len(state) == 3 * len(network.all_loras())  # the wrapped layers are not part of the network
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in state)


def test_fresh_network_changes_nothing_and_restore_undoes_it(tiny_models):
    network, unet, _ = make_network(tiny_models, "sdxl", conv_dim=2)
    inputs = unet_inputs(unet)
    base = unet_output(unet, inputs)
    network.apply_to()
    assert torch.equal(unet_output(unet, inputs), base)
    randomize_up(network)
    assert not torch.allclose(unet_output(unet, inputs), base)
    network.set_multiplier(0.0)
    assert torch.equal(unet_output(unet, inputs), base)
    network.restore()
    assert not any("forward" in lora.org_module.__dict__ for lora in network.all_loras())
    network.set_multiplier(1.0)
    assert torch.equal(unet_output(unet, inputs), base)


def test_apply_twice_is_an_error():
    lora = LoRAModule("x", nn.Linear(3, 3), lora_dim=2)
    lora.apply_to()
    with pytest.raises(RuntimeError, match="already applied"):
        lora.apply_to()


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (2, 7, 6)),  # [batch, tokens, features], as in attention
    "conv": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 8, 8)),
}


def applied_module(kind: str, multiplier: float = 1.0, **dropouts) -> tuple[nn.Module, LoRAModule, torch.Tensor]:
    torch.manual_seed(0)
    make_layer, shape = LAYERS[kind]
    layer = make_layer()
    lora = LoRAModule("test", layer, multiplier, lora_dim=3, alpha=1.5, **dropouts)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    return layer, lora, torch.randn(shape)


def original(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(layer).forward(layer, x)  # the class's forward, bypassing the patch


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("multiplier", [0.0, 0.5, 1.0, 2.0])
def test_forward_is_org_plus_multiplier_times_scale_times_up_down(kind, multiplier):
    layer, lora, x = applied_module(kind, multiplier, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    lora.eval()  # dropouts are off outside training
    expected = original(layer, x) + lora.lora_up(lora.lora_down(x)) * multiplier * (1.5 / 3)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", LAYERS)
def test_network_dropout_drops_down_activations(kind):
    layer, lora, x = applied_module(kind, dropout=0.4)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(lora.lora_down(x), p=0.4)
    assert (dropped == 0).any()
    torch.testing.assert_close(out, original(layer, x) + lora.lora_up(dropped) * 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", LAYERS)
def test_rank_dropout_masks_ranks_per_sample_and_rescales(kind):
    layer, lora, x = applied_module(kind, rank_dropout=0.4)
    torch.manual_seed(11)
    out = layer(x)
    torch.manual_seed(11)
    keep = torch.rand(x.shape[0], 3) > 0.4
    assert keep.any() and not keep.all()
    down = lora.lora_down(x)
    mask = keep[:, None, :] if kind == "linear" else keep[:, :, None, None]  # the rank axis of each layout
    expected = original(layer, x) + lora.lora_up(down * mask) * 0.5 / (1 - 0.4)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_module_dropout_skips_the_whole_branch_with_probability_p():
    layer, lora, x = applied_module("linear", module_dropout=0.3)
    base = original(layer, x)
    full = base + lora.lora_up(lora.lora_down(x)) * 0.5
    torch.manual_seed(3)
    outputs = [layer(x) for _ in range(600)]
    skipped = sum(torch.equal(out, base) for out in outputs)
    assert all(torch.equal(out, base) or torch.allclose(out, full, rtol=0, atol=1e-6) for out in outputs)
    assert 0.3 - 0.06 < skipped / 600 < 0.3 + 0.06  # ~3.2 standard deviations of a binomial(600, 0.3)


def test_gradient_checkpointing_recomputes_through_the_lora_with_the_same_randomness(tiny_models):
    network, unet, _ = make_network(tiny_models, "sd1", conv_dim=2, dropout=0.1, rank_dropout=0.2,
                                    module_dropout=0.1)
    unet.requires_grad_(False).train()
    randomize_up(network)
    network.apply_to()
    network.train()
    inputs = unet_inputs(unet)
    calls = []
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_resnets_0_conv1"):  # diffusers checkpoints these blocks
        network.get_submodule(name).org_module.register_forward_pre_hook(lambda module, args: calls.append(1))

    def gradients() -> dict[str, torch.Tensor | None]:
        network.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        unet(*inputs[0], **inputs[1]).sample.square().mean().backward()
        return {f"{lora.lora_name}.{name}": param.grad for lora in network.unet_loras
                for name, param in lora.named_parameters()}

    plain = gradients()
    assert len(calls) == 2
    unet.enable_gradient_checkpointing()
    calls.clear()
    checkpointed = gradients()
    assert len(calls) == 4  # forward + recomputation, both through the patched layers
    assert plain.keys() == checkpointed.keys()
    assert sum(grad is not None for grad in plain.values()) > 0.8 * len(plain)
    for name, grad in plain.items():
        assert (grad is None) == (checkpointed[name] is None), name  # the same modules were dropped
        if grad is not None:
            torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-7)


# --- diffusers reads our files the same way ----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conv_dim", [0, 2], ids=["lora", "locon"])
def test_diffusers_load_lora_weights_gives_the_same_outputs(tiny_models, tmp_path, family, conv_dim):
    network, unet, encoders = make_network(tiny_models, family, conv_dim=conv_dim, conv_alpha=3.0)
    randomize_up(network)
    inputs, ids = unet_inputs(unet), token_ids()
    base = unet_output(unet, inputs)
    with torch.no_grad():
        text_base = [encoder(ids).last_hidden_state for encoder in encoders]
    network.apply_to()
    ours = unet_output(unet, inputs)
    with torch.no_grad():
        text_ours = [encoder(ids).last_hidden_state for encoder in encoders]
    path = tmp_path / "lora.safetensors"
    save_file(network.kohya_state_dict(), str(path))

    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    pipe.load_lora_weights(str(path))
    pipe_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    theirs = unet_output(pipe.unet, inputs)
    with torch.no_grad():
        text_theirs = [encoder(ids).last_hidden_state for encoder in pipe_encoders]

    assert (ours - base).abs().max() > 0.05  # the network does change the output
    assert (ours - theirs).abs().max() <= 1e-6
    for mine, reference, plain in zip(text_ours, text_theirs, text_base, strict=True):
        assert (mine - plain).abs().max() > 0.05
        assert (mine - reference).abs().max() <= 1e-6
    # Every module was loaded (none silently skipped by the converter).
    wrapped = [sum(hasattr(module, "lora_A") for module in model.modules()) for model in [pipe.unet, *pipe_encoders]]
    assert wrapped == list(network.module_count().values())


# --- optimizer groups ----------------------------------------------------------------------------------------------

def group_map(groups: list[dict]) -> dict[str, tuple[float, set[int]]]:
    return {group["name"]: (group["lr"], {id(param) for param in group["params"]}) for group in groups}


def up_ids(loras: list[LoRAModule]) -> set[int]:
    return {id(lora.lora_up.weight) for lora in loras}


def test_loraplus_puts_lora_up_in_its_own_group(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1", network_args={"loraplus_lr_ratio": 16})
    groups = group_map(network.prepare_optimizer_params(1e-4, [5e-5]))
    assert list(groups) == ["unet", "unet_loraplus", "text_encoder", "text_encoder_loraplus"]
    assert groups["unet_loraplus"] == (pytest.approx(1.6e-3), up_ids(network.unet_loras))
    assert groups["text_encoder_loraplus"] == (pytest.approx(8e-4), up_ids(network.text_encoder_loras[0]))
    assert groups["unet"][0] == 1e-4 and groups["text_encoder"][0] == 5e-5
    every = [param_id for _, ids in groups.values() for param_id in ids]
    assert sorted(every) == sorted(id(param) for param in network.parameters())  # each parameter exactly once


def test_loraplus_part_ratios_override_the_common_one(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1",
                                 network_args={"loraplus_lr_ratio": 4, "loraplus_unet_lr_ratio": "8"})
    groups = group_map(network.prepare_optimizer_params(1.0, [1.0]))
    assert groups["unet_loraplus"][0] == 8 and groups["text_encoder_loraplus"][0] == 4
    network, _, _ = make_network(tiny_models, "sd1", network_args={"loraplus_text_encoder_lr_ratio": 2})
    assert list(group_map(network.prepare_optimizer_params(1.0, [1.0]))) == [
        "unet", "text_encoder", "text_encoder_loraplus"]


def test_zero_rate_parts_get_no_group_and_no_gradient(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1")
    groups = network.prepare_optimizer_params(None, [0.0], default_lr=3e-4)
    assert group_map(groups) == {"unet": (3e-4, {id(p) for p in network.trainable_parameters()})}
    assert not any(param.requires_grad for lora in network.text_encoder_loras[0] for param in lora.parameters())
    with pytest.raises(ValueError, match="no learning rate for the unet"):
        network.prepare_optimizer_params(None, [1e-4])


def test_sdxl_rates_per_text_encoder(tiny_models):
    network, _, _ = make_network(tiny_models, "sdxl")
    groups = group_map(network.prepare_optimizer_params(1e-4, [1e-5, 2e-5]))
    assert [(name, lr) for name, (lr, _) in groups.items()] == [
        ("unet", 1e-4), ("text_encoder1", 1e-5), ("text_encoder2", 2e-5)]
    assert [lr for lr, _ in group_map(network.prepare_optimizer_params(1e-4, [1e-5])).values()] == [1e-4, 1e-5, 1e-5]
    with pytest.raises(ValueError, match="3 text-encoder learning rates for 2"):
        network.prepare_optimizer_params(1e-4, [1e-5, 1e-5, 1e-5])


# --- saving and loading --------------------------------------------------------------------------------------------

def test_state_dict_round_trip_through_a_file(tiny_models, tmp_path):
    source, source_unet, _ = make_network(tiny_models, "sd1", conv_dim=2, conv_alpha=3.0)
    randomize_up(source)
    saved = source.kohya_state_dict(torch.float16)
    assert all(tensor.dtype == torch.float16 for tensor in saved.values())
    assert saved["lora_unet_mid_block_attentions_0_proj_in.alpha"].dim() == 0
    save_file(saved, str(tmp_path / "n.safetensors"))

    torch.manual_seed(123)  # a different init, so the load must overwrite everything
    target, target_unet, _ = make_network(tiny_models, "sd1", conv_dim=2, conv_alpha=1.0)
    assert target.load_kohya_state_dict(load_file(str(tmp_path / "n.safetensors"))) == ([], [])
    for key, tensor in target.kohya_state_dict(torch.float16).items():
        assert torch.equal(tensor, saved[key]), key
    conv = target.get_submodule("lora_unet_down_blocks_0_resnets_0_conv1")
    assert conv.scale == 1.5  # conv_alpha 3 / conv_dim 2, from the file
    source.apply_to()
    target.apply_to()
    inputs = unet_inputs(source_unet)
    torch.testing.assert_close(unet_output(target_unet, inputs), unet_output(source_unet, inputs),
                               rtol=0, atol=1e-2)  # fp16 weights


def test_saved_tensors_do_not_alias_the_weights(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1")
    saved = network.kohya_state_dict()
    saved["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].zero_()
    assert network.get_submodule("lora_unet_mid_block_attentions_0_proj_in").lora_down.weight.any()


def test_old_files_without_alpha_load_with_alpha_equal_to_rank(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1", dim=4, alpha=1.0)
    state = {key: value for key, value in network.kohya_state_dict().items() if not key.endswith(".alpha")}
    network.load_kohya_state_dict(state)
    assert all(lora.alpha.item() == 4 and lora.scale == 1.0 for lora in network.all_loras())


def test_load_errors_name_the_key_and_change_nothing(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1")
    good = network.kohya_state_dict()
    bigger, _, _ = make_network(tiny_models, "sd1", dim=8)
    with pytest.raises(ValueError, match=r"lora_unet_\w+\.lora_down\.weight has shape \(8, "):
        network.load_kohya_state_dict(bigger.kohya_state_dict())
    for key, tensor in network.kohya_state_dict().items():
        assert torch.equal(tensor, good[key]), key

    unknown = {**good, "lora_unet_not_a_layer.lora_down.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="lora_unet_not_a_layer.lora_down.weight"):
        network.load_kohya_state_dict(unknown)
    assert network.load_kohya_state_dict(unknown, strict=False).unexpected_keys == [
        "lora_unet_not_a_layer.lora_down.weight"]

    name = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    missing = {key: value for key, value in good.items() if not key.startswith(name + ".")}
    with pytest.raises(ValueError, match=name):
        network.load_kohya_state_dict(missing)
    assert network.load_kohya_state_dict(missing, strict=False).missing_modules == [name]

    half = {key: value for key, value in good.items() if key != f"{name}.lora_up.weight"}
    with pytest.raises(ValueError, match=f"{name}.lora_up.weight is missing"):
        network.load_kohya_state_dict(half)


def test_sdxl_loads_diffusers_named_unet_keys(tiny_models):
    source, unet, _ = make_network(tiny_models, "sdxl", conv_dim=2)
    randomize_up(source)
    to_diffusers = {t.name: t.alias for t in unet_targets(unet, "sdxl", include_conv_blocks=True)}
    renamed = {}
    for key, tensor in source.kohya_state_dict().items():
        name, _, part = key.partition(".")
        renamed[f"{to_diffusers.get(name, name)}.{part}"] = tensor
    assert any(key.startswith("lora_unet_down_blocks_") for key in renamed)
    target, _, _ = make_network(tiny_models, "sdxl", conv_dim=2)
    target.load_kohya_state_dict(renamed)
    expected = source.kohya_state_dict()
    for key, tensor in target.kohya_state_dict().items():
        assert torch.equal(tensor, expected[key]), key


# --- settings ------------------------------------------------------------------------------------------------------

def test_network_args_conv_dim_is_accepted_as_in_kohya(tiny_models):
    from_args, _, _ = make_network(tiny_models, "sd1", network_args={"conv_dim": "2", "conv_alpha": "1"})
    from_keywords, _, _ = make_network(tiny_models, "sd1", conv_dim=2, conv_alpha=1)
    assert names(from_args) == names(from_keywords) and from_args.options == from_keywords.options


@pytest.mark.parametrize(("options", "message"), [
    ({"network_args": {"foo": 1}}, r"network\.network_args\.foo .*accepted keys: conv_dim, conv_alpha, .*loraplus"),
    ({"network_args": {"block_dims": "2,2"}}, r"network\.network_args\.block_dims: per-block .* not supported"),
    ({"network_args": {"rank_dropout": "1.5"}}, r"network\.network_args\.rank_dropout must be at least 0 and below"),
    ({"network_args": {"loraplus_lr_ratio": True}}, r"network\.network_args\.loraplus_lr_ratio must be a number"),
    ({"conv_dim": 4, "network_args": {"conv_dim": 2}}, r"network\.network_args\.conv_dim = 2 contradicts"),
    ({"dim": 0}, r"network\.network_dim must be at least 1"),
    ({"module_dropout": 1.0}, r"network\.module_dropout must be at least 0 and below 1"),
])
def test_bad_settings_are_errors_that_name_the_setting(tiny_models, options, message):
    unet, encoders = load_models(tiny_models, "sd1")
    with pytest.raises(ValueError, match=message):
        create_lora_network(unet, encoders, "sd1", **{"dim": 4, "alpha": 1.0, **options})


def test_encoders_must_fit_the_family(tiny_models):
    unet, encoders = load_models(tiny_models, "sd1")
    with pytest.raises(ValueError, match="sdxl has 2 text encoder"):
        create_lora_network(unet, encoders, "sdxl", dim=4, alpha=1)
