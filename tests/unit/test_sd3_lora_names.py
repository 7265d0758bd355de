"""kohya LoRA names, targets and network_args on SD3 / SD3.5 (engine.networks.lora_names, lora_sd3; spec §8.6).

The full-size MMDiTs of the three variants are built on the meta device (no memory), so names and counts are checked
at the real sizes against the spec's rule (``lora_unet_`` + SAI module path with ``.`` -> ``_``), against the key map
ComfyUI builds from the model's own weights (spec §5.5: ``diffusion_model.<path>.weight`` <- ``lora_unet_<path>``)
and against the set sd-scripts' ``lora_sd3`` creates (every Linear inside every context/x block).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.models.sd3.mmdit import MMDiT  # noqa: E402
from engine.models.sd3.params import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, SD3Params, tiny_params  # noqa: E402
from engine.networks.lora import LoRANetwork, create_lora_network  # noqa: E402
from engine.networks.lora_names import resolve_options, unet_naming_kind, unet_targets  # noqa: E402
from engine.networks.lora_sd3 import SD3LoRAArgs, embedding_layer, parse_sd3_args, sd3_split_parts  # noqa: E402

KEYWORDS = {"dim": 4, "alpha": 1.0, "conv_dim": 0, "conv_alpha": 1.0, "dropout": 0.0, "rank_dropout": 0.0,
            "module_dropout": 0.0}
VARIANTS = ("medium", "5-medium", "5-large")
REAL = {"medium": SD3_MEDIUM, "5-medium": SD35_MEDIUM, "5-large": SD35_LARGE}
# The layers emb_dims adds: 6 argument positions, 8 layers (t_embedder and y_embedder have two Linears each).
EMBEDDERS = {"lora_unet_context_embedder": 0, "lora_unet_t_embedder_mlp_0": 1, "lora_unet_t_embedder_mlp_2": 1,
             "lora_unet_x_embedder_proj": 2, "lora_unet_y_embedder_mlp_0": 3, "lora_unet_y_embedder_mlp_2": 3,
             "lora_unet_final_layer_adaLN_modulation_1": 4, "lora_unet_final_layer_linear": 5}


def meta_mmdit(params: SD3Params) -> MMDiT:
    with torch.device("meta"):
        return MMDiT(params)


def tiny(variant: str) -> MMDiT:
    torch.manual_seed(0)
    return MMDiT(tiny_params(variant)).eval()


def sd3_network(model: MMDiT, **kwargs) -> LoRANetwork:
    return create_lora_network(model, [nn.Module()] * 3, "sd3", **{"dim": 4, "alpha": 1.0,
                                                                   "train_text_encoder": False, **kwargs})


def ranks(network: LoRANetwork) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim for lora in network.unet_loras}


def comfy_key_map(model: nn.Module) -> dict[str, str]:
    """ComfyUI's rule (comfy/lora.py model_lora_keys_unet): diffusion_model.<path>.weight -> lora_unet_<path>."""
    return {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): key.removesuffix(".weight")
            for key in model.state_dict() if key.endswith(".weight")}


def sd_scripts_targets(model: nn.Module) -> set[str]:
    """What sd-scripts' lora_sd3 wraps by default: every Linear child of every SingleDiTBlock (SAI's
    DismantledBlock), named prefix + path with dots as underscores."""
    names = set()
    for path, module in model.named_modules():
        if type(module).__name__ == "DismantledBlock":
            for child_path, child in module.named_modules():
                if isinstance(child, nn.Linear):
                    names.add(f"lora_unet.{path}.{child_path}".replace(".", "_"))
    return names


# --- naming registry ----------------------------------------------------------------------------------------------

def test_naming_is_the_family_field():
    assert unet_naming_kind("sd3") == "mmdit"


# --- names and counts at the real sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_real_size_names_follow_the_rule_and_comfyui_key_map(variant):
    model = meta_mmdit(REAL[variant])
    depth = REAL[variant].depth
    targets = unet_targets(model, "sd3", include_conv_blocks=False)
    names = {target.name for target in targets}
    # sd-scripts' set: 10 per full joint block, 7 in the last (pre_only context block: qkv and adaLN only), and
    # SD3.5 medium's attn2 (qkv, proj) on blocks 0-12.
    expected_count = 10 * (depth - 1) + 7 + (2 * 13 if variant == "5-medium" else 0)
    assert len(targets) == expected_count == {"medium": 237, "5-medium": 263, "5-large": 377}[variant]
    assert names == sd_scripts_targets(model)
    comfy = comfy_key_map(model)
    paths = {id(module): path for path, module in model.named_modules()}
    for target in targets:
        assert comfy[target.name] == paths[id(target.module)], target.name  # the weight ComfyUI patches
        assert target.name == "lora_unet_" + paths[id(target.module)].replace(".", "_")
    assert f"lora_unet_joint_blocks_{depth - 1}_context_block_attn_qkv" in names
    assert f"lora_unet_joint_blocks_{depth - 1}_context_block_attn_proj" not in names  # pre_only
    assert ("lora_unet_joint_blocks_3_x_block_attn2_proj" in names) == (variant == "5-medium")
    assert "lora_unet_joint_blocks_0_x_block_adaLN_modulation_1" in names
    assert not any("embedder" in name or "final_layer" in name for name in names)


