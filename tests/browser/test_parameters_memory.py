"""The Parameters tab's Memory section, clicked through in Chromium on a tiny SD model: a card far too small does
not fit, Fit to my GPU lists the changes, Apply changes sets them in the form and Undo puts the form back; with
"Update as settings change" on, changing a setting plans again."""

from __future__ import annotations

import pytest
from conftest import fill, open_section, open_tab
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
WAIT = 90_000  # a plan starts an engine process that loads torch and traces a step: seconds, more on 2 busy cores
CHECKPOINTING = "#field-training-gradient_checkpointing input[type=checkbox]"
BATCH = "#field-dataset-general-batch_size input[type=number]"


def load_tiny_config(page, tiny_models, folder) -> None:
    config = folder / "memory.toml"
    config.write_text(f"""method = "lora"
[model]
pretrained_model_name_or_path = "{tiny_models['sd1']}"
model_family = "sd1"
[network]
network_dim = 4
network_alpha = 4.0
[dataset]
train_data_dir = "{tiny_models['dataset_img']}"
[dataset.general]
resolution = 64
batch_size = 2
min_bucket_reso = 64
max_bucket_reso = 128
[training]
max_train_epochs = 0
max_train_steps = 8
mixed_precision = "no"
[optimizer]
learning_rate = 0.001
""", encoding="utf-8")
    open_tab(page, "Parameters")
    fill(page, "params-file", str(config))
    page.locator("#params-load").click()
    expect(page.locator("#preset-message")).to_contain_text("Loaded", timeout=WAIT)
    expect(page.locator("#validation-status")).to_contain_text("Valid.", timeout=WAIT)


def test_estimate_fit_apply_and_undo_on_a_tiny_card(app_page, tiny_models, work_dir, screenshot):
    page = app_page
    page.set_default_timeout(WAIT)
    load_tiny_config(page, tiny_models, work_dir)
    open_section(page, "Training")
    expect(page.locator(CHECKPOINTING)).not_to_be_checked()
    fill(page, "memory-gpu", "0.05GiB")

    page.locator("#memory-estimate").click()
    report = page.locator("#memory-report")
    expect(page.locator("#memory-bar[data-state=over]")).to_contain_text("does not fit", timeout=WAIT)
    expect(report).to_contain_text("denoiser weights (frozen)")
    expect(page.locator("#memory-apply")).to_be_hidden()
    screenshot(page, "parameters-memory-estimate")

    page.locator("#memory-fit").click()
    expect(report).to_contain_text("Changes, in order", timeout=WAIT)
    expect(report).to_contain_text("training.gradient_checkpointing")
    expect(report).to_contain_text("dataset.general.batch_size")
    screenshot(page, "parameters-memory-fit")

    page.locator("#memory-apply").click()
    message = page.locator("#memory-message")
    expect(message).to_contain_text("Changed in the form", timeout=WAIT)
    expect(message).to_contain_text("training.gradient_checkpointing")
    expect(page.locator(CHECKPOINTING)).to_be_checked()
    expect(page.locator("#toml-preview")).to_contain_text("gradient_checkpointing = true", timeout=WAIT)
    open_section(page, "Dataset")
    expect(page.locator(BATCH)).to_have_value("1")

    page.locator("#memory-undo").click()
    expect(message).to_contain_text("Undone", timeout=WAIT)
    expect(page.locator(BATCH)).to_have_value("2")
    open_section(page, "Training")
    expect(page.locator(CHECKPOINTING)).not_to_be_checked()
    expect(page.locator("#toml-preview")).to_contain_text("gradient_checkpointing = false", timeout=WAIT)
    expect(page.locator("#memory-undo")).to_be_hidden()

    page.locator("#memory-live input[type=checkbox]").check()
    expect(report).to_contain_text("batch 2 at 64x64", timeout=WAIT)  # turning it on plans the form as it is
    open_section(page, "Dataset")
    fill(page, "field-dataset-general-batch_size", "1")
    expect(report).to_contain_text("batch 1 at 64x64", timeout=WAIT)  # the change alone plans again
