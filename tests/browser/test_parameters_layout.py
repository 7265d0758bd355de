"""The Parameters page at 1400 px wide: every section's tab is shown (none hidden in Gradio's overflow menu), and
the preview does not stand beside the form as a page-tall column."""

import pytest
from conftest import open_section
from playwright.sync_api import expect

from engine.config.schema import SECTIONS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def section_tab(page, section: str):
    return page.locator(f'button[role=tab][data-tab-id="section-{section}"]')


def test_every_section_is_reachable_at_1400_px(page, screenshot):
    assert page.viewport_size["width"] == 1400
    for section in SECTIONS:
        expect(section_tab(page, section)).to_be_visible()
    open_section(page, "Launch")  # the last one, clicked as a user does
    expect(page.locator("#field-launch-num_processes")).to_be_visible()
    screenshot(page, "parameters-layout-1400")


def test_the_preview_is_below_the_form_not_a_column_beside_it(page):
    tabs = page.locator('button[role=tab][data-tab-id="section-model"]').bounding_box()
    form = page.locator("#parameters-form").bounding_box()
    preview = page.locator("#toml-preview").bounding_box()
    assert preview["y"] >= form["y"] + form["height"] - 1  # below the form, so no empty column stands beside it
    assert form["width"] > 0.9 * page.viewport_size["width"] - 100  # the form has the page's width
    assert tabs["y"] < preview["y"]


def test_the_app_tabs_keep_their_names_once_parameters_is_open(page):
    app_tabs = page.locator("[role=tablist]").first.locator("button[role=tab]")
    expect(app_tabs).to_have_text(["Dataset", "Captioning", "Regularization", "Parameters", "Train", "Compare",
                                   "Tools"])
    app_tabs.filter(has_text="Train").click()
    expect(page.locator("#train-start")).to_be_visible()
