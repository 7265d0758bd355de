"""Start from the Parameters tab: the doctor refuses a broken dataset with the file named; once fixed, Start runs
the engine, a second run waits in the queue and starts when the first ends, and TensorBoard opens on the logs."""

from __future__ import annotations

import re

import pytest
from conftest import open_tab
from playwright.sync_api import expect

pytestmark = pytest.mark.browser
SLOW = 240_000


def fill_field(page, path: str, value: str) -> None:
    box = page.locator(f"#field-{path.replace('.', '-')}").locator("textarea, input").first
    box.fill(value)
    box.press("Tab")


def set_up_parameters(page, tiny_models, train_data_dir: str) -> None:
    open_tab(page, "Parameters")
    page.locator("#preset-choice input").click()
    page.get_by_role("option", name="Demo: tiny model on CPU").click()
    page.get_by_role("tab", name="Model", exact=True).click()
    fill_field(page, "model.pretrained_model_name_or_path", str(tiny_models["sd1_ckpt"]))
    page.get_by_role("tab", name="Dataset", exact=True).last.click()
    fill_field(page, "dataset.train_data_dir", train_data_dir)
    fill_field(page, "dataset.reg_data_dir", "")
    page.get_by_role("tab", name="Saving", exact=True).click()
    fill_field(page, "saving.output_dir", "output")  # the run's own folder, not the preset's demo/ folder
    page.get_by_role("tab", name="Training", exact=True).last.click()
    fill_field(page, "training.max_train_epochs", "1")
    expect(page.locator("#toml-preview")).to_contain_text("max_train_epochs = 1", timeout=90_000)
    expect(page.locator("#validation-status")).to_contain_text("Valid.", timeout=90_000)


def test_start_refuses_a_broken_dataset_then_trains_and_queues(app_page, tiny_models, work_dir, screenshot):
    page = app_page
    missing = work_dir / "no-such-folder"
    set_up_parameters(page, tiny_models, str(missing))
    open_tab(page, "Train")
    page.locator("#train-start").click()
    message = page.locator("#train-message")
    expect(message).to_contain_text("Not started", timeout=60_000)
    expect(message).to_contain_text(str(missing))
    screenshot(page, "train-start-refused")

    set_up_parameters(page, tiny_models, str(tiny_models["dataset_img"]))
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
