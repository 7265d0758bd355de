"""Metadata of FLUX.1 / Chroma network files (engine.networks.metadata, spec §5.4)."""

from __future__ import annotations

import pytest

from engine.config.io import validate_config
from engine.networks.metadata import (
    SPLIT_QKV_ALPHA_KEY,
    TrainingFacts,
    build_metadata,
    modelspec_metadata,
    new_session_id,
)

FLUX_MODEL = {"model_family": "flux1", "pretrained_model_name_or_path": "flux1-dev.safetensors",
              "clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors", "ae": "ae.safetensors"}
CHROMA_MODEL = {"model_family": "chroma", "pretrained_model_name_or_path": "chroma.safetensors",
                "t5xxl": "t5xxl_fp16.safetensors", "ae": "ae.safetensors", "apply_t5_attn_mask": True}


def config_for(model: dict, **sections):
    return validate_config({"model": model, **sections}, check_packages=False)


def facts(family: str, variant: str, **overrides) -> TrainingFacts:
    values = dict(session_id=new_session_id(), started_at=1_700_000_000.0, family=family, v_prediction=False,
                  num_train_images=10, num_reg_images=0, num_batches_per_epoch=10, num_epochs=1, max_train_steps=10,
                  warmup_steps=0, optimizer_description="torch.optim.adamw.AdamW", datasets=[],
                  model_path="flux1-dev.safetensors", variant=variant)
    values.update(overrides)
    return TrainingFacts(**values)


def test_flux_ss_keys():
    config = config_for(FLUX_MODEL, flow={"timestep_sampling": "flux_shift", "guidance_scale": 1.0,
                                          "weighting_scheme": "logit_normal", "logit_std": 1.5})
    metadata = build_metadata(config, facts("flux1", "dev"))
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["ss_network_module"] == "networks.lora_flux"
    assert metadata["ss_model_type"] == "flux"
    assert metadata["ss_timestep_sampling"] == "flux_shift" and metadata["ss_guidance_scale"] == "1.0"
    assert metadata["ss_weighting_scheme"] == "logit_normal" and metadata["ss_logit_std"] == "1.5"
    assert metadata["ss_logit_mean"] == "0.0" and metadata["ss_mode_scale"] == "1.29"
    assert metadata["ss_sigmoid_scale"] == "1.0" and metadata["ss_discrete_flow_shift"] == "3.0"
    assert metadata["ss_model_prediction_type"] == "raw"
    assert metadata["ss_apply_t5_attn_mask"] == "False"
    assert metadata["ss_fp8_base"] == "False" and metadata["ss_fp8_base_unet"] == "False"
    assert metadata["ss_v2"] == "False"


def test_chroma_and_lycoris_keys():
    metadata = build_metadata(config_for({**CHROMA_MODEL, "fp8_base": True}),
                              facts("chroma", "chroma"))
    assert metadata["ss_base_model_version"] == "chroma" and metadata["ss_model_type"] == "chroma"
    assert metadata["ss_apply_t5_attn_mask"] == "True" and metadata["ss_fp8_base"] == "True"
    lycoris = build_metadata(config_for(FLUX_MODEL), facts("flux1", "dev", network_module="lycoris.kohya"))
    assert lycoris["ss_network_module"] == "lycoris.kohya"


def test_sd_files_get_no_flow_keys():
    config = validate_config({}, check_packages=False)
    metadata = build_metadata(config, facts("sd1", ""))
    assert metadata["ss_network_module"] == "networks.lora"
    assert "ss_model_type" not in metadata and "ss_guidance_scale" not in metadata
    spec = modelspec_metadata(config, facts("sd1", ""))
    assert spec["modelspec.prediction_type"] == "epsilon"


@pytest.mark.parametrize(("family", "variant", "architecture", "implementation"), [
    ("flux1", "dev", "flux-1-dev", "https://github.com/black-forest-labs/flux"),
    ("flux1", "schnell", "flux-1-schnell", "https://github.com/black-forest-labs/flux"),
    ("flux1", "", "flux-1", "https://github.com/black-forest-labs/flux"),
    ("chroma", "chroma", "chroma", "https://huggingface.co/lodestones/Chroma"),
])
def test_modelspec(family, variant, architecture, implementation):
    config = config_for(CHROMA_MODEL if family == "chroma" else FLUX_MODEL)
    spec = modelspec_metadata(config, facts(family, variant), now=1_700_000_000)
    assert spec["modelspec.architecture"] == f"{architecture}/lora"
    assert spec["modelspec.implementation"] == implementation
    assert spec["modelspec.resolution"] == "1024x1024"
    assert "modelspec.prediction_type" not in spec and "modelspec.timestep_range" not in spec
    full = modelspec_metadata(config, facts(family, variant), kind="", now=1_700_000_000)
    assert full["modelspec.architecture"] == architecture and full["modelspec.implementation"] == implementation


def test_split_qkv_records_its_alpha_convention():
    split = build_metadata(config_for(FLUX_MODEL, network={"network_args": {"split_qkv": "True"}}),
                           facts("flux1", "dev"))
    assert split[SPLIT_QKV_ALPHA_KEY].startswith("alpha_times_parts")
    assert '"split_qkv": "True"' in split["ss_network_args"]
    assert SPLIT_QKV_ALPHA_KEY not in build_metadata(config_for(FLUX_MODEL), facts("flux1", "dev"))
