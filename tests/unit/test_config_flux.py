"""FLUX.1 and Chroma in the config: keys, family applicability, rules, importers and presets (issue 12)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from engine.config import rules_flux
from engine.config.describe import iter_fields
from engine.config.errors import ConfigError
from engine.config.importers import ImportResult
from engine.config.importers.registry import detect_format, import_file
from engine.config.io import (
    config_to_toml,
    deep_merge,
    default_config_dict,
    load_preset,
    read_document,
    validate_config,
)
from engine.config.reference import parameters_markdown
from engine.config.schema import SECTIONS, RunConfig, config_warnings
from engine.config.sections_model import t5xxl_token_length

FIXTURES = Path(__file__).parents[1] / "fixtures" / "import"
PRESETS = Path(__file__).resolve().parents[2] / "presets"
FLUX_FILES = {"pretrained_model_name_or_path": "/m/flux1-dev.safetensors", "clip_l": "/m/clip_l.safetensors",
              "t5xxl": "/m/t5xxl_fp16.safetensors", "ae": "/m/ae.safetensors"}


def flux(family: str = "flux1", **sections) -> dict:
    """A config dict for `family` with the given sections merged in (model files left empty unless given)."""
    data: dict = {"model": {"model_family": family}}
    if family == "chroma":
        data["model"]["apply_t5_attn_mask"] = True
        data["flow"] = {"guidance_scale": 0.0}
    return deep_merge(data, sections)


def problems(data: dict, check_packages: bool = False) -> list[tuple[str, str]]:
    """Every error as (path, message); [] when the config validates."""
    try:
        validate_config(data, check_packages=check_packages)
    except ConfigError as error:
        return [(problem.path, problem.message) for problem in error.problems]
    return []


def messages_at(data: dict, path: str) -> list[str]:
    return [message for where, message in problems(data) if where == path]


def warnings_of(data: dict) -> dict[str, str]:
    config = validate_config(data, check_packages=False)
    return {problem.path: problem.message for problem in config_warnings(config)}


# --- keys --------------------------------------------------------------------------------------------------------


def test_flux_keys_have_sd_scripts_names_and_defaults():
    config = RunConfig()
    model = config.model
    assert (model.clip_l, model.t5xxl, model.ae, model.tokenizer_cache_dir) == ("", "", "", "")
    assert model.t5xxl_max_token_length is None and model.apply_t5_attn_mask is False
    assert model.fp8_base is False and model.fp8_base_unet is False
    assert config.training.blocks_to_swap == 0 and config.training.cpu_offload_checkpointing is False
    assert config.flow.model_dump() == {
        "timestep_sampling": "sigma", "sigmoid_scale": 1.0, "discrete_flow_shift": 3.0,
        "model_prediction_type": "raw", "weighting_scheme": "uniform", "logit_mean": 0.0, "logit_std": 1.0,
        "mode_scale": 1.29, "guidance_scale": 3.5, "training_shift": 1.0, "pos_emb_random_crop_rate": 0.0,
        "enable_scaled_pos_embed": False}
    assert "flow" in SECTIONS
    specs = {spec.path: spec for spec in iter_fields()}
    assert {specs[f"model.{key}"].widget for key in ("clip_l", "t5xxl", "ae")} == {"path"}
    assert specs["model.tokenizer_cache_dir"].widget == "folder"
    assert specs["model.model_family"].choices == ("auto", "sd1", "sd2", "sdxl", "flux1", "chroma", "sd3")
    assert specs["flow.timestep_sampling"].choices == ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
    assert specs["flow.model_prediction_type"].choices == ("raw", "additive", "sigma_scaled")
    assert set(specs["flow.weighting_scheme"].choices) == {"sigma_sqrt", "logit_normal", "mode", "cosmap", "none",
                                                          "uniform"}


def test_flux_config_round_trips_through_toml():
    data = flux(model={**FLUX_FILES, "tokenizer_cache_dir": "/m/tok", "t5xxl_max_token_length": 256,
                       "fp8_base": True, "fp8_base_unet": True},
                training={"blocks_to_swap": 18, "gradient_checkpointing": True, "mixed_precision": "bf16"},
                flow={"timestep_sampling": "shift", "discrete_flow_shift": 3.1582, "sigmoid_scale": 1.5,
                      "model_prediction_type": "additive", "weighting_scheme": "none", "logit_mean": 0.1,
                      "logit_std": 1.2, "mode_scale": 1.1, "guidance_scale": 1.0})
    config = validate_config(data, check_packages=False)
    text = config_to_toml(config)
    again = validate_config(tomllib.loads(text), check_packages=False)
    assert again == config
    assert again.flow.discrete_flow_shift == 3.1582 and again.model.t5xxl == "/m/t5xxl_fp16.safetensors"
    assert "[flow]" in text
    # only_changed keeps the flux keys too, and the unset token length stays unset
    short = tomllib.loads(config_to_toml(validate_config(flux(), check_packages=False), only_changed=True))
    assert short["model"] == {"model_family": "flux1"} and "t5xxl_max_token_length" not in short["model"]


def test_t5_token_length_defaults_per_variant():
    assert t5xxl_token_length(None, "dev") == 512 and t5xxl_token_length(None, "chroma") == 512
    assert t5xxl_token_length(None, "schnell") == 256 and t5xxl_token_length(128, "schnell") == 128


def test_t5_token_length_is_bounded():
    assert messages_at(flux(model={"t5xxl_max_token_length": 1024}), "model.t5xxl_max_token_length")


# --- which family a setting applies to ---------------------------------------------------------------------------

SD_ONLY = ("model.v_parameterization", "model.clip_skip", "model.no_half_vae", "model.max_token_length",
           "training.noise_offset", "training.multires_noise_iterations", "training.adaptive_noise_scale",
           "training.min_snr_gamma", "training.zero_terminal_snr", "training.debiased_estimation_loss",
           "training.scale_v_pred_loss_like_noise_pred", "embedding.token_string", "sampling.sample_sampler")
# SD and SD3 (test_config_sd3.py covers what SD3 adds); FLUX ignores them.
SD_AND_SD3 = ("model.vae", "training.min_timestep", "training.max_timestep")
FLUX_ONLY = ("model.ae", "flow.guidance_scale", "flow.timestep_sampling")
# FLUX and SD3 (every flow family).
FLOW_ONLY = ("model.t5xxl", "model.t5xxl_max_token_length", "model.apply_t5_attn_mask", "model.tokenizer_cache_dir",
             "model.fp8_base", "model.fp8_base_unet", "flow.weighting_scheme")


def test_fields_say_which_families_they_apply_to():
    specs = {spec.path: spec for spec in iter_fields()}
    for path in SD_ONLY:
        assert specs[path].families == ("sd1", "sd2", "sdxl"), path
        assert not specs[path].applies_to("flux1") and specs[path].applies_to("auto"), path
    for path in SD_AND_SD3:
        assert specs[path].families == ("sd1", "sd2", "sdxl", "sd3"), path
        assert not specs[path].applies_to("flux1"), path
    for path in FLUX_ONLY:
        assert specs[path].families == ("flux1", "chroma"), path
        assert specs[path].applies_to("chroma") and not specs[path].applies_to("sdxl"), path
    for path in FLOW_ONLY:
        assert specs[path].families == ("flux1", "chroma", "sd3"), path
        assert specs[path].applies_to("chroma") and not specs[path].applies_to("sdxl"), path
    assert specs["model.clip_l"].families == ("flux1", "sd3") and not specs["model.clip_l"].applies_to("chroma")
    assert specs["optimizer.text_encoder2_lr"].families == ("sdxl",)
    assert specs["training.ip_noise_gamma"].families == ("sd1", "sd2", "sdxl", "flux1", "chroma")
    shared = ("optimizer.learning_rate", "training.loss_type",
              "training.cache_text_encoder_outputs", "network.network_dim", "dataset.general.resolution")
    assert all(specs[path].families == () and specs[path].applies_to("flux1") for path in shared)


def test_families_reach_the_json_schema_and_the_docs():
    schema = RunConfig.model_json_schema()
    assert schema["$defs"]["ModelSection"]["properties"]["ae"]["families"] == ["flux1", "chroma"]
    assert schema["properties"]["flow"]["families"] == ["flux1", "chroma", "sd3"]
    text = parameters_markdown()
    assert "## [flow]" in text and "*(FLUX.1, Chroma only)*" in text and "*(SD1.x, SD2.x, SDXL only)*" in text


@pytest.mark.parametrize(("section", "values", "path"), [
    ("model", {"v_parameterization": True}, "model.v_parameterization"),
    ("model", {"clip_skip": 2}, "model.clip_skip"),
    ("model", {"vae": "/m/vae.safetensors"}, "model.vae"),
    ("model", {"max_token_length": 225}, "model.max_token_length"),
    ("training", {"noise_offset": 0.05}, "training.noise_offset"),
    ("training", {"multires_noise_iterations": 6}, "training.multires_noise_iterations"),
    ("training", {"noise_offset": 0.05, "adaptive_noise_scale": 0.01}, "training.adaptive_noise_scale"),
    ("training", {"zero_terminal_snr": True}, "training.zero_terminal_snr"),
    ("training", {"min_snr_gamma": 5.0}, "training.min_snr_gamma"),
    ("training", {"debiased_estimation_loss": True}, "training.debiased_estimation_loss"),
    ("training", {"min_timestep": 100}, "training.min_timestep"),
    ("optimizer", {"text_encoder2_lr": 1e-5}, "optimizer.text_encoder2_lr"),
    ("sampling", {"sample_sampler": "ddim"}, "sampling.sample_sampler"),
])
def test_sd_settings_are_refused_for_flux_and_allowed_for_sd(section, values, path):
    sd = "sdxl" if path == "optimizer.text_encoder2_lr" else "sd2"
    expected = "only SDXL models" if sd == "sdxl" else "only SD1.x, SD2.x"
    for family in ("flux1", "chroma"):
        found = messages_at(flux(family, **{section: values}), path)
        assert any(expected in message for message in found), (family, found)
    for family in (sd, "auto"):
        assert not messages_at(deep_merge({"model": {"model_family": family}}, {section: values}), path)


def test_refusals_say_what_to_use_instead():
    assert "model.ae" in messages_at(flux(model={"vae": "/m/vae.pt"}), "model.vae")[0]
    assert "t5xxl_max_token_length" in messages_at(flux(model={"max_token_length": 150}), "model.max_token_length")[0]
    assert "set it to false" in messages_at(flux(model={"v_parameterization": True}), "model.v_parameterization")[0]
    assert "set it back to 1" in messages_at(flux(model={"clip_skip": 2}), "model.clip_skip")[0]
    assert "remove it" in messages_at(flux(optimizer={"text_encoder2_lr": 1e-5}), "optimizer.text_encoder2_lr")[0]
    assert "Chroma has no CLIP-L" in messages_at(flux("chroma", model={"clip_l": "/m/c.safetensors"}),
                                                 "model.clip_l")[0]


@pytest.mark.parametrize(("section", "values", "path"), [
    ("model", {"t5xxl": "/m/t5.safetensors"}, "model.t5xxl"),
    ("model", {"clip_l": "/m/clip_l.safetensors"}, "model.clip_l"),
    ("model", {"fp8_base": True}, "model.fp8_base"),
    ("flow", {"guidance_scale": 1.0}, "flow.guidance_scale"),
    ("flow", {"timestep_sampling": "sigmoid"}, "flow.timestep_sampling"),
])
def test_flux_settings_are_refused_for_sd(section, values, path):
    for family in ("sd1", "sdxl"):
        found = messages_at(deep_merge({"model": {"model_family": family}}, {section: values}), path)
        assert any("only FLUX" in message for message in found), (family, found)


def test_auto_family_says_nothing_about_flux_files():
    data = {"model": {"model_family": "auto", **FLUX_FILES, "fp8_base": True},
            "training": {"mixed_precision": "bf16", "blocks_to_swap": 10}, "flow": {"guidance_scale": 1.0}}
    assert problems(data) == []


def test_a_plain_sd_config_is_untouched_by_the_flux_rules():
    data = {"model": {"model_family": "sd1", "clip_skip": 2, "v_parameterization": False},
            "training": {"noise_offset": 0.05, "min_snr_gamma": 5.0, "loss_type": "huber", "huber_schedule": "snr"}}
    assert problems(data) == []


# --- FLUX rules ----------------------------------------------------------------------------------------------------


def test_single_file_flux_needs_its_text_encoders_and_ae():
    found = dict(problems(flux(model={"pretrained_model_name_or_path": "/m/flux1-dev.safetensors"})))
    assert set(found) == {"model.clip_l", "model.t5xxl", "model.ae"}
    assert "clip_l.safetensors" in found["model.clip_l"] and "diffusers folder" in found["model.ae"]
    chroma = dict(problems(flux("chroma", model={"pretrained_model_name_or_path": "/m/Chroma.sft"})))
    assert set(chroma) == {"model.t5xxl", "model.ae"}  # Chroma has no CLIP-L
    assert problems(flux(model=FLUX_FILES)) == []
    # a diffusers folder or hub id carries its own; an empty base model is not chosen yet
    for base in ("/m/FLUX.1-dev", "black-forest-labs/FLUX.1-dev", ""):
        assert problems(flux(model={"pretrained_model_name_or_path": base})) == [], base


def test_block_swap_limits():
    assert problems(flux(training={"blocks_to_swap": 35})) == []
    found = messages_at(flux(training={"blocks_to_swap": 36}), "training.blocks_to_swap")
    assert found and "at most 35" in found[0]
    assert messages_at(flux("chroma", training={"blocks_to_swap": 40}), "training.blocks_to_swap")
    both = flux(training={"blocks_to_swap": 8, "cpu_offload_checkpointing": True, "gradient_checkpointing": True})
    assert "blocks_to_swap" in messages_at(both, "training.cpu_offload_checkpointing")[0]
    alone = flux(training={"cpu_offload_checkpointing": True})
    assert "gradient_checkpointing = true" in messages_at(alone, "training.cpu_offload_checkpointing")[0]
    assert problems(flux(training={"cpu_offload_checkpointing": True, "gradient_checkpointing": True})) == []


def test_fp8_needs_mixed_precision_and_a_torch_with_float8(monkeypatch):
    assert "mixed_precision" in messages_at(flux(model={"fp8_base": True}, training={"mixed_precision": "no"}),
                                            "model.fp8_base")[0]
    assert messages_at(flux(model={"fp8_base_unet": True}, training={"mixed_precision": "no"}),
                       "model.fp8_base_unet")
    fine = flux(model={"fp8_base": True}, training={"mixed_precision": "bf16"})
    assert problems(fine, check_packages=True) == []
    monkeypatch.setattr(rules_flux, "installed_torch_version", lambda: (2, 0))
    found = dict(problems(fine, check_packages=True))
    assert "float8_e4m3fn" in found["model.fp8_base"] and "2.1" in found["model.fp8_base"]
    assert problems(fine, check_packages=False) == []  # package checks off: not looked at
    assert rules_flux.installed_torch_version.__name__ == "<lambda>"


def test_installed_torch_version_reads_the_package_metadata():
    version = rules_flux.installed_torch_version()
    assert version is not None and version >= (2, 1)  # the test environment's torch


def test_chroma_needs_the_t5_mask_and_is_warned_about_guidance():
    data = flux("chroma")
    data["model"]["apply_t5_attn_mask"] = False
    assert "true" in messages_at(data, "model.apply_t5_attn_mask")[0]
    assert not messages_at(flux("flux1"), "model.apply_t5_attn_mask")
    data = flux("chroma", flow={"guidance_scale": 3.5})
    assert "guidance 0" in warnings_of(data)["flow.guidance_scale"]
    assert "flow.guidance_scale" not in warnings_of(flux("flux1", flow={"guidance_scale": 3.5}))


def test_huber_snr_schedule_is_refused_for_flux_only():
    data = {"training": {"loss_type": "huber", "huber_schedule": "snr"}}
    assert "'constant' or 'exponential'" in messages_at(flux(**data), "training.huber_schedule")[0]
    assert problems(flux(training={"loss_type": "huber", "huber_schedule": "exponential"})) == []
    assert problems(flux(training={"loss_type": "l2", "huber_schedule": "snr"})) == []  # no Huber loss at all
    assert problems({"model": {"model_family": "sd1"}, **data}) == []


@pytest.mark.parametrize(("family", "steps", "fragment"), [
    ("flux1", 8, "multiples of 16"), ("chroma", 24, "multiples of 16"), ("sd1", 16, "multiples of 64"),
    ("sdxl", 16, "multiples of 32"), ("auto", 16, "FLUX.1, Chroma and SD3 accept multiples of 16"),
])
def test_bucket_steps_follow_the_family(family, steps, fragment):
    data = {"model": {"model_family": family}, "dataset": {"general": {"bucket_reso_steps": steps,
                                                                        "min_bucket_reso": 256}}}
    if family in ("flux1", "chroma"):
        data = flux(family, dataset=data["dataset"])
    assert fragment in messages_at(data, "dataset.general.bucket_reso_steps")[0]


def test_flux_accepts_16_pixel_buckets():
    data = flux(dataset={"general": {"bucket_reso_steps": 16, "min_bucket_reso": 256, "max_bucket_reso": 2048}})
    assert problems(data) == []
    assert problems(flux("chroma", dataset={"general": {"bucket_reso_steps": 48, "min_bucket_reso": 240,
                                                                    "max_bucket_reso": 2016}})) == []


def test_text_encoder_cache_follows_what_flux_trains():
    cache = {"cache_text_encoder_outputs": True}
    # FLUX.1 LoRA trains CLIP-L unless told not to, as for SD
    assert messages_at(flux(training=cache), "training.cache_text_encoder_outputs")
    assert problems(flux(training=cache, network={"train_unet_only": True})) == []
    # Chroma has no CLIP-L: nothing else trains unless train_t5xxl
    assert problems(flux("chroma", training=cache)) == []
    t5 = flux("chroma", training=cache, network={"network_args": {"train_t5xxl": True}})
    assert "train_t5xxl" in messages_at(t5, "network.network_args")[0]
    t5_text = flux("flux1", training=cache, network={"network_args": {"train_t5xxl": "True"}})
    assert messages_at(t5_text, "network.network_args")
    # full fine-tuning trains the transformer only
    assert problems(flux(method="dreambooth", training=cache)) == []
    # captions that change cannot be cached, whatever the family
    shuffled = flux("chroma", training=cache, dataset={"general": {"shuffle_caption": True}})
    assert "cannot be cached" in messages_at(shuffled, "dataset.general.shuffle_caption")[0]


def test_flux_methods():
    assert "LoRA" in messages_at(flux(method="textual_inversion", embedding={"token_string": "zxc"}), "method")[0]
    assert "only the transformer" in messages_at(flux(method="dreambooth", optimizer={"text_encoder_lr": 1e-5}),
                                                 "optimizer.text_encoder_lr")[0]
    assert messages_at(flux(method="finetune", dataset={"in_json": "/m/meta.json"},
                            training={"stop_text_encoder_training": 100}), "training.stop_text_encoder_training")
    assert problems(flux(method="dreambooth")) == []


def test_flow_settings_without_effect_are_warned_about():
    assert "raw" in warnings_of(flux(flow={"model_prediction_type": "sigma_scaled"}))["flow.model_prediction_type"]
    found = warnings_of(flux(flow={"timestep_sampling": "sigmoid", "weighting_scheme": "logit_normal",
                                   "discrete_flow_shift": 2.0}))
    assert "no effect" in found["flow.weighting_scheme"] and "no effect" in found["flow.discrete_flow_shift"]
    quiet = flux(flow={"timestep_sampling": "sigma", "weighting_scheme": "logit_normal", "discrete_flow_shift": 2.0})
    assert warnings_of(quiet) == {}


# --- importers -----------------------------------------------------------------------------------------------------


def imported(name: str) -> tuple[dict, ImportResult, RunConfig]:
    path = FIXTURES / name
    result = import_file(path)
    return read_document(path), result, validate_config(deep_merge(default_config_dict(), result.overlay),
                                                        check_packages=False)


def skipped(result: ImportResult) -> dict:
    return {item.key: item.value for item in result.skipped}


def reasons(result: ImportResult) -> dict:
    return {item.key: item.reason for item in result.skipped}


def assert_every_key_accounted(data: dict, result: ImportResult) -> None:
    flat = {key: value for table in data.values() if isinstance(table, dict) for key, value in table.items()}
    keys = set(flat) | {key for key, value in data.items() if not isinstance(value, dict)}
    assert result.accounted_keys() == keys
    assert not {item.key for item in result.skipped} & set(result.unset)


def test_sd_scripts_flux_args():
    data, result, config = imported("sd_scripts_args_flux.toml")
    assert detect_format(FIXTURES / "sd_scripts_args_flux.toml", data) == "sd_scripts_args"
    model = config.model
    assert model.model_family == "flux1" and model.fp8_base and model.t5xxl_max_token_length == 256
    assert (model.clip_l, model.t5xxl, model.ae) == (
        "/models/flux/clip_l.safetensors", "/models/flux/t5xxl_fp16.safetensors", "/models/flux/ae.safetensors")
    assert model.tokenizer_cache_dir == "/models/flux/tokenizers"
    assert config.flow.timestep_sampling == "shift" and config.flow.discrete_flow_shift == 3.1582
    assert config.flow.guidance_scale == 1.0
    # not in the file: sd-scripts' default prediction type is kept, with a note and a warning
    assert config.flow.model_prediction_type == "sigma_scaled"
    assert any("flow.model_prediction_type = 'sigma_scaled'" in note for note in result.notes)
    assert "flow.model_prediction_type" in {p.path for p in config_warnings(config)}
    assert config.training.blocks_to_swap == 18  # split_mode without blocks_to_swap
    assert config.training.cache_text_encoder_outputs and config.network.train_unet_only
    assert config.network.network_type == "lora" and config.optimizer.text_encoder_lr == 5e-5
    assert config.network.network_args == {"img_attn_dim": 8, "in_dims": [4, 0, 0, 0, 4],
                                           "train_double_block_indices": "0-9", "split_qkv": True,
                                           "loraplus_unet_lr_ratio": 4}
    lost = skipped(result)
    assert lost["text_encoder_lr[1]"] == 1e-5 and "one rate" in reasons(result)["text_encoder_lr[1]"]
    assert lost["noise_offset"] == 0.05 and lost["min_snr_gamma"] == 5
    assert "ignores it for FLUX.1" in reasons(result)["noise_offset"]
    assert config.training.noise_offset == 0 and config.sampling.sample_sampler == "euler_a"  # no SD pin
    assert "network_args.verbose" in lost and "highvram" in lost
    assert_every_key_accounted(data, result)


def test_sd_scripts_chroma_args():
    data, result, config = imported("sd_scripts_args_chroma.toml")
    assert config.model.model_family == "chroma" and config.model.apply_t5_attn_mask
    assert config.model.clip_l == "" and "no CLIP-L" in reasons(result)["clip_l"]
    assert config.training.cpu_offload_checkpointing and config.flow.timestep_sampling == "sigmoid"
    assert (config.flow.sigmoid_scale, config.flow.guidance_scale, config.flow.logit_mean) == (1.5, 0.0, -0.5)
    assert config.flow.model_prediction_type == "raw" and config.flow.weighting_scheme == "logit_normal"
    assert config.network.network_args == {"train_t5xxl": True}
    assert_every_key_accounted(data, result)


def test_sd3_args_are_not_taken_for_flux(tmp_path):
    path = tmp_path / "sd3.toml"
    path.write_text('pretrained_model_name_or_path = "/m/sd3.safetensors"\nclip_l = "/m/clip_l.safetensors"\n'
                    'clip_g = "/m/clip_g.safetensors"\nt5xxl = "/m/t5.safetensors"\n'
                    'network_module = "networks.lora_sd3"\noutput_dir = "/o"\nlearning_rate = 1e-4\n')
    result = import_file(path)
    # SD3's own importer takes them (test_importers_sd3.py); FLUX's leaves them alone
    assert result.overlay["model"]["model_family"] == "sd3" and result.overlay["model"]["t5xxl"] == "/m/t5.safetensors"
    assert not skipped(result)


def test_kohya_chroma_lora():
    data, result, config = imported("kohya_lora_chroma.json")
    assert config.model.model_family == "chroma" and config.network.network_type == "lora"
    assert config.model.apply_t5_attn_mask  # the GUI switches it on for Chroma
    assert config.flow.guidance_scale == 0.0 and config.flow.timestep_sampling == "sigmoid"
    assert config.training.cache_text_encoder_outputs and config.model.fp8_base
    assert config.network.network_args == {"img_attn_dim": 8, "single_dim": 4, "in_dims": [4, 0, 0, 0, 4],
                                           "train_single_block_indices": "0-9"}
    assert skipped(result) == {"noise_offset": 0.05}  # kohya passes it, sd-scripts ignores it for FLUX
    for key in ("weighting_scheme", "logit_mean", "split_mode", "train_blocks", "t5xxl_lr", "clip_l",
                "train_double_block_indices", "mem_eff_save", "show_timesteps"):
        assert key in result.unset, key
    assert config.sampling.sample_sampler == "euler_a"
    assert_every_key_accounted(data, result)


def test_kohya_flux_guidance_zero_means_zero(tmp_path):
    data = json.loads((FIXTURES / "kohya_lora_flux.json").read_text())
    data.update({"guidance_scale": 0, "split_mode": True, "blocks_to_swap": 0, "t5xxl_lr": 1e-5,
                 "split_qkv": True, "train_t5xxl": True, "train_double_block_indices": "0,1,4-5"})
    path = tmp_path / "flux.json"
    path.write_text(json.dumps(data))
    result = import_file(path)
    config = validate_config(deep_merge(default_config_dict(), result.overlay), check_packages=False)
    assert config.flow.guidance_scale == 0.0
    assert any("sd-scripts trained with its default 3.5" in note for note in result.notes)
    assert config.training.blocks_to_swap == 18
    assert config.network.network_args == {"train_blocks": "single", "split_qkv": True, "train_t5xxl": True,
                                           "train_double_block_indices": "0,1,4-5"}
    assert "one rate" in reasons(result)["t5xxl_lr"]


def test_kohya_flux_dreambooth():
    data, result, config = imported("kohya_dreambooth_flux.json")
    assert config.method == "dreambooth" and config.model.model_family == "flux1"
    assert config.model.clip_l == "/models/flux/clip_l.safetensors"  # flux1_clip_l of the DreamBooth tab
    assert config.model.t5xxl == "/models/flux/t5xxl_fp16.safetensors"
    # Atelier swaps blocks only in LoRA training: the deprecated counts are listed, not converted (6 + 12 // 2)
    assert config.training.blocks_to_swap == 0
    assert "LoRA training" in reasons(result)["double_blocks_to_swap"]
    assert config.optimizer.text_encoder_lr is None  # FLUX fine-tuning trains the transformer only
    assert config.training.cache_text_encoder_outputs and config.flow.timestep_sampling == "flux_shift"
    assert {"flux_fused_backward_pass", "mem_eff_save"} <= set(skipped(result))
    assert_every_key_accounted(data, result)


def test_kohya_sd_file_with_the_flux_fields_at_their_defaults(tmp_path):
    data = json.loads((FIXTURES / "kohya_lora_sdxl.json").read_text())
    data.update({"flux1_checkbox": False, "model_type": "flux", "ae": "", "clip_l": "/m/clip_l.safetensors",
                 "guidance_scale": 3.5, "timestep_sampling": "sigma", "t5xxl_max_token_length": 512,
                 "blocks_to_swap": 0, "img_attn_dim": "", "train_double_block_indices": "all", "split_qkv": False,
                 "apply_t5_attn_mask": False, "discrete_flow_shift": 3.0})
    path = tmp_path / "sdxl.json"
    path.write_text(json.dumps(data))
    result = import_file(path)
    config = validate_config(deep_merge(default_config_dict(), result.overlay), check_packages=False)
    assert config.model.model_family == "sdxl" and config.flow == RunConfig().flow
    assert reasons(result)["clip_l"] == "kohya_ss passes it only for FLUX.1 (flux1_checkbox is off)"
    for key in ("flux1_checkbox", "model_type", "guidance_scale", "blocks_to_swap", "img_attn_dim", "split_qkv",
                "train_double_block_indices", "apply_t5_attn_mask"):
        assert key in result.unset, key
    assert result.accounted_keys() == set(data)


# --- presets -------------------------------------------------------------------------------------------------------

FLUX_PRESETS = {"flux1-dev-lora-24gb": ("FLUX.1 dev LoRA 24 GB", 0),
                "flux1-dev-lora-16gb": ("FLUX.1 dev LoRA 16 GB", 8),
                "flux1-dev-lora-12gb": ("FLUX.1 dev LoRA 12 GB", 16)}


@pytest.mark.parametrize("name", FLUX_PRESETS)
def test_flux_dev_presets(name):
    title, swap = FLUX_PRESETS[name]
    path = PRESETS / f"{name}.json"
    assert json.loads(path.read_text())["title"] == title
    config = load_preset(path)
    assert config.model.model_family == "flux1" and config.model.fp8_base
    assert config.training.blocks_to_swap == swap and config.training.gradient_checkpointing
    assert config.training.cache_latents and config.training.cache_text_encoder_outputs
    assert config.optimizer.optimizer_type == "AdamW8bit" and config.training.mixed_precision == "bf16"
    assert config.flow.model_prediction_type == "raw" and config.flow.guidance_scale == 1.0
    assert config.flow.timestep_sampling == "flux_shift"
    assert config_warnings(config) == []
    # with the user's files filled in it stays valid
    data = deep_merge(config.model_dump(exclude_none=True), {"model": FLUX_FILES})
    assert problems(data) == []


def test_chroma_preset():
    config = load_preset(PRESETS / "chroma-lora.json")
    assert json.loads((PRESETS / "chroma-lora.json").read_text())["title"] == "Chroma LoRA"
    assert config.model.model_family == "chroma" and config.model.apply_t5_attn_mask
    assert (config.flow.timestep_sampling, config.flow.model_prediction_type, config.flow.guidance_scale) == (
        "sigmoid", "raw", 0.0)
    assert config_warnings(config) == []
    files = {key: value for key, value in FLUX_FILES.items() if key != "clip_l"}
    assert problems(deep_merge(config.model_dump(exclude_none=True), {"model": files})) == []
