"""The kohya LoRA and LyCORIS networks on tiny SD3 / SD3.5 MMDiTs of the three variants (engine.networks.lora,
lora_sd3, lycoris_network, metadata; spec §8.6).

Checked by what the network computes: a trained step changes the output, the change merged into the weights
(``W += alpha/rank * up @ down``, ComfyUI's maths, spec §5.5) computes what the applied network computes, the saved
file holds kohya's keys and loads back exactly, and split_qkv files are the merged format a plain loader reproduces.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from engine.config.io import validate_config  # noqa: E402
from engine.models.sd3.mmdit import MMDiT  # noqa: E402
from engine.models.sd3.params import tiny_params  # noqa: E402
from engine.networks.lora import LoRANetwork, create_lora_network  # noqa: E402
from engine.networks.lora_modules import SplitLoRAModule  # noqa: E402
from engine.networks.lycoris_network import create_lycoris_network  # noqa: E402
from engine.networks.metadata import (  # noqa: E402
    SPLIT_QKV_ALPHA_KEY,
    TrainingFacts,
    build_metadata,
    modelspec_metadata,
    new_session_id,
)
from engine.networks.network_file import save_network_file  # noqa: E402

VARIANTS = ("medium", "5-medium", "5-large")
RANK = 4
EMB = {"emb_dims": "[4,4,4,4,4,4]"}


def tiny(variant: str) -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT(tiny_params(variant)).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def encoders() -> list[nn.Module]:
    """CLIP-L, CLIP-G (both with projection, as SD3 loads them) and T5, tiny."""
    torch.manual_seed(0)
    clip = [CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=layers, num_attention_heads=2,
                                                       projection_dim=32)) for layers in (2, 3)]
    t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                 feed_forward_proj="gated-gelu"))
    return [*clip, t5]


def inputs(model: MMDiT, batch: int = 2) -> dict[str, torch.Tensor]:
    params = model.params
    generator = torch.Generator().manual_seed(3)
    return {"x": torch.randn(batch, 16, 8, 8, generator=generator), "t": torch.tensor([300.0, 800.0])[:batch],
            "y": torch.randn(batch, params.adm_in_channels, generator=generator),
            "context": torch.randn(batch, 6, params.context_in_dim, generator=generator)}


def network(model: MMDiT, alpha: float = 2.0, text: list[nn.Module] | None = None, **args) -> LoRANetwork:
    return create_lora_network(model, text or [nn.Module()] * 3, "sd3", dim=RANK, alpha=alpha,
                               train_text_encoder=text is not None, network_args=args or None)


def output(model: MMDiT, applied: LoRANetwork | None = None) -> torch.Tensor:
    if applied is not None:
        applied.apply_to()
    try:
        with torch.no_grad():
            return model(**inputs(model))
    finally:
        if applied is not None:
            applied.restore()


def randomize(net: LoRANetwork, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if "lora_up" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def merged_copy(model: MMDiT, tensors: dict[str, torch.Tensor]) -> MMDiT:
    """The model with each file module's alpha/rank * up @ down added to the weight ComfyUI maps it to."""
    merged = MMDiT(model.params).eval()
    merged.load_state_dict(model.state_dict())
    weights = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): value
               for key, value in merged.state_dict(keep_vars=True).items() if key.endswith(".weight")}
    names = {key.partition(".")[0] for key in tensors}
    with torch.no_grad():
        for name in names:
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
            weight = weights[name]
            weight.add_((up.flatten(1) @ down.flatten(1) * scale).reshape(weight.shape))
    return merged


