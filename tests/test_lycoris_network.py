"""LyCORIS network types (engine.networks.lycoris_network): training end to end, file format, loading, options.

Independent references: lycoris' own loader (``lycoris.kohya.create_network_from_weights``) must read our files
and compute what our network computes; module names must be the kohya LoRA's (engine.networks.lora_names, itself
checked against the SAI layout) for the same layers.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from train_helpers import load_models, train_here, write_config

from engine.networks.lora_names import text_encoder_targets, unet_targets
from engine.networks.lycoris_network import create_lycoris_network

# The entries each algorithm saves per module (lycoris' names, which A1111 and ComfyUI read).
ALGORITHM_PARTS = {
    "loha": {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"alpha", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "ia3": {"weight", "on_input"},
    "glora": {"alpha", "a1.weight", "a2.weight", "b1.weight", "b2.weight"},
    "diag-oft": {"alpha", "oft_blocks"},
    "full": {"diff", "diff_b"},
}
# Factors lycoris initialises to zero (so the network starts as the identity): non-zero after training.
ZERO_INIT_PARTS = {"loha": ("hada_w2_a",), "lokr": ("lokr_w2", "lokr_w2_b")}
KEY = re.compile(r"^lora_(unet|te|te1|te2)_[a-z0-9_]+\.(.+)$")



def make_network(tiny_models, family: str, algo: str, **options):
    unet, encoders = load_models(tiny_models, family)
    options = {"dim": 4, "alpha": 2.0, **options}
    return create_lycoris_network(unet, encoders, family, algo=algo, **options), unet, encoders


def perturb(network: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Move every trainable tensor off its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


def unet_inputs(unet: UNet2DConditionModel) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    args = (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 5, config.cross_attention_dim, generator=generator))
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=generator),
                                       "time_ids": torch.randn(2, 6, generator=generator)}
    return args, kwargs


@torch.no_grad()
def unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    args, kwargs = unet_inputs(unet)
    return unet(*args, **kwargs).sample


def lycoris_loader(weights: dict[str, torch.Tensor], unet: nn.Module, text_encoder: nn.Module):
    """lycoris' own loader for kohya-format files, applied to a diffusers UNet and a CLIP text encoder.

    It names modules after the model's paths, which are kohya's for SD1's diffusers UNet; the text encoder is given
    the ``text_model`` wrapper transformers 5 dropped. Its presets are emptied first: the loader builds (and then
    discards) a network from them, and lycoris 4.1.3's defaults fail on diffusers UNets.
    """
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    LycorisNetworkKohya.apply_preset({"unet_target_module": [], "unet_target_name": [],
                                      "text_encoder_target_module": [], "text_encoder_target_name": []})
    wrapped = nn.ModuleDict({"text_model": text_encoder})
    network, _ = create_network_from_weights(1.0, None, None, wrapped, unet, weights_sd=dict(weights))
    network.apply_to(wrapped, unet, True, True)
    return network.eval()


def file_keys(path) -> tuple[list[str], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys()), handle.metadata()


def trained_any(tensors: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...]) -> bool:
    return any(key.startswith(prefix) and key.rsplit(".", 1)[-1] in parts and tensor.abs().max() > 0
               for key, tensor in tensors.items())


# --- training end to end -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loha_run(tiny_models, tmp_path_factory):
    """LoHa with LoCon-style convolutions on SD1: a few steps, the file and a resumable state."""
    folder = tmp_path_factory.mktemp("loha_run")
    config = write_config(folder / "config.toml", tiny_models, "sd1", training={"max_train_steps": 3},
                          network={"network_type": "loha", "network_dim": 4, "network_alpha": 2.0, "conv_dim": 2,
                                   "conv_alpha": 1.0},
                          saving={"save_state": True})
    train_here(config)
    return folder / "out"


@pytest.fixture(scope="module")
def lokr_sdxl_run(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lokr_run")
    config = write_config(folder / "config.toml", tiny_models, "sdxl", training={"max_train_steps": 2},
                          network={"network_type": "lokr", "network_dim": 4, "network_alpha": 4.0,
                                   "network_args": {"factor": 4}},
                          saving={"save_state": True})
    train_here(config)
    return folder / "out"


@pytest.mark.slow
def test_loha_file_has_kohya_keys_metadata_and_trained_weights(loha_run):
    keys, metadata = file_keys(loha_run / "lora.safetensors")
    tensors = load_file(str(loha_run / "lora.safetensors"))
    assert all(KEY.match(key) and KEY.match(key).group(2) in ALGORITHM_PARTS["loha"] for key in keys), keys[:5]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_b" in keys
    assert float(tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 2.0
    # conv_dim reaches the 3x3 convolutions: hada_w1_a is [out, rank] for them.
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.hada_w1_a"].shape[1] == 2 and float(tensors[f"{conv}.alpha"]) == 1.0
    assert trained_any(tensors, "lora_unet_", ZERO_INIT_PARTS["loha"])
    assert trained_any(tensors, "lora_te_", ZERO_INIT_PARTS["loha"])
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    args = json.loads(metadata["ss_network_args"])
    assert args["algo"] == "loha" and args["conv_dim"] == "2" and args["conv_alpha"] == "1.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


@pytest.mark.slow
def test_loha_file_reproduces_in_lycoris_own_loader(loha_run, tiny_models):
    """Our network loaded from the file and lycoris' loader give the same UNet and text-encoder outputs."""
    tensors = load_file(str(loha_run / "lora.safetensors"))
    network, unet, encoders = make_network(tiny_models, "sd1", "loha", conv_dim=2, conv_alpha=1.0)
    network.load_kohya_state_dict(tensors)
    network.apply_to()
    network.eval()
    theirs_unet, theirs_encoders = load_models(tiny_models, "sd1")
    reference = lycoris_loader(tensors, theirs_unet, theirs_encoders[0])
    assert len(reference.unet_loras) + len(reference.text_encoder_loras) == len(network.all_loras())
    base_unet, base_encoders = load_models(tiny_models, "sd1")
    ours, theirs, base = unet_output(unet), unet_output(theirs_unet), unet_output(base_unet)
    assert (ours - base).abs().max() > 1e-4  # the file does something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    tokens = torch.tensor([[49406, 320, 1929, 49407, 49407]])
    with torch.no_grad():
        text_ours = encoders[0](tokens).last_hidden_state
        text_theirs = theirs_encoders[0](tokens).last_hidden_state
        text_base = base_encoders[0](tokens).last_hidden_state
    assert (text_ours - text_base).abs().max() > 1e-5
    torch.testing.assert_close(text_ours, text_theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_saved_file_equals_the_resumable_state(loha_run, lokr_sdxl_run):
    for out in (loha_run, lokr_sdxl_run):
        saved = load_file(str(out / "lora.safetensors"))
        state = load_file(str(out / "lora-state" / "trained.safetensors"))
        assert saved.keys() == state.keys()
        assert all(torch.equal(saved[key], state[key]) for key in saved)


@pytest.mark.slow
def test_lokr_on_sdxl_uses_sai_names_and_both_text_encoders(lokr_sdxl_run, tiny_models):
    keys, metadata = file_keys(lokr_sdxl_run / "lora.safetensors")
    tensors = load_file(str(lokr_sdxl_run / "lora.safetensors"))
    assert all(KEY.match(key) and KEY.match(key).group(2) in ALGORITHM_PARTS["lokr"] for key in keys), keys[:5]
    for prefix in ("lora_unet_input_blocks_", "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.",
                   "lora_unet_output_blocks_"):
        assert any(key.startswith(prefix) for key in keys), prefix
    assert not any(key.startswith("lora_unet_down_blocks_") for key in keys)
    for prefix in ("lora_te1_text_model_encoder_layers_0_", "lora_te2_text_model_encoder_layers_0_"):
        assert any(key.startswith(prefix) for key in keys), prefix
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert trained_any(tensors, prefix, ZERO_INIT_PARTS["lokr"]), prefix
    args = json.loads(metadata["ss_network_args"])
    assert args["algo"] == "lokr" and args["factor"] == "4"
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    network, unet, _ = make_network(tiny_models, "sdxl", "lokr", alpha=4.0, network_args={"factor": 4})
    network.load_kohya_state_dict(tensors)
    reloaded = network.kohya_state_dict()
    assert all(torch.equal(reloaded[key], tensors[key]) for key in tensors)


# --- names -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_module_names_are_the_kohya_lora_names_of_the_same_layers(family, tiny_models):
    network, unet, encoders = make_network(tiny_models, family, "loha", conv_dim=2)
    names = {lora.lora_name: lora.org_module[0] for lora in network.all_loras()}
    kohya = [*unet_targets(unet, family, include_conv_blocks=True),
             *(target for encoder, prefix in zip(encoders, network.text_encoder_prefixes, strict=True)
               for target in text_encoder_targets(encoder, prefix))]
    for target in kohya:  # LoCon's layers are a subset of lycoris' "full" preset
        assert names.get(target.name) is target.module, target.name
    text_names = {name for name in names if not name.startswith("lora_unet_")}
    assert text_names == {target.name for target in kohya if not target.name.startswith("lora_unet_")}


def test_files_with_lycoris_diffusers_names_load(tiny_models):
    """lycoris run on diffusers/transformers-5 models names modules by their paths there; such files load too."""
    network, unet, encoders = make_network(tiny_models, "sdxl", "loha")
    perturb(network)
    roots = [("lora_unet", unet), *zip(network.text_encoder_prefixes, encoders, strict=True)]
    native = {}
    for prefix, root in roots:
        paths = {id(module): path for path, module in root.named_modules()}
        for lora in network.all_loras():
            if id(lora.org_module[0]) in paths:
                native[lora.lora_name] = f"{prefix}_{paths[id(lora.org_module[0])]}".replace(".", "_")
    assert any(name.startswith("lora_unet_down_blocks_") for name in native.values())
    assert any(name.startswith("lora_te1_encoder_layers_") for name in native.values())
    saved = network.kohya_state_dict()
    renamed = {native[key.split(".", 1)[0]] + "." + key.split(".", 1)[1]: value for key, value in saved.items()}
    fresh, _, _ = make_network(tiny_models, "sdxl", "loha")
    fresh.load_kohya_state_dict(renamed)
    reloaded = fresh.kohya_state_dict()
    assert all(torch.equal(reloaded[key], saved[key]) for key in saved)


# --- resume and loading ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo, args", [("loha", {"use_tucker": True}), ("lokr", {"decompose_both": True}),
                                        ("ia3", {}), ("glora", {}), ("diag-oft", {}), ("full", {})])
