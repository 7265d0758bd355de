"""The Dataset tab in Chromium: a project made from a flat folder of pictures (copied, one converted, a broken one
named), the gallery, the doctor's findings and bucket chart, balancing by renaming, and handing the folders to
the Parameters tab."""

from __future__ import annotations

import hashlib
import io
import re
import time
from pathlib import Path

import pytest
from conftest import fill, open_tab
from PIL import Image
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 30_000  # ms


def coloured_pixels(png: bytes) -> int:
    """Pixels clearly coloured (not white, grey or black): what drawn bars leave on a chart."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(count for count, (r, g, b) in image.getcolors(1 << 22) if max(r, g, b) - min(r, g, b) > 60)


def expect_coloured_bars(chart, minimum: int = 500, seconds: float = 20) -> None:
    """Bars that exist but have no height (a y scale that does not start at 0) leave no colour."""
    deadline = time.monotonic() + seconds
    while (count := coloured_pixels(chart.screenshot())) <= minimum:
        assert time.monotonic() < deadline, f"the bucket histogram shows no bars ({count} coloured pixels)"
        time.sleep(1)


def make_photos(folder: Path) -> dict[str, str]:
    """A flat folder as people have it: mixed formats and shapes, some captions, one damaged file."""
    folder.mkdir(parents=True)
    for name, size, color in (("wide.png", (512, 384), (200, 40, 40)), ("tall.jpg", (384, 512), (40, 160, 60)),
                              ("square.png", (512, 512), (30, 60, 200)), ("old.bmp", (448, 320), (220, 180, 20))):
        Image.new("RGB", size, color).save(folder / name)
    (folder / "wide.txt").write_text("a photo of sks dog, wide")
    (folder / "square.txt").write_text("a photo of sks dog, square")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_create_a_project_preview_doctor_and_balance(app_page, work_dir, screenshot):
    page = app_page
    photos, project = work_dir / "photos", work_dir / "project"
    originals = make_photos(photos)
    open_tab(page, "Dataset")
    fill(page, "dataset-source", str(photos))
    fill(page, "dataset-project", str(project))
    fill(page, "dataset-identifier", "sks")
    fill(page, "dataset-class", "dog")
    page.locator("#dataset-repeats input[type=number]").fill("10")
    page.locator("#dataset-create").click()

    message = page.locator("#dataset-message")
    expect(message).to_contain_text("3 copied", timeout=SLOW)
    expect(message).to_contain_text("1 converted to PNG")
    expect(message).to_contain_text("2 caption file(s)")
    expect(message).to_contain_text(re.compile(r"Left out 1 file.*broken\.jpg"))
    concept = project / "img" / "10_sks dog"
    assert sorted(p.name for p in project.iterdir()) == ["img", "log", "model", "reg"]
    assert sorted(p.name for p in concept.iterdir()) == ["old.png", "square.png", "square.txt", "tall.jpg",
                                                         "wide.png", "wide.txt"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.iterdir()} == originals
    expect(page.locator("#dataset-gallery img")).to_have_count(4, timeout=SLOW)
    expect(page.locator("#dataset-concepts")).to_contain_text("img/10_sks dog")
    expect(page.locator("#dataset-overview")).to_contain_text("40 samples per epoch")

    page.locator("#dataset-doctor-run").click()
    findings = page.locator("#dataset-doctor-findings")
    expect(findings).to_contain_text("have no .txt caption file", timeout=SLOW)
    expect(findings).to_contain_text(re.compile(r"old\.png|tall\.jpg"))
    summary = page.locator("#dataset-doctor-summary")
    expect(summary).to_contain_text("4 training images → 40 samples per epoch")
    expect(summary).to_contain_text("steps")
    # Every image is at most 512x512 and a multiple of 64 on each side: with bucket_no_upscale (the default) each
    # keeps its own size, so four buckets, four bars.
    expect(page.locator("#dataset-doctor-buckets .mark-rect path")).to_have_count(4, timeout=SLOW)

    fill(page, "dataset-target", "20")
    page.locator("#dataset-balance").click()
    proposal = page.locator("#dataset-proposal")
    expect(proposal).to_be_visible(timeout=SLOW)
    expect(proposal).to_contain_text("img/10_sks dog")
    expect(page.locator("#dataset-proposal-text")).to_contain_text("1 folder(s) would be renamed")
    screenshot(page, "dataset-tab")
    page.locator("#dataset-apply").click()
    expect(message).to_contain_text("→", timeout=SLOW)
    expect(page.locator("#dataset-concepts")).to_contain_text("img/5_sks dog", timeout=SLOW)
    assert (project / "img" / "5_sks dog" / "wide.png").is_file() and not concept.exists()
    expect(page.locator("#dataset-apply")).to_be_hidden()

    page.locator("#dataset-use").click()
    expect(message).to_contain_text("Sent to the Parameters tab", timeout=SLOW)
    open_tab(page, "Parameters")
    # The form field, not the TOML preview: the preview's editor draws only the lines in view, and [dataset] now
    # sits below the FLUX model fields, so whether its text is in the page depends on layout timing.
    page.locator('[data-tab-id="section-dataset"]').click()  # the Parameters section, not the top-level tab
    data_dir = page.locator("#field-dataset-train_data_dir textarea, #field-dataset-train_data_dir input").first
    expect(data_dir).to_have_value(str(project / "img"), timeout=SLOW)
    page.get_by_role("tab", name="Saving", exact=True).click()
    output_dir = page.locator("#field-saving-output_dir textarea, #field-saving-output_dir input").first
    expect(output_dir).to_have_value(str(project / "model"), timeout=SLOW)

    open_tab(page, "Dataset")
    expect_coloured_bars(page.locator("#dataset-doctor-buckets"))
