"""kohya LoRA names, targets and network_args on FLUX.1 / Chroma (engine.networks.lora_names, lora_flux; spec §5).

The full-size transformers are built on the meta device (no memory), so the names, counts and shapes are checked at
the real sizes against the spec's rule (``lora_unet_`` + BFL module path with ``.`` -> ``_``) and against the key
map ComfyUI builds from the model's own weights (spec §5.5).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

from engine.models.flux.params import CHROMA, FLUX_DEV, FLUX_SCHNELL, FluxParams  # noqa: E402
from engine.models.flux.transformer import Flux  # noqa: E402
from engine.networks.lora import LoRANetwork, create_lora_network  # noqa: E402
from engine.networks.lora_flux import FluxLoRAArgs, parse_flux_args  # noqa: E402
from engine.networks.lora_names import resolve_options, unet_naming_kind, unet_targets  # noqa: E402

TINY = FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                  axes_dim=(4, 14, 14), approximator_hidden=32, approximator_depth=2)
KEYWORDS = {"dim": 4, "alpha": 1.0, "conv_dim": 0, "conv_alpha": 1.0, "dropout": 0.0, "rank_dropout": 0.0,
            "module_dropout": 0.0}


@pytest.fixture(scope="module")
def dev() -> Flux:
    with torch.device("meta"):
        return Flux(FLUX_DEV)


def meta_flux(params: FluxParams) -> Flux:
    with torch.device("meta"):
        return Flux(params)


def tiny_clip() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, projection_dim=32))


def tiny_t5(layers: int = 2) -> T5EncoderModel:
    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=layers, num_heads=2,
                                   feed_forward_proj="gated-gelu"))


def flux_network(model: Flux, family: str = "flux1", **kwargs) -> LoRANetwork:
    encoders = [nn.Module()] * (1 if family == "chroma" else 2)
    return create_lora_network(model, encoders, family, **{"dim": 4, "alpha": 1.0, "train_text_encoder": False,
                                                           **kwargs})


def ranks(network: LoRANetwork) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim for lora in network.unet_loras}


def comfy_key_map(model: nn.Module) -> dict[str, str]:
    """ComfyUI's rule (comfy/lora.py model_lora_keys_unet): diffusion_model.<path>.weight -> lora_unet_<path>."""
    return {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): key.removesuffix(".weight")
            for key in model.state_dict() if key.endswith(".weight")}


# --- naming registry ------------------------------------------------------------------------------------------

def test_naming_is_the_family_field():
    assert [unet_naming_kind(family) for family in ("sd1", "sd2", "sdxl", "flux1", "chroma")] == [
        "diffusers", "diffusers", "sai", "bfl", "bfl"]


# --- names and counts at the real sizes -----------------------------------------------------------------------

def test_default_targets_are_304_block_linears_named_by_the_bfl_path(dev):
    network = flux_network(dev)
    names = ranks(network)
    assert len(names) == 19 * 10 + 38 * 3 == 304
    paths = {id(module): path for path, module in dev.named_modules()}
    for lora in network.unet_loras:
        path = paths[id(lora.org_module)]
        assert lora.lora_name == "lora_unet_" + path.replace(".", "_")
        assert path.startswith(("double_blocks.", "single_blocks."))
    assert not any("final_layer" in name for name in names)
    for example in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_mod_lin",
                    "lora_unet_double_blocks_18_txt_mlp_2", "lora_unet_single_blocks_5_linear1",
                    "lora_unet_single_blocks_37_modulation_lin"):
        assert example in names
    per_double = sorted(name.removeprefix("lora_unet_double_blocks_3_") for name in names
                        if name.startswith("lora_unet_double_blocks_3_"))
    assert per_double == sorted(f"{side}_{part}" for side in ("img", "txt")
                                for part in ("mod_lin", "attn_qkv", "attn_proj", "mlp_0", "mlp_2"))


def test_every_name_is_a_comfyui_key_of_the_same_shape(dev):
    network = flux_network(dev, network_args={"in_dims": "[4,2,2,2,4]"})
    keys = comfy_key_map(dev)
    shapes = {key: tuple(value.shape) for key, value in dev.state_dict().items()}
    saved = network.kohya_state_dict()
    for lora in network.unet_loras:
        assert lora.lora_name in keys, lora.lora_name
        out_features, in_features = shapes[keys[lora.lora_name] + ".weight"]
        assert saved[f"{lora.lora_name}.lora_up.weight"].shape == (out_features, lora.lora_dim)
        assert saved[f"{lora.lora_name}.lora_down.weight"].shape == (lora.lora_dim, in_features)
        assert saved[f"{lora.lora_name}.alpha"].dim() == 0


