"""The Regularization tab in Chromium with a FLUX.1 dev model set up in the Parameters tab: the class images are
generated with the configured CLIP-L, T5 and AE files and the T5 tokenizer folder."""

from __future__ import annotations

import os

import pytest
from conftest import fill, open_tab
from PIL import Image
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
WAIT = 30_000  # ms: a preset fill re-renders hundreds of widgets
SLOW = 300_000  # ms: the engine process imports torch and loads the model on a shared CPU


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict:
    """The tiny FLUX.1 dev files, in a folder the app may use (its --allow-path roots)."""
    from flux_tiny import tiny_flux_files, write_tiny_flux

    if os.environ.get("ATELIER_TINY_MODELS"):  # beside the tiny SD models the app allows
        return tiny_flux_files("dev")
    return write_tiny_flux(tmp_path_factory.mktemp("flux_dev"), "dev")


def test_class_images_from_the_configured_flux_model(app_page, flux_files, work_dir, screenshot):
    page = app_page
    open_tab(page, "Parameters")
    page.locator("#preset-choice input").click()
    page.get_by_role("option", name="FLUX.1 dev LoRA 24 GB", exact=True).click()
    page.locator('button[role=tab][data-tab-id="section-model"]').click()
    expect(page.locator("#field-model-model_family input")).to_have_value("flux1", timeout=WAIT)
    for name, elem_id in (("model", "pretrained_model_name_or_path"), ("clip_l", "clip_l"), ("t5xxl", "t5xxl"),
                          ("ae", "ae")):
        fill(page, f"field-model-{elem_id}", str(flux_files[name]))
    page.locator("#advanced-model").get_by_role("button").first.click()
    fill(page, "field-model-tokenizer_cache_dir", str(flux_files["t5_tokenizer"]))
    expect(page.locator("#toml-preview")).to_contain_text(f'tokenizer_cache_dir = "{flux_files["t5_tokenizer"]}"',
                                                          timeout=WAIT)

    open_tab(page, "Regularization")
    # the empty model field takes the Parameters tab's model, which brings its component files along
    expect(page.locator("#reg-model textarea, #reg-model input").first).to_have_value(str(flux_files["model"]),
                                                                                     timeout=WAIT)
    folder = work_dir / "reg" / "1_dog"
    fill(page, "reg-folder", str(folder))
    fill(page, "reg-gen-prompt", "a photo of a dog")
    for elem_id, value in (("reg-gen-count", "1"), ("reg-gen-steps", "2"), ("reg-gen-width", "64"),
                           ("reg-gen-height", "64"), ("reg-gen-seed", "3")):
        fill(page, elem_id, value)
    page.locator("#reg-generate").click()
    expect(page.locator("#reg-gen-progress")).to_contain_text("Done: wrote 1 image(s)", timeout=SLOW)
    expect(page.locator("#reg-gallery img")).to_have_count(1)
    assert sorted(path.name for path in folder.iterdir()) == ["0001.png", "0001.txt"]
    assert Image.open(folder / "0001.png").size == (64, 64)
    screenshot(page, "regularization-flux")
