"""SD3.5 in Chromium, end to end: the "SD3.5 medium LoRA 12 GB" preset, pointed at the tiny SD3.5 medium files
(separate CLIP-L, CLIP-G and T5-XXL files and the T5 tokenizer) and sized for a CPU, starts from the Train tab and
runs to the end in the live view; the LoRA it saves holds kohya's SD3 names and the variant."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import choose, fill, open_advanced, open_section, open_tab, set_number
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
WAIT = 30_000  # ms: a preset fill re-renders hundreds of widgets
SLOW = 400_000  # ms: the engine loads torch, the tiny SD3.5 files and caches latents and text encodings on a CPU
STEPS = 4
PRESET = "SD3.5 medium LoRA 12 GB"
RUN_NAME = "sd35-gui"







def set_up_sd35(page, files: dict, dataset) -> None:
    """The preset as a user adapts it to this machine: its model files, then what a CPU needs (fp8 and bf16 off,
    plain AdamW instead of 8-bit AdamW, which needs a GPU), 64 px images in buckets of 16, a few steps; T5's
    token length cut to 16 so the tiny run stays short."""
    page.locator("#preset-choice input").click()
    page.get_by_role("option", name=PRESET, exact=True).click()
    open_section(page, "Model")
    preview = page.locator("#toml-preview")
    expect(page.locator("#field-model-model_family input")).to_have_value("sd3", timeout=WAIT)
    expect(preview).to_contain_text('model_family = "sd3"', timeout=WAIT)
    expect(page.locator("#field-model-fp8_base input[type=checkbox]")).to_be_checked()
    fill(page, "field-model-pretrained_model_name_or_path", str(files["model"]))
    fill(page, "field-model-clip_l", str(files["clip_l"]))
    fill(page, "field-model-clip_g", str(files["clip_g"]))
    fill(page, "field-model-t5xxl", str(files["t5xxl"]))
    page.locator("#field-model-fp8_base input[type=checkbox]").uncheck()
    open_advanced(page, "model")
    fill(page, "field-model-tokenizer_cache_dir", str(files["t5_tokenizer"]))
    expect(preview).to_contain_text(f'tokenizer_cache_dir = "{files["t5_tokenizer"]}"', timeout=WAIT)
    fill(page, "field-model-t5xxl_max_token_length", "16")  # an optional number: a text box, empty for the default
    open_section(page, "Dataset")
    fill(page, "field-dataset-train_data_dir", str(dataset))
    fill(page, "field-dataset-general-resolution", "64")
    open_advanced(page, "dataset")
    set_number(page, "dataset.general.min_bucket_reso", 64)
    set_number(page, "dataset.general.max_bucket_reso", 128)
    set_number(page, "dataset.general.bucket_reso_steps", 16)
    open_section(page, "Optimizer")
    optimizer = page.locator("#field-optimizer-optimizer_type textarea, #field-optimizer-optimizer_type input").first
    expect(optimizer).to_have_value("AdamW8bit")  # the preset as written
    fill(page, "field-optimizer-optimizer_type", "AdamW")
    expect(optimizer).to_have_value("AdamW")
    open_section(page, "Training")
    set_number(page, "training.max_train_epochs", 0)
    set_number(page, "training.max_train_steps", STEPS)
    choose(page, "training.mixed_precision", "no")
    expect(page.locator("#field-training-cache_latents input[type=checkbox]")).to_be_checked()
    open_advanced(page, "training")
    expect(page.locator("#field-training-cache_text_encoder_outputs input[type=checkbox]")).to_be_checked()
    for text in (f'clip_g = "{files["clip_g"]}"', f't5xxl = "{files["t5xxl"]}"', "t5xxl_max_token_length = 16",
                 f"max_train_steps = {STEPS}", 'mixed_precision = "no"'):
        expect(preview).to_contain_text(text, timeout=WAIT)
    expect(preview).not_to_contain_text("fp8_base = true")
    expect(page.locator("#validation-status")).to_contain_text("Valid.", timeout=WAIT)


def test_the_sd35_medium_preset_trains_a_lora_from_the_gui(app_page, app_server, sd35_medium_files, tiny_models,
                                                            work_dir, screenshot):
    page = app_page
    page.set_default_timeout(90_000)
    open_tab(page, "Parameters")
    # A private copy: the preset caches latents beside the images, which must not land in the shared tiny dataset.
    dataset = shutil.copytree(tiny_models["dataset_img"], work_dir / "img", ignore=shutil.ignore_patterns("*.npz"))
    set_up_sd35(page, sd35_medium_files, dataset)
    screenshot(page, "parameters-sd35-medium-preset")

    open_tab(page, "Train")
    page.locator("#train-name textarea, #train-name input").first.fill(RUN_NAME)
    page.locator("#train-start").click()
    message = page.locator("#train-message")
    expect(message).to_contain_text("Started", timeout=WAIT)
    status = page.locator("#run-status")
    # This run's status, not the last one an earlier test left in the live view of the shared app
    expect(status).to_contain_text(RUN_NAME, timeout=SLOW)
    expect(status).to_contain_text(re.compile("running|finished|failed"), timeout=SLOW)
    expect(status).to_contain_text(re.compile(f"step [1-9]\\d*/{STEPS}|finished|failed"), timeout=SLOW)
    expect(status).to_contain_text(re.compile("finished|failed"), timeout=SLOW)
    screenshot(page, "sd35-trained")
    expect(page.locator("#run-error")).to_be_hidden()
    expect(status).to_contain_text("finished")
    expect(status).to_contain_text(f"step {STEPS}/{STEPS}")
    expect(page.locator("#run-checkpoints")).to_contain_text(re.compile(r"\.safetensors"), timeout=WAIT)

    # The file the live view lists: a LoRA with kohya's SD3 names, saved as the SD3.5 medium variant.
    from safetensors import safe_open

    checkpoints = page.locator("#run-checkpoints").inner_text()
    names = set(re.findall(r"[\w.-]+\.safetensors", checkpoints))
    # Other tests' runs share the runs folder (and the name last.safetensors): only this run's folder counts.
    saved = [path for path in app_server["runs_dir"].rglob("*.safetensors")
             if path.name in names and any(part.endswith(f"-{RUN_NAME}") for part in path.parts)]
    assert len(saved) == 1, f"the files the live view lists ({sorted(names)}) under {app_server['runs_dir']}: {saved}"
    with safe_open(str(saved[-1]), framework="pt") as lora:
        keys = list(lora.keys())
        metadata = lora.metadata() or {}
    assert keys and all(key.startswith("lora_unet_joint_blocks_") for key in keys), keys[:5]  # transformer only
    assert any("_attn2_" in key for key in keys)  # SD3.5 medium's second attention on block 0
    assert metadata.get("ss_base_model_version") == "5-medium"
