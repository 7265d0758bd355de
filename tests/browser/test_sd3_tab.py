"""SD3 / SD3.5 in Chromium: choosing the sd3 family shows its three text-encoder files (CLIP-L, CLIP-G, T5-XXL) and
its flow settings, hides FLUX's AE, guidance and timestep sampling and the SD-only options, and what is set lands in
the generated TOML; with "auto" and an SD3 file without its text encoders, Start is refused before any GPU time with
the doctor naming the missing CLIP-G."""

from __future__ import annotations

import shutil

import pytest
from conftest import choose, field, fill, open_advanced, open_section, open_tab, set_number
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
WAIT = 30_000  # ms: a family change re-renders hundreds of widgets








def test_the_sd3_family_shows_its_own_fields_and_writes_them(page, sd35_medium_files, screenshot):
    open_section(page, "Model")
    choose(page, "model.model_family", "sd3")
    preview = page.locator("#toml-preview")
    expect(preview).to_contain_text('model_family = "sd3"', timeout=WAIT)
    for path in ("model.clip_l", "model.clip_g", "model.t5xxl", "model.fp8_base"):
        expect(field(page, path)).to_be_visible(timeout=WAIT)
    expect(page.locator("#field-model-clip_g-browse")).to_be_visible()  # the file browser
    for path in ("model.ae", "model.clip_skip", "model.v_parameterization"):
        expect(field(page, path)).to_be_hidden()
    open_advanced(page, "model")
    for path in ("model.vae", "model.apply_lg_attn_mask", "model.tokenizer_cache_dir"):
        expect(field(page, path)).to_be_visible()
    expect(field(page, "model.no_half_vae")).to_be_hidden()

    open_section(page, "Flow")
    expect(page.locator("#unused-flow")).to_be_hidden()
    expect(field(page, "flow.training_shift")).to_be_visible()
    for path in ("flow.timestep_sampling", "flow.guidance_scale", "flow.discrete_flow_shift"):
        expect(field(page, path)).to_be_hidden()
    open_advanced(page, "flow")
    for path in ("flow.weighting_scheme", "flow.pos_emb_random_crop_rate", "flow.enable_scaled_pos_embed"):
        expect(field(page, path)).to_be_visible()
    expect(field(page, "flow.model_prediction_type")).to_be_hidden()

    open_section(page, "Training")
    expect(field(page, "training.blocks_to_swap")).to_be_visible()
    open_advanced(page, "training")
    expect(field(page, "training.clip_g_dropout_rate")).to_be_visible()
    expect(field(page, "training.noise_offset")).to_be_hidden()
    expect(field(page, "training.cpu_offload_checkpointing")).to_be_visible()  # the MMDiT offloads as FLUX's does

    # what is set is written to the config
    open_section(page, "Model")
    fill(page, "field-model-clip_l", str(sd35_medium_files["clip_l"]))
    fill(page, "field-model-clip_g", str(sd35_medium_files["clip_g"]))
    fill(page, "field-model-t5xxl", str(sd35_medium_files["t5xxl"]))
    open_section(page, "Flow")
    set_number(page, "flow.training_shift", 3.0)
    open_section(page, "Training")
    set_number(page, "training.clip_g_dropout_rate", 0.25)
    expect(preview).to_contain_text(f'clip_g = "{sd35_medium_files["clip_g"]}"', timeout=WAIT)
    expect(preview).to_contain_text(f't5xxl = "{sd35_medium_files["t5xxl"]}"')
    expect(preview).to_contain_text("training_shift = 3.0")
    expect(preview).to_contain_text("clip_g_dropout_rate = 0.25")
    expect(page.locator("#validation-status")).to_contain_text("Not ready to train", timeout=WAIT)  # no base model
    screenshot(page, "parameters-sd3-family")

    # FLUX.1 hides them again and shows its own, except a changed SD3 value: the rule refusing it names it, so it
    # stays in view to be set back
    open_section(page, "Model")
    fill(page, "field-model-clip_g", "")
    choose(page, "model.model_family", "flux1")
    expect(field(page, "model.ae")).to_be_visible(timeout=WAIT)
    expect(field(page, "model.clip_g")).to_be_hidden()
    open_section(page, "Flow")
    expect(field(page, "flow.guidance_scale")).to_be_visible()
    expect(field(page, "flow.pos_emb_random_crop_rate")).to_be_hidden()
    expect(field(page, "flow.training_shift")).to_be_visible()
    expect(page.locator("#validation-status")).to_contain_text("flow.training_shift", timeout=WAIT)


def test_auto_with_an_sd3_file_without_text_encoders_is_refused_naming_clip_g(app_page, sd35_medium_files, tiny_models,
                                                                                work_dir, screenshot):
    page = app_page
    page.set_default_timeout(90_000)
    open_tab(page, "Parameters")
    dataset = shutil.copytree(tiny_models["dataset_img"], work_dir / "img", ignore=shutil.ignore_patterns("*.npz"))
    open_section(page, "Model")
    expect(page.locator("#field-model-model_family input")).to_have_value("auto")
    fill(page, "field-model-pretrained_model_name_or_path", str(sd35_medium_files["model"]))
    fill(page, "field-model-clip_l", str(sd35_medium_files["clip_l"]))
    fill(page, "field-model-t5xxl", str(sd35_medium_files["t5xxl"]))
    open_section(page, "Dataset")
    fill(page, "field-dataset-train_data_dir", str(dataset))
    fill(page, "field-dataset-general-resolution", "64")
    open_advanced(page, "dataset")
    set_number(page, "dataset.general.min_bucket_reso", 64)
    set_number(page, "dataset.general.max_bucket_reso", 128)
    expect(page.locator("#toml-preview")).to_contain_text("max_bucket_reso = 128", timeout=WAIT)
    expect(page.locator("#toml-preview")).to_contain_text(f'clip_l = "{sd35_medium_files["clip_l"]}"', timeout=WAIT)
    expect(page.locator("#validation-status")).to_contain_text("Valid.", timeout=WAIT)

    open_tab(page, "Train")
    page.locator("#train-start").click()
    message = page.locator("#train-message")
    expect(message).to_contain_text("Not started", timeout=WAIT)
    expect(message).to_contain_text("model.clip_g: not set, and the SD3 file holds no CLIP-G")
    expect(message).to_contain_text(str(sd35_medium_files["model"]))
    expect(message).to_contain_text("clip_g.safetensors")  # what to do: set model.clip_g to CLIP-G's file
    screenshot(page, "sd3-start-refused-missing-clip-g")