@pytest.mark.parametrize("variant", VARIANTS)
def test_embedders_are_exactly_the_six_emb_dims_layers(variant):
    model = meta_mmdit(REAL[variant])
    targets = unet_targets(model, "sd3", include_conv_blocks=False, include_embedders=True)
    added = {target.name: target for target in targets if target.embedder}
    assert set(added) == set(EMBEDDERS)
    comfy = comfy_key_map(model)
    assert all(name in comfy for name in added)  # ComfyUI maps these too (spec §8.9)
    conv = added["lora_unet_x_embedder_proj"]
    assert isinstance(conv.module, nn.Conv2d) and conv.is_spatial_conv
    assert all(isinstance(target.module, nn.Linear) for name, target in added.items() if name != conv.name)
    assert {embedding_layer(name) for name in added} == {"context_embedder", "t_embedder", "x_embedder",
                                                         "y_embedder", "final_layer.adaLN_modulation",
                                                         "final_layer.linear"}


def test_split_parts_are_every_joint_block_qkv():
    assert sd3_split_parts("joint_blocks.3.x_block.attn.qkv", 4608, 1536) == (1536, 1536, 1536)
    assert sd3_split_parts("joint_blocks.0.context_block.attn.qkv", 384, 128) == (128, 128, 128)
    assert sd3_split_parts("joint_blocks.7.x_block.attn2.qkv", 384, 128) == (128, 128, 128)
    assert sd3_split_parts("joint_blocks.7.x_block.attn.proj", 128, 128) is None
    assert sd3_split_parts("context_embedder", 384, 128) is None


# --- network_args: parsing --------------------------------------------------------------------------------------

def test_parse_sd3_args_from_kohya_text_and_toml_values():
    args = parse_sd3_args({"context_attn_dim": "8", "x_mod_dim": 0, "emb_dims": "[4,2,2,2,4,0]",
                           "train_block_indices": "0,2-3", "split_qkv": "True", "train_t5xxl": "true",
                           "verbose": False})
    assert args == SD3LoRAArgs(type_dims={"context_attn_dim": 8, "x_mod_dim": 0}, emb_dims=(4, 2, 2, 2, 4, 0),
                               blocks=frozenset({0, 2, 3}), split_qkv=True, train_t5xxl=True)
    assert parse_sd3_args({"emb_dims": [1, 1, 1, 1, 1, 1], "train_block_indices": "all"}).blocks is None
    assert parse_sd3_args({"train_block_indices": "none"}).blocks == frozenset()


@pytest.mark.parametrize(("args", "message"), [
    ({"emb_dims": "[4,4,4]"}, r"network\.network_args\.emb_dims needs 6 ranks \(context_embedder, t_embedder, "
                              r"x_embedder"),
    ({"emb_dims": "[4,4,4,4,4,-1]"}, r"emb_dims\[5\] must be a whole number"),
    ({"x_attn_dim": "2.5"}, r"network\.network_args\.x_attn_dim must be a whole number"),
    ({"train_block_indices": "3-1"}, r"train_block_indices: '3-1' is not a block index"),
    ({"network_reg_dims": "attn=8"}, r"network\.network_args\.network_reg_dims is not supported: sd-scripts' SD3 "
                                     r"LoRA \(networks\.lora_sd3\) has no per-regex ranks; use context_attn_dim"),
    ({"network_reg_lrs": "attn=1e-4"}, r"network_reg_lrs is not supported: .*no per-regex learning rates"),
    ({"ggpo_sigma": "0.03"}, r"network\.network_args\.ggpo_sigma is not supported: LoRA-GGPO"),
    ({"ggpo_beta": "0.01"}, r"ggpo_beta is not supported"),
    ({"img_attn_dim": "4"}, r"network\.network_args\.img_attn_dim is not an option of the LoRA network for this "
                            r"model family; accepted keys: .*context_attn_dim"),
    ({"in_dims": "[4,4,4,4,4]"}, r"in_dims is not an option"),
])
def test_bad_sd3_args_name_the_key(args, message):
    with pytest.raises(ValueError, match=message):
        resolve_options(KEYWORDS, args, "mmdit")