def test_rank_4_shapes_of_the_spec(dev):
    saved = flux_network(dev).kohya_state_dict()
    expected = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (9216, 4),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": (21504, 4),
        "lora_unet_single_blocks_0_linear2.lora_down.weight": (4, 15360),
        "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": (18432, 4),
        "lora_unet_single_blocks_0_modulation_lin.lora_up.weight": (9216, 4),
        "lora_unet_double_blocks_0_img_mlp_2.lora_down.weight": (4, 12288),
    }
    assert {key: tuple(saved[key].shape) for key in expected} == expected
    assert float(saved["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 1.0


def test_in_dims_layers_that_the_model_has(dev):
    chosen = ranks(flux_network(dev, network_args={"in_dims": [4, 2, 2, 3, 5]}))
    embedders = {name: rank for name, rank in chosen.items() if "blocks" not in name}
    assert embedders == {"lora_unet_img_in": 4, "lora_unet_time_in_in_layer": 2, "lora_unet_time_in_out_layer": 2,
                         "lora_unet_vector_in_in_layer": 2, "lora_unet_vector_in_out_layer": 2,
                         "lora_unet_guidance_in_in_layer": 3, "lora_unet_guidance_in_out_layer": 3,
                         "lora_unet_txt_in": 5}
    schnell = ranks(flux_network(meta_flux(FLUX_SCHNELL), network_args={"in_dims": "4,2,2,3,5"}))
    assert len(schnell) == 304 + 6 and not any("guidance_in" in name for name in schnell)
    no_vector = ranks(flux_network(dev, network_args={"in_dims": "[4,2,0,2,0]"}))
    assert "lora_unet_vector_in_in_layer" not in no_vector and "lora_unet_txt_in" not in no_vector
    assert no_vector["lora_unet_img_in"] == 4


def test_chroma_has_no_modulation_targets():
    chroma = meta_flux(CHROMA)
    names = ranks(flux_network(chroma, "chroma", network_args={"in_dims": [4, 4, 4, 4, 4]}))
    assert len(names) == 19 * 8 + 38 * 2 + 2
    assert not any("mod" in name for name in names)
    assert {"lora_unet_img_in", "lora_unet_txt_in"} <= set(names)
    assert set(names) <= set(comfy_key_map(chroma))


# --- network_args ---------------------------------------------------------------------------------------------

def test_type_dims(dev):
    args = {"img_attn_dim": 8, "txt_attn_dim": "0", "img_mlp_dim": 2, "txt_mlp_dim": 3, "img_mod_dim": 5,
            "txt_mod_dim": 6, "single_dim": 7, "single_mod_dim": 0}
    names = ranks(flux_network(dev, network_args=args))
    assert names["lora_unet_double_blocks_4_img_attn_qkv"] == names["lora_unet_double_blocks_4_img_attn_proj"] == 8
    assert not any("txt_attn" in name or "modulation" in name for name in names)
    assert names["lora_unet_double_blocks_4_img_mlp_2"] == 2 and names["lora_unet_double_blocks_4_txt_mlp_0"] == 3
    assert names["lora_unet_double_blocks_4_img_mod_lin"] == 5 and names["lora_unet_double_blocks_4_txt_mod_lin"] == 6
    assert names["lora_unet_single_blocks_9_linear1"] == names["lora_unet_single_blocks_9_linear2"] == 7
    assert len(names) == 19 * 8 + 38 * 2


def test_only_single_dim_leaves_the_rest_at_network_dim(dev):
    names = ranks(flux_network(dev, dim=16, network_args={"single_dim": 2}))
    assert names["lora_unet_single_blocks_0_linear1"] == 2
    assert names["lora_unet_single_blocks_0_modulation_lin"] == 16
    assert names["lora_unet_double_blocks_0_img_attn_qkv"] == 16


def test_block_indices_with_ranges(dev):
    names = ranks(flux_network(dev, network_args={"train_double_block_indices": "0,1,4-5,7"}))
    doubles = {int(name.split("_")[4]) for name in names if "double_blocks" in name}
    assert doubles == {0, 1, 4, 5, 7}
    assert len([name for name in names if "single_blocks" in name]) == 38 * 3  # the other stays "all"
    names = ranks(flux_network(dev, network_args={"train_double_block_indices": "none",
                                                  "train_single_block_indices": [0, "3-4"]}))
    assert {int(name.split("_")[4]) for name in names} == {0, 3, 4}
    assert all("single_blocks" in name for name in names)
    assert len(ranks(flux_network(dev, network_args={"train_single_block_indices": "all"}))) == 304


@pytest.mark.parametrize(("key", "value", "count"), [("train_double_block_indices", "0,19", 19),
                                                     ("train_single_block_indices", "36-38", 38)])
def test_block_indices_are_checked_against_the_model(dev, key, value, count):
    with pytest.raises(ValueError, match=rf"network\.network_args\.{key}: this model has {count} blocks") as error:
        flux_network(dev, network_args={key: value})
    assert str(count) in str(error.value) and f"0-{count - 1}" in str(error.value)


def test_block_indices_on_a_small_model():
    with pytest.raises(ValueError, match="has 2 blocks"):
        flux_network(meta_flux(TINY), network_args={"train_double_block_indices": "2"})
    assert len(ranks(flux_network(meta_flux(TINY), network_args={"train_double_block_indices": "1"}))) == 10 + 6


@pytest.mark.parametrize(("kind", "count"), [("double", 190), ("single", 114), ("all", 304), ("ALL", 304)])
def test_train_blocks(dev, kind, count):
    names = ranks(flux_network(dev, network_args={"train_blocks": kind}))
    assert len(names) == count
    if kind == "double":
        assert all("double_blocks" in name for name in names)


def test_reg_dims_first_match_wins_over_type_dims(dev):
    args = {"img_attn_dim": 16, "network_reg_dims": "img_attn_qkv=2,img_attn=8,single_blocks_3_=0"}
    names = ranks(flux_network(dev, network_args=args))
    assert names["lora_unet_double_blocks_0_img_attn_qkv"] == 2  # the first regex found, not the last (A.3)
    assert names["lora_unet_double_blocks_0_img_attn_proj"] == 8  # reg dims before the type dim
    assert not any(name.startswith("lora_unet_single_blocks_3_") for name in names)
    table = ranks(flux_network(dev, network_args={"network_reg_dims": {"txt_mlp": 3}}))
    assert table["lora_unet_double_blocks_2_txt_mlp_0"] == 3


def test_block_filter_also_applies_to_reg_dims(dev):
    names = ranks(flux_network(dev, network_args={"network_reg_dims": "img_attn=8",
                                                  "train_double_block_indices": "0"}))
    assert not any(name.startswith("lora_unet_double_blocks_1_") for name in names)
    assert names["lora_unet_double_blocks_0_img_attn_qkv"] == 8


def test_reg_lrs_groups(dev):
    network = flux_network(dev, network_args={"network_reg_lrs": "single_blocks=1e-5,img_attn=0",
                                              "loraplus_unet_lr_ratio": 4})
    groups = {group["name"]: group for group in network.prepare_optimizer_params(1e-4, [0.0, 0.0])}
    assert set(groups) == {"unet", "unet_loraplus", "unet_reg0", "unet_reg0_loraplus"}
    assert groups["unet_reg0"]["lr"] == 1e-5 and groups["unet_reg0_loraplus"]["lr"] == pytest.approx(4e-5)
    assert groups["unet"]["lr"] == 1e-4 and groups["unet_loraplus"]["lr"] == pytest.approx(4e-4)
    single = {id(param) for lora in network.unet_loras if "single_blocks" in lora.lora_name for param in
              lora.parameters()}
    assert {id(param) for param in groups["unet_reg0"]["params"] + groups["unet_reg0_loraplus"]["params"]} == single
    frozen = [lora for lora in network.unet_loras if "img_attn" in lora.lora_name]
    assert frozen and not any(param.requires_grad for lora in frozen for param in lora.parameters())
    assert all(param.requires_grad for param in groups["unet"]["params"])


def test_verbose_lists_ranks_and_skips(dev, capsys):
    flux_network(dev, network_args={"verbose": "True", "txt_mod_dim": 0})
    printed = capsys.readouterr().out
    assert "lora_unet_double_blocks_0_img_attn_qkv: rank 4, alpha 1" in printed
    assert "lora_unet_double_blocks_0_txt_mod_lin: skipped (rank 0)" in printed


def test_precedence_of_the_args_object():
    args = FluxLoRAArgs(type_dims={"img_attn_dim": 16}, in_dims=(1, 2, 3, 4, 5), reg_dims=(("time_in", 9),))
    assert args.rank("lora_unet_double_blocks_0_img_attn_qkv", 4) == 16
    assert args.rank("lora_unet_time_in_out_layer", 4) == 9  # reg dims beat in_dims
    assert args.rank("lora_unet_guidance_in_in_layer", 4) == 4
    assert args.rank("lora_unet_txt_in", 4) == 5
    assert args.rank("lora_te1_text_model_encoder_layers_0_mlp_fc1", 4) == 4
    assert FluxLoRAArgs().rank("lora_unet_img_in", 4) == 0  # conditioning layers need in_dims


@pytest.mark.parametrize(("key", "value", "message"), [
    ("in_dims", "[4,2,2,2]", "needs 5 ranks"),
    ("in_dims", [4, 2, 2, 2, -1], r"\[4\] must be a whole number"),
    ("train_blocks", "both", "must be one of all, double, single"),
    ("train_double_block_indices", "3-1", "is not a block index or a range"),
    ("train_single_block_indices", "a", "is not a block index or a range"),
    ("network_reg_dims", "(=4", "is not a valid regular expression"),
    ("network_reg_dims", "img_attn", "is not 'regex=value'"),
    ("network_reg_lrs", "img=fast", "must be a learning rate"),
    ("split_qkv", "yes", "must be true or false"),
    ("img_attn_dim", "1.5", "must be a whole number"),
])
def test_bad_values_name_the_arg(key, value, message):
    with pytest.raises(ValueError, match=rf"network\.network_args\.{key}.*{message}"):
        resolve_options(KEYWORDS, {key: value}, "bfl")


def test_unknown_args_are_refused_by_name():
    with pytest.raises(ValueError, match=r"network\.network_args\.ggpo_sigma is not an option") as error:
        resolve_options(KEYWORDS, {"ggpo_sigma": "0.03"}, "bfl")
    assert "img_attn_dim" in str(error.value)  # the accepted keys include FLUX's
    for naming in ("diffusers", "sai"):  # FLUX's keys mean nothing on SD: refused, as before
        with pytest.raises(ValueError, match=r"network\.network_args\.img_attn_dim is not an option"):
            resolve_options(KEYWORDS, {"img_attn_dim": 4}, naming)
    assert resolve_options(KEYWORDS, {"conv_dim": 4}, "diffusers").flux is None


def test_parse_accepts_kohya_text_and_toml_values():
    text = parse_flux_args({"in_dims": "[4,2,2,2,4]", "split_qkv": "True", "train_t5xxl": "false",
                            "train_double_block_indices": "0,2-3", "network_reg_lrs": "a=1e-4,b=2e-4",
                            "single_dim": "8"})
    toml = parse_flux_args({"in_dims": [4, 2, 2, 2, 4], "split_qkv": True, "train_t5xxl": False,
                            "train_double_block_indices": [0, "2-3"], "network_reg_lrs": {"a": 1e-4, "b": 2e-4},
                            "single_dim": 8})
    assert text == toml
    assert text.double_blocks == frozenset({0, 2, 3}) and text.split_qkv and not text.train_t5xxl


# --- text encoders --------------------------------------------------------------------------------------------

def test_t5_names_only_with_train_t5xxl():
    clip, t5 = tiny_clip(), tiny_t5()
    model = meta_flux(TINY)
    without = create_lora_network(model, [clip, t5], "flux1", dim=4, alpha=1.0)
    assert len(without.text_encoder_loras[0]) == 12 and without.text_encoder_loras[1] == []
    network = create_lora_network(model, [clip, t5], "flux1", dim=4, alpha=1.0, network_args={"train_t5xxl": "True"})
    te1 = {lora.lora_name for lora in network.text_encoder_loras[0]}
    te3 = {lora.lora_name for lora in network.text_encoder_loras[1]}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te1
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in te1
    assert te3 == {f"lora_te3_encoder_block_{block}_layer_{part}" for block in range(2)
                   for part in ("0_SelfAttention_q", "0_SelfAttention_k", "0_SelfAttention_v", "0_SelfAttention_o",
                                "1_DenseReluDense_wi_0", "1_DenseReluDense_wi_1", "1_DenseReluDense_wo")}
    unet_only = create_lora_network(model, [clip, t5], "flux1", dim=4, alpha=1.0, train_text_encoder=[False, True],
                                    network_args={"train_t5xxl": True})
    assert unet_only.text_encoder_loras[0] == [] and len(unet_only.text_encoder_loras[1]) == 14


def test_chroma_trains_t5_as_lora_te3():
    chroma = meta_flux(dataclasses.replace(TINY, guidance_embed=False, chroma=True))
    network = create_lora_network(chroma, [tiny_t5()], "chroma", dim=4, alpha=1.0, network_args={"train_t5xxl": True})
    assert network.text_encoder_prefixes == ("lora_te3",)
    assert {lora.lora_name for lora in network.text_encoder_loras[0]} >= {
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q", "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo"}
    assert len(network.unet_loras) == 2 * 8 + 2 * 2


def test_unet_targets_of_the_tools_see_the_same_names(dev):
    # engine.networks.tools (extract, merge) address layers through unet_targets
    assert [t.name for t in unet_targets(dev, "flux1", include_conv_blocks=True)] == list(ranks(flux_network(dev)))
