"""The Captioning tab in Chromium: a GIF is captioned like the other formats Create project takes, the progress line
ends at n/n with skipped and broken files, WD14 tags go into a new fine-tune metadata file, and an offline model
error says what the WD14 folder needs and where to give it in the page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import open_tab
from PIL import Image
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 180_000  # ms: the engine process starts and loads the model before the first caption


def textbox(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def set_value(page, elem_id: str, value: str) -> None:
    box = textbox(page, elem_id)
    box.fill(value)
    box.press("Tab")


def mixed_folder(root: Path) -> Path:
    """red.png, an animated GIF, an image captioned already and a broken file."""
    folder = root / "mixed"
    folder.mkdir()
    Image.new("RGB", (80, 64), (220, 40, 40)).save(folder / "red.png")
    frames = [Image.new("P", (64, 64), 5), Image.new("P", (64, 64), 12)]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (64, 64), (20, 40, 230)).save(folder / "done.png")
    (folder / "done.txt").write_text("mine\n", encoding="utf-8")
    (folder / "zz_broken.jpg").write_text("not an image")
    return folder


def start(page, folder: Path, model: str, threshold: str = "0.35") -> None:
    set_value(page, "captioning-folder", str(folder))
    page.locator("#captioning-captioner").get_by_text("WD14", exact=False).click()
    set_value(page, "captioning-wd14-general-threshold", threshold)
    model_box = textbox(page, "captioning-model")
    model_box.fill(model)
    model_box.press("Enter")
    set_value(page, "captioning-workers", "1")
    page.locator("#captioning-run").click()


def test_gif_progress_and_metadata_output(app_page, work_dir, tiny_models, screenshot):
    page = app_page
    open_tab(page, "Captioning")
    folder = mixed_folder(work_dir)
    start(page, folder, str(tiny_models["wd14"]), threshold="0")
    summary = page.locator("#captioning-summary")
    expect(summary).to_contain_text("2 caption file(s) written, 1 skipped (already captioned), 1 failed",
                                    timeout=SLOW)
    expect(page.locator("#captioning-progress")).to_contain_text("caption: 4/4")
    assert (folder / "moving.txt").read_text(encoding="utf-8").strip()
    assert (folder / "done.txt").read_text(encoding="utf-8") == "mine\n"

    # The same folder into a fine-tune metadata file: tags, keyed by image name; no caption file changes.
    (folder / "moving.txt").unlink()
    out = work_dir / "tags.json"
    page.locator("#captioning-output").get_by_text("A fine-tune metadata file").click()
    set_value(page, "captioning-metadata", str(out))
    page.locator("#captioning-run").click()
    expect(summary).to_contain_text(f"3 caption(s) written into {out}", timeout=SLOW)
    expect(page.locator("#captioning-progress")).to_contain_text("caption: 4/4")
    written = json.loads(out.read_text(encoding="utf-8"))
    assert set(written) == {"red", "moving", "done"} and all(set(entry) == {"tags"} for entry in written.values())
    assert not (folder / "moving.txt").exists()
    screenshot(page, "captioning-metadata")

    page.locator("#captioning-run").click()  # the same name again: refused before anything runs
    expect(summary).to_contain_text("never overwritten", timeout=SLOW)
    assert json.loads(out.read_text(encoding="utf-8")) == written


def test_offline_model_error_names_the_wd14_files_and_the_model_box(app_page, work_dir):
    page = app_page
    open_tab(page, "Captioning")
    start(page, mixed_folder(work_dir), "SmilingWolf/wd-no-such-tagger")  # never downloaded; the app is offline
    summary = page.locator("#captioning-summary")
    expect(summary).to_contain_text("Captioning failed", timeout=SLOW)
    expect(summary).to_contain_text("model.onnx and selected_tags.csv")
    expect(summary).to_contain_text("Model box of the Captioning tab")
