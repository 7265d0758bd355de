"""Parameters → Dataset's dataset editor, clicked through in Chromium: add a dataset with two subsets, edit them,
reorder, remove, see image counts and a row's own error, export the sd-scripts dataset TOML, and see the datasets
in the status and the preview."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from conftest import fill, open_section
from PIL import Image
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
WAIT = 15000
# The whole preview text (the Parameters tab draws the TOML preview whole, as a code block).
PREVIEW_JS = "document.querySelector('#toml-preview pre code, #toml-preview pre').textContent"


def images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (64, 64), (index * 40, 90, 160)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("a photo of sks dog")
    return folder


def rows(page):
    return page.locator("#dataset-editor-rows").get_by_role("row")


def row(page, name: str):
    """The list's row of one dataset or subset ('dataset 1 › subset 2'); the selected one is marked with ▶."""
    return rows(page).filter(has=page.get_by_role("gridcell", name=re.compile(rf"^(▶ )?{re.escape(name)}$")))


def preview_until(page, check, what: str) -> str:
    """The TOML preview's text once `check(text)` holds (waiting for the form's revalidation, like `expect`)."""
    text = ""
    for _ in range(WAIT // 250):
        text = page.evaluate(PREVIEW_JS)
        if check(text):
            return text
        page.wait_for_timeout(250)
    raise AssertionError(f"the preview never {what}:\n{text}")


def subset_field(name: str) -> str:
    return f"field-dataset-datasets-subsets-{name}"


def test_build_edit_reorder_remove_and_export_datasets(page, work_dir: Path, tiny_models, screenshot):
    first, second = images(work_dir / "dog", 3), images(work_dir / "reg", 2)
    open_section(page, "Dataset")
    editor = page.locator("#dataset-editor")
    expect(editor).to_be_visible()

    # A new dataset comes with an empty subset, selected, whose own row says what it lacks.
    page.locator("#dataset-editor-add-dataset").click()
    expect(row(page, "dataset 1 › subset 1")).to_contain_text("image_dir is required", timeout=WAIT)
    expect(row(page, "dataset 1 › subset 1")).to_contain_text("▶")
    expect(page.locator("#dataset-editor-subset")).to_be_visible()
    fill(page, subset_field("image_dir"), str(first))
    expect(row(page, "dataset 1 › subset 1")).to_contain_text("3 images", timeout=WAIT)
    expect(row(page, "dataset 1 › subset 1")).not_to_contain_text("✗")

    # A second subset: regularization images with their own repeats.
    page.locator("#dataset-editor-add-subset").click()
    expect(row(page, "dataset 1 › subset 2")).to_contain_text("▶", timeout=WAIT)
    expect(page.locator(f"#{subset_field('image_dir')} textarea, #{subset_field('image_dir')} input").first
           ).to_have_value("")  # the new subset's fields, not the first one's
    fill(page, subset_field("image_dir"), str(second))
    page.locator(f"#{subset_field('is_reg')} input").check()
    fill(page, subset_field("num_repeats"), "many")
    expect(row(page, "dataset 1 › subset 2")).to_contain_text("num_repeats: expected a whole number", timeout=WAIT)
    expect(page.locator("#dataset-editor-subset-heading")).to_contain_text("expected a whole number")
    fill(page, subset_field("num_repeats"), "2")
    expect(row(page, "dataset 1 › subset 2")).to_contain_text("2 images", timeout=WAIT)
    expect(row(page, "dataset 1 › subset 2")).to_contain_text("regularization")
    expect(row(page, "dataset 1 › subset 2")).not_to_contain_text("✗")
    expect(row(page, "dataset 1")).to_contain_text("5 images")

    # The dataset's own keys: click its row.
    row(page, "dataset 1").click()
    expect(page.locator("#dataset-editor-subset")).to_be_hidden(timeout=WAIT)
    fill(page, "field-dataset-datasets-resolution", "768")
    expect(row(page, "dataset 1")).to_contain_text("768×768", timeout=WAIT)

    # Reorder: the regularization subset moves up.
    row(page, "dataset 1 › subset 2").click()
    expect(row(page, "dataset 1 › subset 2")).to_contain_text("▶", timeout=WAIT)
    page.locator("#dataset-editor-up").click()
    expect(row(page, "dataset 1 › subset 1")).to_contain_text(str(second), timeout=WAIT)
    expect(row(page, "dataset 1 › subset 1")).to_contain_text("▶")
    expect(row(page, "dataset 1 › subset 2")).to_contain_text(str(first))

    # Remove: a third subset added and taken away again.
    page.locator("#dataset-editor-add-subset").click()
    expect(row(page, "dataset 1 › subset 3")).to_be_visible(timeout=WAIT)
    page.locator("#dataset-editor-remove").click()
    expect(row(page, "dataset 1 › subset 3")).to_have_count(0, timeout=WAIT)
    expect(rows(page).filter(has_text="dataset 1")).to_have_count(3)

    # The form holds them: the preview shows them, and with a base model the status is "Valid.".
    def holds_the_subsets(text: str) -> bool:
        datasets = tomllib.loads(text)["dataset"]["datasets"]
        return [[subset.get("image_dir") for subset in dataset["subsets"]] for dataset in datasets] == [
            [str(second), str(first)]]

    datasets = tomllib.loads(preview_until(page, holds_the_subsets, "showed the two subsets"))["dataset"]["datasets"]
    assert datasets[0]["resolution"] == [768, 768] and datasets[0]["subsets"][0]["num_repeats"] == 2
    open_section(page, "Model")
    fill(page, "field-model-pretrained_model_name_or_path", str(tiny_models["sd1"]))
    expect(page.locator("#validation-status")).to_contain_text("Valid.", timeout=WAIT)

    # Export, then a second export to the same name keeps the file.
    open_section(page, "Dataset")
    target = work_dir / "dataset.toml"
    fill(page, "dataset-editor-export-path", str(target))
    page.locator("#dataset-editor-export").click()
    message = page.locator("#dataset-editor-export-message")
    expect(message).to_contain_text("Wrote", timeout=WAIT)
    written = tomllib.loads(target.read_text())
    assert [s["image_dir"] for s in written["datasets"][0]["subsets"]] == [str(second), str(first)]
    assert written["datasets"][0]["resolution"] == 768
    assert written["datasets"][0]["subsets"][0] == {"image_dir": str(second), "is_reg": True, "num_repeats": 2}
    page.locator("#dataset-editor-export").click()
    expect(message).to_contain_text("already exists and is kept as it is", timeout=WAIT)
    assert tomllib.loads(target.read_text()) == written
    screenshot(page, "dataset-editor")


def test_imported_datasets_show_up_in_the_editor_and_stay_editable(page, work_dir: Path):
    """A value set from outside (Import of an sd-scripts dataset TOML) redraws the list and the selected row."""
    folder = images(work_dir / "dog", 2)
    source = work_dir / "multires.toml"
    source.write_text(f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{folder}'\n"
                      f"[[datasets]]\nresolution = 768\n[[datasets.subsets]]\nimage_dir = '{folder}'\n"
                      "num_repeats = 3\n")
    page.locator("#params-file textarea, #params-file input").first.fill(str(source))
    page.locator("#params-import").click()
    open_section(page, "Dataset")
    expect(row(page, "dataset 2 › subset 1")).to_contain_text("2 images", timeout=WAIT)
    expect(row(page, "dataset 1")).to_contain_text("512×512")
    expect(row(page, "dataset 2")).to_contain_text("768×768")
    row(page, "dataset 2 › subset 1").click()
    repeats = page.locator(f"#{subset_field('num_repeats')} textarea").first
    expect(repeats).to_have_value("3", timeout=WAIT)
    assert "num_repeats = 3" in preview_until(page, lambda text: str(folder) in text, "showed the datasets")
    fill(page, subset_field("num_repeats"), "")  # emptied: inherits, and is no longer written
    text = preview_until(page, lambda text: "num_repeats = 3" not in text, "dropped num_repeats")
    datasets = tomllib.loads(text)["dataset"]["datasets"]
    assert [dataset["subsets"][0]["image_dir"] for dataset in datasets] == [str(folder)] * 2
    assert "num_repeats" not in datasets[1]["subsets"][0]
