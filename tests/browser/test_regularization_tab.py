"""The Regularization tab in Chromium: create a class folder, see the balance against a training folder, generate
class images from the tiny SD1 model and see them in the gallery and on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import open_tab
from PIL import Image
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 300_000  # ms: the engine process imports torch and loads the model on a shared CPU


def training_folder(root: Path, images: int, repeats: int) -> Path:
    folder = root / f"{repeats}_sks dog"
    folder.mkdir(parents=True)
    for index in range(images):
        Image.new("RGB", (64, 64), (40 * index, 90, 160)).save(folder / f"{index}.png")
    return root


def fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def test_create_balance_and_generate_class_images(app_page, work_dir, tiny_models, screenshot):
    page = app_page
    open_tab(page, "Regularization")
    train = training_folder(work_dir / "img", images=3, repeats=2)  # 6 training samples per epoch
    reg = work_dir / "reg"

    fill(page, "reg-parent", str(reg))
    fill(page, "reg-class", "dog")
    page.locator("#reg-create").click()
    expect(page.locator("#reg-folder textarea")).to_have_value(str(reg / "1_dog"))
    expect(page.locator("#reg-message")).to_contain_text("Created")
    assert (reg / "1_dog").is_dir()
    fill(page, "reg-folder", str(reg / "dogs"))  # a name training would skip is pointed out
    expect(page.locator("#reg-folder-note")).to_contain_text("is not named <repeats>_<class>")
    fill(page, "reg-folder", str(reg / "1_dog"))
    expect(page.locator("#reg-folder-note")).to_have_text("")
    expect(page.locator("#reg-message")).to_contain_text("Created")  # the creation message stays

    fill(page, "reg-train-dir", str(train))
    balance = page.locator("#reg-balance")
    expect(balance).to_contain_text("Regularization images 0", use_inner_text=True)
    expect(balance).to_contain_text("no regularization images yet", use_inner_text=True)

    fill(page, "reg-model", str(tiny_models["sd1"]))
    fill(page, "reg-gen-prompt", "a photo of a dog")
    for elem_id, value in (("reg-gen-count", "2"), ("reg-gen-steps", "2"), ("reg-gen-width", "64"),
                           ("reg-gen-height", "64"), ("reg-gen-seed", "3")):
        fill(page, elem_id, value)
    page.locator("#reg-generate").click()
    expect(page.locator("#reg-gen-progress")).to_contain_text("Done: wrote 2 image(s)", timeout=SLOW)
    expect(page.locator("#reg-gallery img")).to_have_count(2)

    written = sorted(path.name for path in (reg / "1_dog").iterdir())
    assert written == ["0001.png", "0001.txt", "0002.png", "0002.txt"]
    assert Image.open(reg / "1_dog" / "0002.png").size == (64, 64)
    assert (reg / "1_dog" / "0001.txt").read_text(encoding="utf-8") == "a photo of a dog"

    # 2 class images (1 repeat) against 6 training samples: both used, 3 times each, none unused
    expect(balance).to_contain_text("Training samples (images × repeats) 6 (3 images)", use_inner_text=True)
    expect(balance).to_contain_text("Regularization images 2", use_inner_text=True)
    expect(balance).to_contain_text("Regularization samples used 6", use_inner_text=True)
    expect(balance).to_contain_text("Unused regularization images 0", use_inner_text=True)
    expect(balance).to_contain_text("about 3.0 times per epoch", use_inner_text=True)

    fill(page, "reg-prior-loss", "0.8")
    page.locator("#reg-apply").click()
    expect(page.locator("#reg-message")).to_contain_text(f"{reg}")
    expect(page.locator("#reg-message")).to_contain_text("prior loss weight of 0.8")
    screenshot(page, "regularization-tab")