def test_resume_round_trip_is_exact(algo, args, tiny_models):
    """A state saved with kohya_state_dict and loaded into a new network gives the same parameters and output."""
    network, unet, _ = make_network(tiny_models, "sd1", algo, conv_dim=4, network_args=args)
    network.apply_to()
    perturb(network)
    network.eval()
    state = network.kohya_state_dict()
    assert {KEY.match(key).group(2) for key in state} <= ALGORITHM_PARTS[algo]
    fresh, fresh_unet, _ = make_network(tiny_models, "sd1", algo, conv_dim=4, network_args=args)
    fresh.apply_to()
    fresh.load_kohya_state_dict(state)
    fresh.eval()
    for (name, ours), (_, theirs) in zip(network.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(ours, theirs), name
    assert torch.equal(unet_output(unet), unet_output(fresh_unet))


def test_multiplier_zero_and_restore_give_the_base_model(tiny_models):
    network, unet, _ = make_network(tiny_models, "sd1", "lokr")
    base = unet_output(unet)
    network.apply_to()
    perturb(network)
    assert (unet_output(unet) - base).abs().max() > 1e-4
    network.set_multiplier(0.0)
    torch.testing.assert_close(unet_output(unet), base, rtol=0, atol=1e-6)
    network.set_multiplier(1.0)
    network.restore()
    assert torch.equal(unet_output(unet), base)


def test_loading_refuses_other_settings_and_changes_nothing(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1", "loha")
    perturb(network)
    state = network.kohya_state_dict()
    other_alpha, _, _ = make_network(tiny_models, "sd1", "loha", alpha=1.0)
    before = other_alpha.kohya_state_dict()
    with pytest.raises(ValueError, match="network_alpha"):
        other_alpha.load_kohya_state_dict(state)
    other_rank, _, _ = make_network(tiny_models, "sd1", "loha", dim=8)
    with pytest.raises(ValueError, match=r"hada_w1_a has shape .*network_dim"):
        other_rank.load_kohya_state_dict(state)
    assert all(torch.equal(value, before[key]) for key, value in other_alpha.kohya_state_dict().items())
    unet_only = {key: value for key, value in state.items() if key.startswith("lora_unet_")}
    with pytest.raises(ValueError, match="lack 12 modules"):
        network.load_kohya_state_dict(unet_only)
    result = network.load_kohya_state_dict(unet_only, strict=False)
    assert len(result.missing_modules) == 12 and not result.unexpected_keys


def test_half_precision_save_keeps_integer_entries(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1", "ia3")
    tensors = network.kohya_state_dict(torch.float16)
    assert {tensor.dtype for key, tensor in tensors.items() if key.endswith(".weight")} == {torch.float16}
    assert {tensor.dtype for key, tensor in tensors.items() if key.endswith(".on_input")} == {torch.int64}


def test_optimizer_groups_per_part(tiny_models):
    network, _, _ = make_network(tiny_models, "sdxl", "loha")
    groups = network.prepare_optimizer_params(1e-4, [5e-5, 0.0])
    assert [(group["name"], group["lr"]) for group in groups] == [("unet", 1e-4), ("text_encoder1", 5e-5)]
    assert network.module_count() == {"unet": len(network.unet_loras), "text_encoder1": 12, "text_encoder2": 12}
    assert not any(parameter.requires_grad for lora in network.text_encoder_loras[1] for parameter in lora.parameters())


# --- options -----------------------------------------------------------------------------------------------------

def test_options_reach_the_modules(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1", "lokr", dim=2, conv_dim=0, rank_dropout=0.2, module_dropout=0.3,
                                 network_args={"decompose_both": "true", "factor": "8"})
    convs = [lora for lora in network.all_loras() if isinstance(lora.org_module[0], nn.Conv2d)]
    assert convs and all(lora.org_module[0].kernel_size == (1, 1) for lora in convs)  # conv_dim 0: no 3x3 convs
    assert all((lora.rank_dropout, lora.module_dropout) == (0.2, 0.3) for lora in network.all_loras())
    assert any(key.endswith(".lokr_w1_a") for key in network.kohya_state_dict())  # decompose_both
    bypassed, _, _ = make_network(tiny_models, "sd1", "loha", dropout=0.1, network_args={"bypass_mode": True})
    assert all(lora.bypass_mode and lora.drop.p == 0.1 for lora in bypassed.all_loras())
    attention_only, _, _ = make_network(tiny_models, "sd1", "loha", network_args={"preset": "attn-mlp"})
    assert not any("resnets" in lora.lora_name or "conv_in" in lora.lora_name for lora in attention_only.all_loras())
    assert any("attn1_to_q" in lora.lora_name for lora in attention_only.all_loras())


def test_dropouts_act_in_training_mode_only(tiny_models):
    network, unet, _ = make_network(tiny_models, "sd1", "loha", rank_dropout=0.5)
    network.apply_to()
    perturb(network)
    network.train()
    assert not torch.equal(unet_output(unet), unet_output(unet))
    network.eval()
    assert torch.equal(unet_output(unet), unet_output(unet))


@pytest.mark.parametrize("algo, options, message", [
    ("loha", {"network_args": {"lora_rank": 4}}, r"network\.network_args\.lora_rank is not a LyCORIS option"),
    ("loha", {"network_args": {"factor": 4}}, r"network\.network_args\.factor has no effect with network_type = "
                                              r"'loha'"),
    ("lokr", {"network_args": {"decompose_both": "yes"}}, r"decompose_both must be true or false"),
    ("lokr", {"network_args": {"algo": "loha"}}, r"network_args\.algo = 'loha' contradicts"),
    ("loha", {"network_args": {"preset": "no-such-preset"}}, r"network_args\.preset = 'no-such-preset'"),
    ("loha", {"conv_dim": 4, "network_args": {"preset": "attn-mlp"}}, r"network\.conv_dim has no effect"),
    ("loha", {"network_args": {"use_cp": True}}, r"use_cp is an old lycoris name; use .*use_tucker"),
    ("loha", {"network_args": {"use_scalar": True}}, r"use_scalar is not supported: .*resumed"),
    ("loha", {"network_args": {"loraplus_lr_ratio": 4}}, r"loraplus_lr_ratio is not supported"),
    ("loha", {"network_args": {"conv_dim": 2}, "conv_dim": 4}, r"conv_dim = 2 contradicts network\.conv_dim"),
    ("dylora", {}, r"network\.network_type = 'dylora' is not a LyCORIS algorithm"),  # it is sd-scripts' DyLoRA
    ("lokr", {"dropout": 0.1}, r"network\.network_dropout has no effect with "
                                 r"network_type = 'lokr'.*bypass_mode = true for glora, loha, lokr"),
    ("ia3", {"rank_dropout": 0.1}, r"network\.rank_dropout has no effect with network_type = 'ia3'"),
    ("loha", {"network_args": {"preset": "ia3"}}, r"matches no layer"),
])
def test_bad_options_are_errors_that_name_the_setting(algo, options, message, tiny_models):
    with pytest.raises(ValueError, match=message):
        make_network(tiny_models, "sd1", algo, **options)


def test_missing_package_names_the_package_and_extra(tiny_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "lycoris.kohya", None)  # what an environment without lycoris-lora sees
    with pytest.raises(ImportError, match=r"lycoris-lora.*pip install -e \.\[lycoris\]"):
        make_network(tiny_models, "sd1", "loha")
