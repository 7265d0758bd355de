"""SD3 / SD3.5 in the config: keys, family applicability, rules and presets (issue 13)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from engine.config.choices import FLOW_FAMILIES, FLUX_FAMILIES, SD3_FAMILIES, family_names
from engine.config.describe import iter_fields
from engine.config.errors import ConfigError
from engine.config.io import config_to_toml, deep_merge, load_preset, validate_config
from engine.config.reference import parameters_markdown
from engine.config.schema import RunConfig, config_warnings
from engine.config.sections_model import t5xxl_token_length
from engine.models.families import FAMILY_INFO

PRESETS = Path(__file__).resolve().parents[2] / "presets"
SD3_FILES = {"pretrained_model_name_or_path": "/m/sd3.5_large.safetensors", "clip_l": "/m/clip_l.safetensors",
             "clip_g": "/m/clip_g.safetensors", "t5xxl": "/m/t5xxl_fp16.safetensors"}


def sd3(**sections) -> dict:
    return deep_merge({"model": {"model_family": "sd3"}}, sections)


def problems(data: dict) -> list[tuple[str, str]]:
    """Every error as (path, message); [] when the config validates."""
    try:
        validate_config(data, check_packages=False)
    except ConfigError as error:
        return [(problem.path, problem.message) for problem in error.problems]
    return []


def messages_at(data: dict, path: str) -> list[str]:
    return [message for where, message in problems(data) if where == path]


# --- keys --------------------------------------------------------------------------------------------------------


def test_sd3_keys_have_sd_scripts_names_and_defaults():
    config = RunConfig()
    assert config.model.clip_g == "" and config.model.apply_lg_attn_mask is False
    assert (config.flow.training_shift, config.flow.pos_emb_random_crop_rate) == (1.0, 0.0)
    assert config.flow.enable_scaled_pos_embed is False and config.flow.weighting_scheme == "uniform"
    training = config.training
    assert (training.clip_l_dropout_rate, training.clip_g_dropout_rate, training.t5_dropout_rate) == (0.0, 0.0, 0.0)
    specs = {spec.path: spec for spec in iter_fields()}
    assert "sd3" in specs["model.model_family"].choices and specs["model.clip_g"].widget == "path"
    assert SD3_FAMILIES == ("sd3",)
    assert FLOW_FAMILIES == FLUX_FAMILIES + SD3_FAMILIES
    limits = FAMILY_INFO["sd3"]
    assert (limits.label, limits.bucket_multiple, limits.max_blocks_to_swap) == ("SD3 / SD3.5", 16, 36)
    assert limits.text_encoder_files == ("clip_l", "clip_g", "t5xxl")
    assert family_names(("sd1", "sd2", "sd3")) == "SD1.x, SD2.x and SD3 / SD3.5" and family_names(("sdxl",)) == "SDXL"


@pytest.mark.parametrize(("bounded", "bad"), [
    ("flow.training_shift", 0.0), ("flow.pos_emb_random_crop_rate", 1.5), ("training.clip_l_dropout_rate", -0.1),
    ("training.clip_g_dropout_rate", 1.01), ("training.t5_dropout_rate", 2.0),
])
def test_new_values_are_bounded(bounded, bad):
    section, key = bounded.split(".")
    assert messages_at(sd3(**{section: {key: bad}}), bounded)


def test_sd3_config_round_trips_through_toml():
    data = sd3(model={**SD3_FILES, "apply_lg_attn_mask": True, "apply_t5_attn_mask": True,
                      "t5xxl_max_token_length": 154, "fp8_base": True, "vae": "/m/sd3_vae.safetensors"},
               training={"blocks_to_swap": 36, "mixed_precision": "bf16", "clip_l_dropout_rate": 0.1,
                         "clip_g_dropout_rate": 0.2, "t5_dropout_rate": 0.3, "min_timestep": 100, "max_timestep": 900},
               flow={"weighting_scheme": "logit_normal", "logit_mean": 0.2, "logit_std": 1.1, "mode_scale": 1.2,
                     "training_shift": 3.0, "pos_emb_random_crop_rate": 0.05, "enable_scaled_pos_embed": True})
    config = validate_config(data, check_packages=False)
    again = validate_config(tomllib.loads(config_to_toml(config)), check_packages=False)
    assert again == config and again.flow.training_shift == 3.0 and again.model.clip_g == "/m/clip_g.safetensors"
    short = tomllib.loads(config_to_toml(validate_config(sd3(), check_packages=False), only_changed=True))
    assert short["model"] == {"model_family": "sd3"}


def test_t5_token_length_is_256_for_every_sd3_variant():
    for variant in ("medium", "5-medium", "5-large"):
        assert t5xxl_token_length(None, variant) == 256 and t5xxl_token_length(77, variant) == 77
    assert t5xxl_token_length(None, "dev") == 512 and t5xxl_token_length(None, "schnell") == 256


# --- which family a setting applies to ---------------------------------------------------------------------------

SD3_ONLY = ("model.clip_g", "model.apply_lg_attn_mask", "training.clip_l_dropout_rate", "training.clip_g_dropout_rate",
            "training.t5_dropout_rate", "flow.training_shift", "flow.pos_emb_random_crop_rate",
            "flow.enable_scaled_pos_embed")
FLUX_ONLY_FLOW = ("flow.timestep_sampling", "flow.sigmoid_scale", "flow.discrete_flow_shift",
                  "flow.model_prediction_type", "flow.guidance_scale")


def test_fields_say_which_families_they_apply_to():
    specs = {spec.path: spec for spec in iter_fields()}
    for path in SD3_ONLY:
        assert specs[path].families == ("sd3",), path
    for path in FLUX_ONLY_FLOW:
        assert specs[path].families == ("flux1", "chroma"), path
    for path in ("flow.weighting_scheme", "flow.logit_mean", "flow.logit_std", "flow.mode_scale", "model.t5xxl",
                 "model.fp8_base"):
        assert specs[path].families == ("flux1", "chroma", "sd3"), path
    for path in ("training.blocks_to_swap", "training.cpu_offload_checkpointing"):  # every family (issue 16)
        assert specs[path].applies_to("sd3"), path
    for path in ("model.clip_l", "model.vae", "training.min_timestep", "training.max_timestep"):
        assert specs[path].applies_to("sd3"), path
    for path in ("model.ae", "training.ip_noise_gamma", "training.noise_offset",
                 "model.clip_skip", "sampling.sample_sampler", "optimizer.text_encoder2_lr"):
        assert not specs[path].applies_to("sd3"), path
    assert "*(SD3 / SD3.5 only)*" in parameters_markdown()


def test_a_full_sd3_config_validates():
    data = sd3(model={**SD3_FILES, "fp8_base": True, "apply_lg_attn_mask": True, "vae": "/m/vae.safetensors"},
               training={"mixed_precision": "bf16", "blocks_to_swap": 36, "gradient_checkpointing": True,
                         "clip_l_dropout_rate": 0.1, "min_timestep": 10, "max_timestep": 990,
                         "loss_type": "huber", "huber_schedule": "exponential"},
               flow={"weighting_scheme": "mode", "training_shift": 3.0, "pos_emb_random_crop_rate": 0.1},
               network={"network_args": {"context_attn_dim": 8, "x_mlp_dim": 4, "emb_dims": [4, 0, 0, 0, 4, 4],
                                         "train_block_indices": "0-9", "split_qkv": True}},
               dataset={"general": {"bucket_reso_steps": 16, "min_bucket_reso": 256, "max_bucket_reso": 2048}})
    assert problems(data) == []
    assert config_warnings(validate_config(data, check_packages=False)) == []


@pytest.mark.parametrize(("section", "values", "path", "hint"), [
    ("flow", {"guidance_scale": 1.0}, "flow.guidance_scale", "no guidance input"),
    ("flow", {"timestep_sampling": "shift"}, "flow.timestep_sampling", "flow.training_shift"),
    ("flow", {"discrete_flow_shift": 3.1582}, "flow.discrete_flow_shift", "flow.training_shift"),
    ("flow", {"model_prediction_type": "sigma_scaled"}, "flow.model_prediction_type", "clean image"),
    ("model", {"ae": "/m/ae.safetensors"}, "model.ae", "model.vae"),
    ("model", {"clip_skip": 2}, "model.clip_skip", "penultimate"),
    ("model", {"max_token_length": 150}, "model.max_token_length", "t5xxl_max_token_length"),
    ("training", {"ip_noise_gamma": 0.1}, "training.ip_noise_gamma", "no input perturbation"),
    ("training", {"noise_offset": 0.05}, "training.noise_offset", "plain Gaussian noise"),
    ("training", {"min_snr_gamma": 5.0}, "training.min_snr_gamma", "flow.weighting_scheme"),
    ("optimizer", {"text_encoder2_lr": 1e-5}, "optimizer.text_encoder2_lr", "optimizer.text_encoder_lr"),
    ("sampling", {"sample_sampler": "ddim"}, "sampling.sample_sampler", "own Euler sampler"),
])
def test_settings_of_other_families_are_refused_with_what_to_use(section, values, path, hint):
    found = messages_at(sd3(**{section: values}), path)
    assert found and "not SD3 / SD3.5 (model.model_family = 'sd3')" in found[0] and hint in found[0], found


@pytest.mark.parametrize(("section", "values", "path"), [
    ("model", {"clip_g": "/m/clip_g.safetensors"}, "model.clip_g"),
    ("model", {"apply_lg_attn_mask": True}, "model.apply_lg_attn_mask"),
    ("flow", {"training_shift": 3.0}, "flow.training_shift"),
    ("flow", {"enable_scaled_pos_embed": True}, "flow.enable_scaled_pos_embed"),
    ("training", {"t5_dropout_rate": 0.1}, "training.t5_dropout_rate"),
])
def test_sd3_settings_are_refused_for_other_families(section, values, path):
    for family in ("flux1", "sdxl"):
        data = deep_merge({"model": {"model_family": family}}, {section: values})
        found = messages_at(data, path)
        assert found and "only SD3 / SD3.5 models use this" in found[0], (family, found)
    assert not messages_at(deep_merge({"model": {"model_family": "auto"}}, {section: values}), path)


def test_block_swap_limit_and_memory_options():
    assert "at most 36" in messages_at(sd3(training={"blocks_to_swap": 37}), "training.blocks_to_swap")[0]
    # Full fine-tuning may swap the blocks it trains when each weight steps inside backward (fused_backward_pass).
    assert "fused_backward_pass" in messages_at(sd3(method="dreambooth", training={"blocks_to_swap": 4}),
                                                "training.blocks_to_swap")[0]
    fused = {"optimizer_type": "Adafactor", "fused_backward_pass": True}
    assert messages_at(sd3(method="dreambooth", training={"blocks_to_swap": 4}, optimizer=fused),
                       "training.blocks_to_swap") == []
    assert "mixed_precision" in messages_at(sd3(model={"fp8_base": True}, training={"mixed_precision": "no"}),
                                            "model.fp8_base")[0]
    assert problems(sd3(model={"fp8_base_unet": True}, training={"mixed_precision": "bf16"})) == []


def test_buckets_are_multiples_of_16():
    bad = sd3(dataset={"general": {"bucket_reso_steps": 8, "min_bucket_reso": 256}})
    found = messages_at(bad, "dataset.general.bucket_reso_steps")
    assert "SD3 / SD3.5 needs bucket sides in multiples of 16" in found[0]
    assert problems(sd3(dataset={"general": {"bucket_reso_steps": 48, "min_bucket_reso": 240,
                                             "max_bucket_reso": 2016}})) == []


@pytest.mark.parametrize(("key", "fragment"), [
    ("img_attn_dim", "use x_attn_dim"), ("txt_mlp_dim", "use context_mlp_dim"), ("in_dims", "use emb_dims"),
    ("train_double_block_indices", "use train_block_indices"), ("single_dim", "only joint blocks"),
    ("network_reg_dims", "networks.lora_sd3 has no such option"), ("network_reg_lrs", "networks.lora_sd3"),
    ("ggpo_sigma", "not supported by SD3's LoRA"),
])
def test_network_args_lora_sd3_does_not_take_are_refused(key, fragment):
    found = messages_at(sd3(network={"network_args": {key: 4}}), "network.network_args")
    assert found and fragment in found[0] and key in found[0], found
    # not SD3, or not kohya's LoRA (LyCORIS' network_args are its own options): not this rule's business
    assert not [message for message in messages_at({"model": {"model_family": "flux1"},
                                                    "network": {"network_args": {key: 4}}}, "network.network_args")
                if "SD3" in message]
    # LyCORIS refuses it too (engine.config.rules_network), with its own message, once
    found = messages_at(sd3(network={"network_type": "lokr", "network_args": {key: 4}}), "network.network_args")
    assert len(found) == 1 and key in found[0] and "LyCORIS" in found[0], found


def test_methods_and_saving():
    assert "LoRA" in messages_at(sd3(method="textual_inversion", embedding={"token_string": "zxc"}), "method")[0]
    assert problems(sd3(method="dreambooth", optimizer={"text_encoder_lr": 1e-6})) == []  # text encoders may train
    assert ".ckpt" in messages_at(sd3(method="dreambooth", saving={"save_model_as": "ckpt"}),
                                  "saving.save_model_as")[0]
    assert problems(sd3(method="dreambooth", saving={"save_model_as": "diffusers"})) == []
    snr = sd3(training={"loss_type": "huber", "huber_schedule": "snr"})
    assert "'constant' or 'exponential'" in messages_at(snr, "training.huber_schedule")[0]


def test_text_encoder_cache_follows_what_sd3_trains():
    cache = {"cache_text_encoder_outputs": True}
    assert messages_at(sd3(training=cache), "training.cache_text_encoder_outputs")  # LoRA trains CLIP-L and CLIP-G
    assert problems(sd3(training=cache, network={"train_unet_only": True})) == []
    t5 = sd3(training=cache, network={"train_unet_only": False, "network_args": {"train_t5xxl": True}})
    assert "train_t5xxl" in messages_at(t5, "network.network_args")[0]
    assert problems(sd3(training=cache, method="dreambooth", optimizer={"text_encoder_lr": 0.0})) == []


# --- presets -------------------------------------------------------------------------------------------------------

SD3_PRESETS = {"sd35-large-lora-24gb": "SD3.5 large LoRA 24 GB", "sd35-medium-lora-12gb": "SD3.5 medium LoRA 12 GB"}


@pytest.mark.parametrize("name", SD3_PRESETS)
def test_sd35_presets(name):
    path = PRESETS / f"{name}.json"
    assert json.loads(path.read_text())["title"] == SD3_PRESETS[name]
    config = load_preset(path)
    assert config.method == "lora" and config.model.model_family == "sd3" and config.model.fp8_base
    assert config.dataset.general.resolution in (1024, [1024, 1024])
    assert config.training.mixed_precision == "bf16" and config.training.gradient_checkpointing
    assert config.training.cache_latents and config.training.cache_text_encoder_outputs
    assert config.network.train_unet_only and 4 <= config.network.network_dim <= 16
    assert config.optimizer.optimizer_type == "AdamW8bit"
    assert config.flow.weighting_scheme == "uniform" and config.flow.training_shift == 1.0
    assert config_warnings(config) == []
    # with the user's files filled in it stays valid
    assert problems(deep_merge(config.model_dump(exclude_none=True), {"model": SD3_FILES})) == []
