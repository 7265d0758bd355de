"""Start from the Parameters tab: the doctor refuses a broken dataset with the file named; once fixed, Start runs
the engine, a second run waits in the queue and starts when the first ends, and TensorBoard opens on the logs."""

from __future__ import annotations

import re

import pytest
from conftest import open_tab
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 240_000


def set_up_parameters(page, tiny_models, folder, train_data_dir: str, status: str = "Valid.") -> None:
    """Load a config file into the Parameters tab: the demo's settings on the tiny model, 40 steps; the form's
    status then reads ``status``."""
    config = folder / f"settings-{abs(hash(train_data_dir))}.toml"
    config.write_text(f"""method = "lora"
[model]
pretrained_model_name_or_path = "{tiny_models['sd1_ckpt']}"
model_family = "sd1"
[network]
network_dim = 4
network_alpha = 4.0
[dataset]
train_data_dir = "{train_data_dir}"
[dataset.general]
resolution = 64
batch_size = 4
min_bucket_reso = 64
max_bucket_reso = 128
[training]
max_train_epochs = 0
max_train_steps = 40
mixed_precision = "no"
cache_latents = true
[optimizer]
learning_rate = 0.001
""", encoding="utf-8")
    open_tab(page, "Parameters")
    page.locator("#params-file textarea, #params-file input").first.fill(str(config))
    page.locator("#params-load").click()
    expect(page.locator("#preset-message")).to_contain_text("Loaded", timeout=90_000)
    expect(page.locator("#validation-status")).to_contain_text(status, timeout=90_000)


def test_start_refuses_a_broken_dataset_then_trains_and_queues(app_page, tiny_models, work_dir, screenshot):
    page = app_page
    page.set_default_timeout(90_000)  # a whole-form fill re-renders hundreds of widgets
    missing = work_dir / "no-such-folder"
    set_up_parameters(page, tiny_models, work_dir, str(missing), status="Not ready to train")
    expect(page.locator("#validation-status")).to_contain_text(str(missing))  # the form says so before Start
    open_tab(page, "Train")
    page.locator("#train-start").click()
    message = page.locator("#train-message")
    expect(message).to_contain_text("Not started", timeout=60_000)
    expect(message).to_contain_text(str(missing))
    screenshot(page, "train-start-refused")

    set_up_parameters(page, tiny_models, work_dir, str(tiny_models["dataset_img"]))
    open_tab(page, "Train")
    page.locator("#train-name textarea, #train-name input").first.fill("first")
    page.locator("#train-start").click()
    expect(message).to_contain_text("Started", timeout=60_000)
    status = page.locator("#run-status")
    expect(status).to_contain_text("running", timeout=SLOW)
    first = page.locator("#run-picker input").input_value()
    assert "first" in first

    page.locator("#train-name textarea, #train-name input").first.fill("second")
    page.locator("#train-enqueue").click()
    expect(message).to_contain_text("Queued (position 1)", timeout=60_000)
    expect(page.locator("#run-queue")).to_contain_text("second", timeout=30_000)
    expect(status).to_contain_text("finished", timeout=SLOW)
    expect(page.locator("#run-queue")).not_to_contain_text("second", timeout=SLOW)  # the queue started it

    page.locator("#run-tensorboard").click()
    link = page.locator("#tensorboard-link a")
    expect(link).to_have_attribute("href", re.compile(r"http://127\.0\.0\.1:\d+/"), timeout=90_000)
    screenshot(page, "train-start-finished")

    page.locator("#run-picker input").click()
    page.get_by_role("option", name=re.compile("second")).click()
    expect(status).to_contain_text(re.compile("running|finished"), timeout=SLOW)
    expect(status).to_contain_text("finished", timeout=SLOW)