def test_sd3_args_are_refused_on_other_families():
    with pytest.raises(ValueError, match=r"network\.network_args\.emb_dims is not an option"):
        resolve_options(KEYWORDS, {"emb_dims": "[1,1,1,1,1,1]"}, "bfl")
    with pytest.raises(ValueError, match=r"network\.network_args\.context_attn_dim is not an option"):
        resolve_options(KEYWORDS, {"context_attn_dim": 4}, "diffusers")
    assert resolve_options(KEYWORDS, {"conv_dim": 4}, "mmdit").sd3 == SD3LoRAArgs()
    assert resolve_options(KEYWORDS, {}, "bfl").sd3 is None


# --- network_args: their effect on a tiny model of each variant ---------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_default_network_is_every_block_linear(variant):
    model = tiny(variant)
    network = sd3_network(model)
    assert set(ranks(network)) == sd_scripts_targets(model)
    assert len(network.unet_loras) == {"medium": 17, "5-medium": 19, "5-large": 17}[variant]
    assert set(ranks(network).values()) == {4}


def test_type_dims_set_ranks_and_zero_skips():
    model = tiny("5-medium")
    network = sd3_network(model, network_args={"context_attn_dim": 8, "context_mlp_dim": 0, "context_mod_dim": 2,
                                               "x_attn_dim": 6, "x_mlp_dim": "3", "x_mod_dim": "0"})
    got = ranks(network)
    assert got["lora_unet_joint_blocks_0_context_block_attn_qkv"] == 8
    assert got["lora_unet_joint_blocks_0_context_block_attn_proj"] == 8
    assert got["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"] == 2
    assert got["lora_unet_joint_blocks_0_x_block_attn_qkv"] == 6
    assert got["lora_unet_joint_blocks_0_x_block_attn2_qkv"] == 6  # "attn" matches attn2, as sd-scripts
    assert got["lora_unet_joint_blocks_0_x_block_attn2_proj"] == 6
    assert got["lora_unet_joint_blocks_1_x_block_mlp_fc2"] == 3
    assert not any("context_block_mlp" in name or "x_block_adaLN" in name for name in got)
    # untouched types keep network_dim
    assert ranks(sd3_network(model, network_args={"x_mlp_dim": 2}))["lora_unet_joint_blocks_0_x_block_attn_qkv"] == 4


def test_emb_dims_adds_exactly_those_layers_including_the_conv():
    model = tiny("medium")
    plain = ranks(sd3_network(model))
    network = sd3_network(model, network_args={"emb_dims": "[5,4,3,2,1,6]"})
    got = ranks(network)
    added = {name: rank for name, rank in got.items() if name not in plain}
    assert added == {name: (5, 4, 3, 2, 1, 6)[index] for name, index in EMBEDDERS.items()}
    conv = next(lora for lora in network.unet_loras if lora.lora_name == "lora_unet_x_embedder_proj")
    # sd-scripts' LoRA on the patch conv: down keeps the 2x2 stride-2 kernel, up is 1x1
    assert isinstance(conv.lora_down, nn.Conv2d) and conv.lora_down.kernel_size == (2, 2)
    assert conv.lora_down.stride == (2, 2) and tuple(conv.lora_down.weight.shape) == (3, 16, 2, 2)
    assert isinstance(conv.lora_up, nn.Conv2d) and conv.lora_up.kernel_size == (1, 1)
    assert tuple(conv.lora_up.weight.shape) == (128, 3, 1, 1)
    # a 0 leaves its layers out; conv_dim does not decide the patch conv's rank (emb_dims does)
    some = ranks(sd3_network(model, conv_dim=7, network_args={"emb_dims": [0, 0, 2, 0, 0, 1]}))
    assert {name for name in some if name not in plain} == {"lora_unet_x_embedder_proj", "lora_unet_final_layer_linear"}
    assert some["lora_unet_x_embedder_proj"] == 2
    assert ranks(sd3_network(model, network_args={"emb_dims": [0] * 6})) == plain


def test_train_block_indices_selects_joint_blocks():
    model = tiny("5-large")
    got = ranks(sd3_network(model, network_args={"train_block_indices": "1", "emb_dims": [2] * 6}))
    assert {name.split("_")[4] for name in got if name.startswith("lora_unet_joint_blocks_")} == {"1"}
    assert "lora_unet_context_embedder" in got  # embedders are not in a block: the indices leave them alone
    assert not any(name.startswith("lora_unet_joint_blocks_") for name in
                   ranks(sd3_network(model, network_args={"train_block_indices": "none"})))
    with pytest.raises(ValueError, match=r"train_block_indices: this model has 2 joint blocks \(0-1\), so 2, 5 do "
                                         r"not exist"):
        sd3_network(model, network_args={"train_block_indices": "0,2,5"})
