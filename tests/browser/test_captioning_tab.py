"""The Captioning tab in Chromium: caption a folder with the tiny WD14 tagger and another with the tiny BLIP model,
then edit a caption in the editor (unsaved edits block moving on), step through the images and apply a batch edit.
Everything is checked against the caption files on disk."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import open_tab
from PIL import Image
from playwright.sync_api import expect

from engine.caption.edit import EditOptions, edit_caption

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 180_000  # ms: the engine process loads torch and the model before the first caption
COLOURS = {"a_red.png": (220, 40, 40), "b_green.jpg": (30, 200, 60), "c_blue.png": (20, 40, 230)}


def image_folder(root: Path) -> Path:
    root.mkdir()
    for index, (name, colour) in enumerate(COLOURS.items()):
        Image.new("RGB", (64 + 16 * index, 64), colour).save(root / name)
    return root


def caption_file(image: Path) -> Path:
    return image.with_suffix(".txt")


def textbox(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def set_value(page, elem_id: str, value: str) -> None:
    field = textbox(page, elem_id)
    field.fill(value)
    field.press("Tab")


def caption_folder(page, folder: Path, captioner: str, model: Path, options: dict[str, str]) -> None:
    set_value(page, "captioning-folder", str(folder))
    page.locator("#captioning-captioner").get_by_text(captioner.upper(), exact=False).click()
    expect(page.locator(f"#captioning-{captioner}-options")).to_be_visible()
    model_box = textbox(page, "captioning-model")
    model_box.fill(str(model))
    model_box.press("Enter")
    set_value(page, "captioning-workers", "1")
    for option, value in options.items():
        set_value(page, f"captioning-{captioner}-{option}", value)
    page.locator("#captioning-run").click()
    summary = page.locator("#captioning-summary")
    expect(summary).to_contain_text(str(folder), timeout=SLOW)  # not the summary of an earlier folder
    expect(summary).to_contain_text(f"{len(COLOURS)} caption file(s) written")


def tag_table(page) -> dict[str, str]:
    """The tag table's rows as shown: tag -> count (the table renders its rows as grid cells)."""
    rows = page.locator("#captioning-tags [role=row]:has([role=gridcell])")
    cells = [row.locator("[role=gridcell]").all_inner_texts() for row in rows.all()]
    return {tag.strip(): count.strip() for tag, count in cells}


def test_caption_with_wd14_and_blip_then_edit(app_page, work_dir, tiny_models, screenshot):
    page = app_page
    open_tab(page, "Captioning")

    # WD14: every image gets tags (whatever the tiny model says), and the tag table counts them per file.
    tagged = image_folder(work_dir / "tagged")
    caption_folder(page, tagged, "wd14", tiny_models["wd14"], {"general-threshold": "0"})
    captions = {name: caption_file(tagged / name).read_text(encoding="utf-8").strip() for name in COLOURS}
    assert all(captions.values()), captions
    first_tag = captions["a_red.png"].split(", ")[0]
    expected = sum(first_tag in text.split(", ") for text in captions.values())
    expect(page.locator("#captioning-tags")).to_contain_text(first_tag)
    assert tag_table(page)[first_tag] == str(expected)

    # BLIP on another folder; the editor opens on its first image.
    sentences = image_folder(work_dir / "sentences")
    caption_folder(page, sentences, "blip", tiny_models["blip"], {"max-length": "12"})
    first, second, third = (sentences / name for name in COLOURS)
    position = page.locator("#captioning-position")
    caption = textbox(page, "captioning-caption")
    expect(position).to_contain_text("1 / 3")
    expect(caption).to_have_value(caption_file(first).read_text(encoding="utf-8").strip())

    # An unsaved edit keeps the editor on its image; Save writes the file.
    caption.fill("a hand written caption")
    page.locator("#captioning-next").click()
    expect(page.locator("#captioning-editor-status")).to_contain_text("unsaved changes")
    expect(position).to_contain_text("1 / 3")
    page.locator("#captioning-save").click()
    expect(page.locator("#captioning-editor-status")).to_contain_text("Saved a_red.txt")
    assert caption_file(first).read_text(encoding="utf-8") == "a hand written caption\n"

    # Next and previous (wrapping around) show each image's caption from disk.
    page.locator("#captioning-next").click()
    expect(position).to_contain_text("2 / 3")
    expect(caption).to_have_value(caption_file(second).read_text(encoding="utf-8").strip())
    page.locator("#captioning-previous").click()
    expect(position).to_contain_text("1 / 3")
    expect(caption).to_have_value("a hand written caption")
    page.locator("#captioning-previous").click()
    expect(position).to_contain_text("3 / 3")
    expect(caption).to_have_value(caption_file(third).read_text(encoding="utf-8").strip())

    # Clicking a thumbnail opens it; Revert drops an edit.
    page.locator("#captioning-gallery .thumbnail-item").nth(1).click()
    expect(position).to_contain_text("2 / 3")
    caption.fill("not wanted")
    page.locator("#captioning-revert").click()
    expect(caption).to_have_value(caption_file(second).read_text(encoding="utf-8").strip())

    # A batch edit: the preview writes nothing, Apply changes every file and the editor shows the new text.
    add_sks = EditOptions(add_tags=("sks",))
    before = {path: caption_file(path).read_text(encoding="utf-8") for path in (first, second, third)}
    set_value(page, "captioning-add-tags", "sks")
    page.locator("#captioning-batch-preview").click()
    expect(page.locator("#captioning-batch-result")).to_contain_text("Would change 3 of 3 caption file(s)")
    assert {path: caption_file(path).read_text(encoding="utf-8") for path in before} == before
    page.locator("#captioning-batch-apply").click()
    expect(page.locator("#captioning-batch-result")).to_contain_text("Changed 3 of 3 caption file(s)")
    for path, text in before.items():
        assert caption_file(path).read_text(encoding="utf-8") == edit_caption(text, add_sks) + "\n"
    expect(caption).to_have_value(re.compile(r", sks$"))
    expect(page.locator("#captioning-tags")).to_contain_text("sks")
    screenshot(page, "captioning-tab")
