"""Parameters → Optimizer: optimizer_type is a list of the known optimizers that also takes a typed class path or a
torch.optim name; lr_scheduler_type lists torch's schedulers and takes a class path (issue 14)."""

from __future__ import annotations

import time

import pytest
from conftest import choose, open_advanced, open_section
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
WAIT = 15_000
# The whole preview text (the Parameters tab draws the TOML preview whole, as a code block).
PREVIEW_JS = "document.querySelector('#toml-preview pre code, #toml-preview pre').textContent"


def _expect_preview(page, line: str) -> None:
    """Wait until the preview holds `line` (the form's handlers update it after each edit)."""
    deadline = time.monotonic() + WAIT / 1000
    text = page.evaluate(PREVIEW_JS)
    while line not in text and time.monotonic() < deadline:
        page.wait_for_timeout(200)
        text = page.evaluate(PREVIEW_JS)
    assert line in text, f"{line!r} not in the preview:\n{text}"


def _type_into(page, path: str, text: str) -> None:
    """Type a value that is not in a dropdown's list and confirm it, as a user does."""
    box = page.locator(f"#field-{path.replace('.', '-')} input")
    box.click()
    box.fill(text)
    box.press("Enter")
    box.press("Tab")


def test_optimizer_type_offers_the_registry_and_takes_a_class_path(page, screenshot):
    open_section(page, "Optimizer")
    status = page.locator("#validation-status")
    choose(page, "optimizer.optimizer_type", "Prodigy")  # a registry name from the list
    _expect_preview(page, 'optimizer_type = "Prodigy"')
    _type_into(page, "optimizer.optimizer_type", "torch.optim.RMSprop")
    _expect_preview(page, 'optimizer_type = "torch.optim.RMSprop"')
    expect(status).not_to_contain_text("optimizer.optimizer_type")
    choose(page, "optimizer.optimizer_type", "RMSprop")  # torch.optim's names are listed too
    _expect_preview(page, 'optimizer_type = "RMSprop"')
    _type_into(page, "optimizer.optimizer_type", "os.system")
    expect(status).to_contain_text("optimizer.optimizer_type", timeout=WAIT)
    expect(status).to_contain_text("not in an allowed package")
    screenshot(page, "optimizer-class-path-refused")
    choose(page, "optimizer.optimizer_type", "AdamW")
    expect(status).not_to_contain_text("optimizer.optimizer_type", timeout=WAIT)


def test_lr_scheduler_type_takes_a_torch_scheduler_with_its_args(page):
    open_section(page, "Optimizer")
    open_advanced(page, "optimizer")
    choose(page, "optimizer.lr_scheduler_type", "CosineAnnealingLR")
    _expect_preview(page, 'lr_scheduler_type = "CosineAnnealingLR"')
    _type_into(page, "optimizer.lr_scheduler_type", "torch.optim.lr_scheduler.StepLR")
    _expect_preview(page, 'lr_scheduler_type = "torch.optim.lr_scheduler.StepLR"')
    choose(page, "optimizer.lr_scheduler_type", "(none: use lr_scheduler)")
    _expect_preview(page, 'lr_scheduler_type = ""')