# --- training and merging -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_a_training_step_changes_the_output_and_merging_equals_the_forward(variant):
    model = tiny(variant)
    base = output(model)
    net = network(model, **EMB)
    assert torch.equal(output(model, net), base)  # lora_up starts at zero
    net.train()
    optimizer = torch.optim.AdamW(net.prepare_optimizer_params(1e-2, [0.0]), lr=1e-2)
    net.apply_to()
    try:
        model(**inputs(model)).square().mean().backward()
    finally:
        net.restore()
    conv = next(lora for lora in net.unet_loras if lora.lora_name == "lora_unet_x_embedder_proj")
    assert conv.lora_up.weight.grad is not None and conv.lora_up.weight.grad.abs().sum() > 0
    optimizer.step()
    net.eval()
    trained = output(model, net)
    assert not torch.allclose(trained, base)
    merged = merged_copy(model, net.kohya_state_dict())
    torch.testing.assert_close(output(merged), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_file_keys_and_loading_back(variant, tmp_path):
    model = tiny(variant)
    net = network(model, **EMB)
    randomize(net)
    path = save_network_file(tmp_path / "sd3.safetensors", net.kohya_state_dict(), {"ss_network_module":
                                                                                    "networks.lora_sd3"},
                             save_as="safetensors")
    tensors = load_file(str(path))
    names = {key.partition(".")[0] for key in tensors}
    assert names == {lora.lora_name for lora in net.unet_loras}
    assert all(key.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for key in tensors)
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (384, RANK)
    assert tensors["lora_unet_joint_blocks_0_x_block_adaLN_modulation_1.lora_up.weight"].shape == (
        1152 if variant == "5-medium" else 768, RANK)
    assert tensors["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"].shape == (256, RANK)
    assert tensors["lora_unet_x_embedder_proj.lora_down.weight"].shape == (RANK, 16, 2, 2)
    assert float(tensors["lora_unet_final_layer_linear.alpha"]) == 2.0
    again = network(model, **EMB)
    again.load_kohya_state_dict(tensors)
    assert torch.equal(output(model, again), output(model, net))
    with pytest.raises(ValueError, match="lack"):  # a file without the emb_dims layers, strict
        network(model, **EMB).load_kohya_state_dict({key: value for key, value in tensors.items()
                                                     if "embedder" not in key})


def test_text_encoder_names_and_learning_rates():
    model, text = tiny("5-large"), encoders()
    net = network(model, text=text)
    prefixes = [{lora.lora_name.split("_text_model")[0] for lora in loras} for loras in net.text_encoder_loras]
    assert prefixes == [{"lora_te1"}, {"lora_te2"}, set()]  # T5 only with train_t5xxl
    assert len(net.text_encoder_loras[0]) == 2 * 6 and len(net.text_encoder_loras[1]) == 3 * 6
    names = {lora.lora_name for loras in net.text_encoder_loras for lora in loras}
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert not any("projection" in name for name in names)
    with_t5 = network(model, text=text, train_t5xxl="True")
    t5 = {lora.lora_name for lora in with_t5.text_encoder_loras[2]}
    assert len(t5) == 2 * 7 and "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in t5
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_o" in t5
    # sd-scripts' --text_encoder_lr a b c: one rate per encoder (CLIP-L, CLIP-G, T5)
    groups = with_t5.prepare_optimizer_params(1e-4, [1e-5, 2e-5, 0.0])
    assert {group["name"]: group["lr"] for group in groups} == {"unet": 1e-4, "text_encoder1": 1e-5,
                                                                "text_encoder2": 2e-5}
    assert not any(parameter.requires_grad for lora in with_t5.text_encoder_loras[2] for parameter in
                   lora.parameters())
    plus = network(model, text=text, loraplus_lr_ratio=4).prepare_optimizer_params(1e-4, [1e-5])
    assert {group["name"]: group["lr"] for group in plus}["unet_loraplus"] == pytest.approx(4e-4)


def test_dropouts_apply_in_training_only():
    model = tiny("medium")
    net = network(model, rank_dropout="0.5", module_dropout="0.5")
    randomize(net)
    assert net.options.rank_dropout == 0.5 and net.options.module_dropout == 0.5
    net.eval()
    assert torch.equal(output(model, net), output(model, net))
    net.train()
    torch.manual_seed(0)
    first = output(model, net)
    torch.manual_seed(1)
    assert not torch.equal(output(model, net), first)


# --- split_qkv ----------------------------------------------------------------------------------------------------

def test_split_qkv_saves_the_merged_format_a_plain_loader_reproduces():
    model = tiny("5-medium")
    split = network(model, split_qkv="true")
    kinds = {lora.lora_name: lora for lora in split.unet_loras if isinstance(lora, SplitLoRAModule)}
    assert sorted(kinds) == sorted(["lora_unet_joint_blocks_0_context_block_attn_qkv",
                                    "lora_unet_joint_blocks_0_x_block_attn_qkv",
                                    "lora_unet_joint_blocks_0_x_block_attn2_qkv",
                                    "lora_unet_joint_blocks_1_context_block_attn_qkv",
                                    "lora_unet_joint_blocks_1_x_block_attn_qkv"])
    assert all(lora.parts == (128, 128, 128) for lora in kinds.values())
    randomize(split)
    trained = output(model, split)
    saved = split.kohya_state_dict()
    assert saved["lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight"].shape == (3 * RANK, 128)
    assert saved["lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight"].shape == (384, 3 * RANK)
    assert float(saved["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 3 * 2.0  # alpha x parts (A.2)
    assert float(saved["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"]) == 2.0
    assert not any(".lora_down.0" in key for key in saved)
    # every loader's rule (scale = alpha / lora_down rows) applied to the file reproduces the trained network
    torch.testing.assert_close(output(merged_copy(model, saved)), trained, rtol=1e-5, atol=1e-5)
    again = network(model, split_qkv=True)
    again.load_kohya_state_dict(saved)
    torch.testing.assert_close(output(model, again), trained, rtol=0, atol=0)


# --- LyCORIS --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("algo", "suffix"), [("lokr", "lokr_w1"), ("loha", "hada_w1_a")])
def test_lycoris_uses_the_lora_modules_and_names(algo, suffix):
    pytest.importorskip("lycoris")
    model, text = tiny("5-medium"), encoders()
    lora = network(model, text=text, train_t5xxl=True)
    lycoris = create_lycoris_network(model, text, "sd3", algo=algo, dim=RANK, alpha=1.0,
                                     network_args={"train_t5xxl": "true"})
    names = sorted(module.lora_name for module in lycoris.all_loras())
    assert names == sorted(module.lora_name for module in lora.all_loras())
    assert len(lycoris.unet_loras) == 19
    saved = lycoris.kohya_state_dict()
    assert f"lora_unet_joint_blocks_0_x_block_attn2_qkv.{suffix}" in saved
    assert f"lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.{suffix}" in saved
    assert not any("final_layer" in key or "embedder" in key for key in saved)
    assert any(key.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q.") for key in saved)
    assert any(key.startswith("lora_te2_text_model_encoder_layers_2_") for key in saved)
    without_t5 = create_lycoris_network(model, text, "sd3", algo=algo, dim=RANK, alpha=1.0)
    assert without_t5.text_encoder_loras[2] == [] and len(without_t5.text_encoder_loras[1]) == 18
    # it trains: the module's output moves after one step
    lycoris.apply_to()
    try:
        lycoris.train()
        base = model(**inputs(model)).detach()
        optimizer = torch.optim.AdamW(lycoris.prepare_optimizer_params(1e-2, [0.0]), lr=1e-2)
        model(**inputs(model)).square().mean().backward()
        optimizer.step()
        lycoris.eval()
        with torch.no_grad():
            assert not torch.allclose(model(**inputs(model)), base)
    finally:
        lycoris.restore()


def test_lycoris_refuses_the_sd3_lora_options():
    pytest.importorskip("lycoris")
    with pytest.raises(ValueError, match=r"network\.network_args\.emb_dims is an option of the SD3 LoRA"):
        create_lycoris_network(tiny("medium"), encoders(), "sd3", algo="lokr", dim=RANK, alpha=1.0,
                               network_args={"emb_dims": "[1,1,1,1,1,1]"})
    with pytest.raises(ValueError, match=r"network\.network_args\.split_qkv is an option of the SD3 LoRA"):
        create_lycoris_network(tiny("medium"), encoders(), "sd3", algo="loha", dim=RANK, alpha=1.0,
                               network_args={"split_qkv": "true"})


# --- metadata -----------------------------------------------------------------------------------------------------

SD3_MODEL = {"model_family": "sd3", "pretrained_model_name_or_path": "sd3.5_large.safetensors",
             "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}


def facts(variant: str, **overrides) -> TrainingFacts:
    values = dict(session_id=new_session_id(), started_at=1_700_000_000.0, family="sd3", v_prediction=False,
                  num_train_images=10, num_reg_images=0, num_batches_per_epoch=10, num_epochs=1, max_train_steps=10,
                  warmup_steps=0, optimizer_description="torch.optim.adamw.AdamW", datasets=[],
                  model_path="sd3.5_large.safetensors", variant=variant)
    values.update(overrides)
    return TrainingFacts(**values)


@pytest.mark.parametrize(("variant", "architecture"), [("medium", "stable-diffusion-3-medium"),
                                                       ("5-medium", "stable-diffusion-3-5-medium"),
                                                       ("5-large", "stable-diffusion-3-5-large")])
def test_metadata_per_variant(variant, architecture):
    config = validate_config({"model": {**SD3_MODEL, "apply_lg_attn_mask": True},
                              "flow": {"weighting_scheme": "logit_normal", "logit_std": 1.5},
                              "network": {"network_args": {"split_qkv": "True", "emb_dims": [1, 1, 1, 1, 1, 1]}}},
                             check_packages=False)
    metadata = build_metadata(config, facts(variant))
    assert metadata["ss_base_model_version"] == variant
    assert metadata["ss_network_module"] == "networks.lora_sd3"
    assert metadata["ss_apply_lg_attn_mask"] == "True" and metadata["ss_apply_t5_attn_mask"] == "False"
    assert metadata["ss_weighting_scheme"] == "logit_normal" and metadata["ss_logit_std"] == "1.5"
    assert metadata["ss_logit_mean"] == "0.0" and metadata["ss_mode_scale"] == "1.29"
    assert metadata[SPLIT_QKV_ALPHA_KEY].startswith("alpha_times_parts")
    assert '"emb_dims": "1,1,1,1,1,1"' in metadata["ss_network_args"]
    # FLUX's keys are not SD3's (sd3_train_network writes no model type, guidance or training shift)
    for key in ("ss_model_type", "ss_guidance_scale", "ss_timestep_sampling", "ss_discrete_flow_shift",
                "ss_training_shift", "ss_model_prediction_type"):
        assert key not in metadata, key
    spec = modelspec_metadata(config, facts(variant), now=1_700_000_000)
    assert spec["modelspec.architecture"] == f"{architecture}/lora"
    assert "modelspec.prediction_type" not in spec  # sd-scripts' "epsilon" is a trap (spec A.5)
    assert "modelspec.encoder_layer" not in spec and spec["modelspec.resolution"] == "1024x1024"
    full = modelspec_metadata(config, facts(variant), kind="", now=1_700_000_000)
    assert full["modelspec.architecture"] == architecture
    lycoris = build_metadata(config, facts(variant, network_module="lycoris.kohya"))
    assert lycoris["ss_network_module"] == "lycoris.kohya" and lycoris["ss_base_model_version"] == variant


def test_metadata_lands_in_the_saved_file(tmp_path):
    config = validate_config({"model": SD3_MODEL}, check_packages=False)
    metadata = {**build_metadata(config, facts("5-large")), **modelspec_metadata(config, facts("5-large"))}
    net = network(tiny("5-large"))
    path = save_network_file(tmp_path / "out.safetensors", net.kohya_state_dict(), metadata, save_as="safetensors")
    with safe_open(str(path), "pt") as handle:
        saved = handle.metadata()
    assert saved["ss_base_model_version"] == "5-large"
    assert saved["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
    assert saved["ss_weighting_scheme"] == "uniform"  # sd-scripts' default
