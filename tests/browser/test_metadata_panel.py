"""The Dataset tab's "Prepare fine-tune metadata" panel in Chromium: caption and tag files merged and cleaned into a
new metadata JSON (never over an existing file), then handed to the Parameters tab as a fine-tuning dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import field, fill, open_advanced, open_section, open_tab
from PIL import Image
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 30_000  # ms


def training_folder(root: Path) -> Path:
    folder = root / "train"
    folder.mkdir()
    for name in ("one.png", "two.jpg", "three.webp"):
        Image.new("RGB", (96, 96), (200, 90, 40)).save(folder / name)
    (folder / "one.caption").write_text("an anime woman sitting\n", encoding="utf-8")
    (folder / "two.caption").write_text("a person with a hat\n", encoding="utf-8")
    (folder / "one.txt").write_text("1girl, long_hair, white_shirt, shirt\n", encoding="utf-8")
    return folder


def test_prepare_finetune_metadata_and_use_it(app_page, work_dir, screenshot):
    page = app_page
    folder = training_folder(work_dir)
    out = work_dir / "meta_clean.json"
    open_tab(page, "Dataset")
    page.locator("#dataset-metadata").get_by_role("button").first.click()
    fill(page, "dataset-metadata-folder", str(folder))
    fill(page, "dataset-metadata-out", str(out))
    page.locator("#dataset-metadata-clean input").check()
    use = page.locator("#dataset-metadata-use")
    expect(use).to_be_disabled()
    page.locator("#dataset-metadata-write").click()

    result = page.locator("#dataset-metadata-result")
    expect(result).to_contain_text("Wrote 2 entries", timeout=SLOW)
    expect(result).to_contain_text("three.webp")  # no caption or tag file: named, left out
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "one": {"caption": "an girl sitting", "tags": "1girl, long hair, white shirt"},
        "two": {"caption": "a girl with a hat"}}
    screenshot(page, "dataset-metadata")

    before = out.read_bytes()
    page.locator("#dataset-metadata-write").click()
    expect(result).to_contain_text("never overwritten", timeout=SLOW)
    assert out.read_bytes() == before
    expect(use).to_be_disabled()

    # A new name builds on the first file: tags from another extension are merged into it.
    (folder / "three.tags").write_text("no_humans", encoding="utf-8")
    second = work_dir / "meta_more.json"
    fill(page, "dataset-metadata-in", str(out))
    fill(page, "dataset-metadata-out", str(second))
    page.locator("#dataset-metadata-captions input").uncheck()
    tags_extension = page.locator("#dataset-metadata-tags-extension input")
    tags_extension.fill(".tags")
    tags_extension.press("Enter")
    page.locator("#dataset-metadata-write").click()
    expect(result).to_contain_text("Wrote 3 entries", timeout=SLOW)
    assert json.loads(second.read_text(encoding="utf-8"))["three"] == {"tags": "no humans"}

    use.click()
    expect(result).to_contain_text("Sent to the Parameters tab", timeout=SLOW)
    open_tab(page, "Parameters")
    open_section(page, "dataset")
    open_advanced(page, "dataset")  # in_json is an advanced field
    in_json = field(page, "dataset.in_json").locator("textarea, input").first
    expect(in_json).to_have_value(str(second), timeout=SLOW)
    data_dir = field(page, "dataset.train_data_dir").locator("textarea, input").first
    expect(data_dir).to_have_value(str(folder))
    expect(page.locator("#field-method input").first).to_have_value("finetune")
