"""Importing SD3 / SD3.5 runs: sd-scripts' sd3_train_network.py / sd3_train.py arguments and the kohya_ss GUI's SD3
fields (flux-sd3-spec §8, §9.3, trap A.27)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.config.importers import ImportResult
from engine.config.importers.registry import detect_format, import_file
from engine.config.io import deep_merge, default_config_dict, read_document, validate_config
from engine.config.schema import RunConfig

FIXTURES = Path(__file__).parents[1] / "fixtures" / "import"


def imported(path: Path) -> tuple[ImportResult, RunConfig]:
    result = import_file(path)
    return result, validate_config(deep_merge(default_config_dict(), result.overlay), check_packages=False)


def reasons(result: ImportResult) -> dict[str, str]:
    return {item.key: item.reason for item in result.skipped}


def notes_about(result: ImportResult, text: str) -> list[str]:
    return [note for note in result.notes if text in note]


def assert_every_key_accounted(data: dict, result: ImportResult) -> None:
    """Nothing disappears: each source key was mapped, skipped or unset, and none twice."""
    assert result.accounted_keys() == set(data)
    assert not {item.key for item in result.skipped} & set(result.unset)


def kohya_file(tmp_path: Path, base: str, **changes) -> Path:
    data = json.loads((FIXTURES / base).read_text())
    data.update(changes)
    path = tmp_path / "kohya.json"
    path.write_text(json.dumps(data))
    return path


# --- sd-scripts arguments ------------------------------------------------------------------------------------------


def test_sd_scripts_sd3_lora_args():
    path = FIXTURES / "sd_scripts_args_sd3.toml"
    data = read_document(path)
    result, config = imported(path)
    assert detect_format(path, data) == "sd_scripts_args"
    model = config.model
    assert model.model_family == "sd3" and model.fp8_base and model.apply_lg_attn_mask
    assert (model.clip_l, model.clip_g, model.t5xxl) == ("/models/sd3/clip_l.safetensors",
                                                         "/models/sd3/clip_g.safetensors",
                                                         "/models/sd3/t5xxl_fp16.safetensors")
    assert model.t5xxl_max_token_length == 154 and config.training.blocks_to_swap == 10
    training = config.training
    assert (training.clip_l_dropout_rate, training.clip_g_dropout_rate, training.t5_dropout_rate) == (0.1, 0.1, 0.2)
    assert training.min_timestep == 100 and training.cache_text_encoder_outputs and config.network.train_unet_only
    flow = config.flow
    assert (flow.weighting_scheme, flow.logit_mean, flow.logit_std) == ("logit_normal", 0.1, 1.2)
    assert flow.training_shift == 3.0 and flow.pos_emb_random_crop_rate == 0.05
    assert flow.model_prediction_type == "raw"  # FLUX's sd-scripts pin is not applied to SD3
    assert config.network.network_type == "lora" and config.optimizer.text_encoder_lr == 5e-5
    assert config.network.network_args == {"context_attn_dim": 8, "emb_dims": [4, 0, 0, 0, 4, 4],
                                           "train_block_indices": "0-9"}
    why = reasons(result)
    assert "CLIP-G's own rate" in why["text_encoder_lr[1]"]
    assert "networks.lora_sd3" in why["network_args.network_reg_dims"]
    assert "does not implement it for SD3" in why["cpu_offload_checkpointing"]
    assert "DOES NOT WORK" in why["save_t5xxl"] and "DOES NOT WORK" in why["t5xxl_dtype"]
    assert "only FLUX.1 and Chroma" in why["timestep_sampling"]
    assert "sd-scripts ignores it for SD3 / SD3.5" in why["noise_offset"]
    assert "sd-scripts ignores it for SD3 / SD3.5" in why["ip_noise_gamma"]
    assert config.training.noise_offset == 0 and config.sampling.sample_sampler == "euler_a"  # no SD pin
    assert notes_about(result, "model.model_family = 'sd3'")
    assert_every_key_accounted(data, result)


def test_sd_scripts_sd3_full_fine_tuning_args():
    path = FIXTURES / "sd_scripts_args_sd3_finetune.toml"
    data = read_document(path)
    result, config = imported(path)
    assert config.method == "dreambooth" and config.model.model_family == "sd3"
    assert config.optimizer.text_encoder_lr == 1e-6  # learning_rate_te1 with train_text_encoder
    assert "CLIP-G's own rate" in reasons(result)["learning_rate_te2"]
    assert config.optimizer.fused_backward_pass and config.optimizer.optimizer_type == "Adafactor"
    assert config.flow.enable_scaled_pos_embed and config.flow.weighting_scheme == "uniform"
    assert config.training.blocks_to_swap == 0 and "LoRA training" in reasons(result)["blocks_to_swap"]
    assert "train_t5xxl" in result.unset  # false in the file
    assert_every_key_accounted(data, result)


def test_sd3_fine_tuning_without_train_text_encoder_freezes_the_text_encoders(tmp_path):
    path = tmp_path / "sd3.toml"
    path.write_text('pretrained_model_name_or_path = "/m/sd3.5_medium.safetensors"\nclip_g = "/m/clip_g.safetensors"\n'
                    'output_dir = "/o"\nlearning_rate = 1e-5\nlearning_rate_te1 = 1e-6\ntrain_t5xxl = true\n')
    result, config = imported(path)
    assert config.method == "dreambooth" and config.optimizer.text_encoder_lr == 0
    assert notes_about(result, "trains the text encoders only with train_text_encoder")
    assert "train_text_encoder is off" in reasons(result)["learning_rate_te1"]
    assert "does not train T5" in reasons(result)["train_t5xxl"]


def test_sd3_keys_in_a_file_for_another_family_are_listed(tmp_path):
    path = tmp_path / "sdxl.toml"
    path.write_text('pretrained_model_name_or_path = "/m/sdxl.safetensors"\noutput_dir = "/o"\nlearning_rate = 1e-4\n'
                    'sdxl = true\nsave_clip = false\nt5xxl_dtype = "bf16"\n')
    result, config = imported(path)
    assert config.model.model_family == "sdxl" and "save_clip" in result.unset
    assert "only SD3 uses it" in reasons(result)["t5xxl_dtype"]
    path.write_text('pretrained_model_name_or_path = "/m/flux1-dev.safetensors"\nae = "/m/ae.safetensors"\n'
                    'output_dir = "/o"\nlearning_rate = 1e-4\nnetwork_module = "networks.lora_flux"\n')
    assert import_file(path).overlay["model"]["model_family"] == "flux1"  # FLUX keys, no SD3 ones: still FLUX


# --- kohya_ss GUI ----------------------------------------------------------------------------------------------------


def test_kohya_sd3_lora():
    path = FIXTURES / "kohya_lora_sd3.json"
    data = read_document(path)
    result, config = imported(path)
    assert detect_format(path, data) == "kohya_gui"
    model = config.model
    assert config.method == "lora" and model.model_family == "sd3" and model.fp8_base
    # the LoRA tab's own names; its clip_l / t5xxl fields are FLUX's (empty here)
    assert (model.clip_l, model.clip_g, model.t5xxl) == ("/models/sd3/clip_l.safetensors",
                                                         "/models/sd3/clip_g.safetensors",
                                                         "/models/sd3/t5xxl_fp16.safetensors")
    assert model.t5xxl_max_token_length is None  # the GUI passes its 512 for FLUX only: SD3's 256 applies
    assert config.flow.weighting_scheme == "logit_normal"  # the file's value, kohya_ss's default (trap A.27)
    assert notes_about(result, "flow.weighting_scheme = 'logit_normal' as the file says")
    assert (config.training.clip_g_dropout_rate, config.training.t5_dropout_rate) == (0.1, 0.25)
    assert config.training.blocks_to_swap == 8 and config.training.cache_text_encoder_outputs
    assert config.network.train_unet_only and config.network.network_type == "lora"
    assert set(reasons(result)) == {"noise_offset"}  # kohya passes it, sd-scripts ignores it for SD3
    for key in ("clip_l", "t5xxl", "ae", "guidance_scale", "timestep_sampling", "t5xxl_max_token_length",
                "t5xxl_dtype", "sd3_fused_backward_pass", "sd3_text_encoder_batch_size", "pos_emb_random_crop_rate"):
        assert key in result.unset, key
    assert_every_key_accounted(data, result)


def test_kohya_sd3_without_weighting_scheme_uses_the_guis_default(tmp_path):
    data = json.loads((FIXTURES / "kohya_lora_sd3.json").read_text())
    del data["weighting_scheme"]
    path = tmp_path / "sd3.json"
    path.write_text(json.dumps(data))
    result, config = imported(path)
    assert config.flow.weighting_scheme == "logit_normal" and notes_about(result, "the file leaves it out")


def test_kohya_sd3_values_sd_scripts_did_not_use_are_listed(tmp_path):
    path = kohya_file(tmp_path, "kohya_lora_sd3.json", t5xxl_lr=1e-5, text_encoder_lr=5e-5, save_clip=True,
                      t5xxl_dtype="fp16", sd3_fused_backward_pass=True, cpu_offload_checkpointing=True,
                      t5xxl_max_token_length=256, clip_l="/models/flux/clip_l.safetensors",
                      sd3_cache_text_encoder_outputs=False, sd3_cache_text_encoder_outputs_to_disk=False)
    result, config = imported(path)
    why = reasons(result)
    assert "CLIP-G and T5" in why["t5xxl_lr"] and config.optimizer.text_encoder_lr == 5e-5
    assert "DOES NOT WORK" in why["save_clip"] and "DOES NOT WORK" in why["t5xxl_dtype"]
    assert "no fused backward pass" in why["sd3_fused_backward_pass"]
    assert "only for FLUX.1" in why["cpu_offload_checkpointing"] and "only for FLUX.1" in why["t5xxl_max_token_length"]
    assert "only for FLUX.1 (flux1_checkbox is off)" in why["clip_l"]
    assert config.model.clip_l == "/models/sd3/clip_l.safetensors"


def test_kohya_sd3_dreambooth_tab(tmp_path):
    path = kohya_file(tmp_path, "kohya_dreambooth.json", sd3_checkbox=True, clip_l="/m/clip_l.safetensors",
                      clip_g="/m/clip_g.safetensors", t5xxl="/m/t5xxl.safetensors", weighting_scheme="uniform",
                      sd3_clip_l_dropout_rate=0.2, fused_backward_pass=False)
    data = read_document(path)
    result, config = imported(path)
    assert config.method == "dreambooth" and config.model.model_family == "sd3"
    assert (config.model.clip_l, config.model.clip_g, config.model.t5xxl) == (
        "/m/clip_l.safetensors", "/m/clip_g.safetensors", "/m/t5xxl.safetensors")
    # the GUI never asks sd3_train.py to train the text encoders from this tab
    assert config.optimizer.text_encoder_lr == 0 and notes_about(result, "trains only the MMDiT")
    why = reasons(result)
    assert "does not pass it for SD3" in why["learning_rate_te"] and "does not pass it for SD3" in why[
        "learning_rate_te1"]
    assert "DreamBooth and Finetuning tabs do not pass it" in why["sd3_clip_l_dropout_rate"]
    assert config.training.clip_l_dropout_rate == 0 and config.flow.weighting_scheme == "uniform"
    assert "sd-scripts ignores it for SD3 / SD3.5" in why["clip_skip"]  # 2 in the SD file
    assert_every_key_accounted(data, result)


def test_kohya_sd3_finetuning_tab_trains_the_text_encoders_at_learning_rate(tmp_path):
    path = kohya_file(tmp_path, "kohya_finetune.json", sdxl_checkbox=False, sdxl_no_half_vae=False,
                      sd3_checkbox=True, clip_g="/m/clip_g.safetensors", train_text_encoder=True)
    data = read_document(path)
    result, config = imported(path)
    assert config.method == "finetune" and config.model.model_family == "sd3"
    assert config.optimizer.text_encoder_lr == config.optimizer.learning_rate == 4e-7
    assert notes_about(result, "trains CLIP-L and CLIP-G at learning_rate")
    assert_every_key_accounted(data, result)


def test_kohya_sd_file_with_the_sd3_fields_at_their_defaults(tmp_path):
    defaults = {"sd3_checkbox": False, "sd3_clip_l": "", "clip_g": "", "sd3_t5xxl": "", "clip_g_dropout_rate": 0,
                "sd3_t5_dropout_rate": 0, "pos_emb_random_crop_rate": 0, "sd3_enable_scaled_pos_embed": False,
                "sd3_text_encoder_batch_size": 1, "save_clip": False, "t5xxl_dtype": "bf16", "t5xxl_device": "",
                "weighting_scheme": "logit_normal", "logit_std": 1.0}
    path = kohya_file(tmp_path, "kohya_lora_sdxl.json", **defaults)
    result, config = imported(path)
    assert config.model.model_family == "sdxl" and config.flow == RunConfig().flow
    assert set(defaults) <= set(result.unset)
    path = kohya_file(tmp_path, "kohya_lora_sdxl.json", clip_g="/m/clip_g.safetensors", t5xxl_dtype="fp16")
    result, _ = imported(path)
    assert reasons(result)["clip_g"] == reasons(result)["t5xxl_dtype"] == ("kohya_ss passes it only for SD3 "
                                                                             "(sd3_checkbox is off)")


def test_flux_and_sd3_checkboxes_both_on_run_flux(tmp_path):
    path = kohya_file(tmp_path, "kohya_lora_flux.json", sd3_checkbox=True)
    result, config = imported(path)
    assert config.model.model_family == "flux1"
    assert "kohya_ss runs the FLUX script" in reasons(result)["sd3_checkbox"]
