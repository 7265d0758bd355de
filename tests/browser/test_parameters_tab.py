"""The Parameters tab, clicked through in Chromium: validation errors appear and clear, presets load and save."""

import json
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "import"


def number_input(page, path: str):
    return page.locator(f"#field-{path.replace('.', '-')} input[type=number]")


def open_section(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def test_a_bad_combination_is_named_and_clears_when_fixed(page, screenshot):
    status = page.locator("#validation-status")
    expect(status).to_contain_text("Not ready to train")  # no base model, no images yet
    open_section(page, "Network")
    alpha = number_input(page, "network.network_alpha")
    alpha.fill("64")
    alpha.press("Tab")
    expect(status).to_contain_text("network.network_alpha", timeout=15000)
    expect(status).to_contain_text("use at most network_dim")
    screenshot(page, "parameters-validation-error")
    alpha.fill("4")
    alpha.press("Tab")
    expect(status).to_contain_text("Not ready to train", timeout=15000)
    expect(status).not_to_contain_text("network.network_alpha")


def test_preview_shows_the_toml_that_will_be_written(page):
    open_section(page, "Training")
    seed = number_input(page, "training.seed")
    seed.fill("1234")
    seed.press("Tab")
    expect(page.locator("#toml-preview")).to_contain_text("seed = 1234", timeout=15000)


def test_choosing_a_preset_fills_the_form(page, screenshot):
    page.locator("#preset-choice input").click()
    page.get_by_role("option", name="SDXL LoRA").click()
    open_section(page, "Model")
    expect(page.locator("#field-model-model_family input")).to_have_value("sdxl", timeout=15000)
    expect(page.locator("#toml-preview")).to_contain_text('model_family = "sdxl"', timeout=15000)
    expect(page.locator("#validation-status")).to_contain_text("Not ready to train")  # the preset names no model
    screenshot(page, "parameters-sdxl-preset")


def test_saving_a_preset_writes_only_the_changes(page, app_server):
    open_section(page, "Network")
    dim = number_input(page, "network.network_dim")
    dim.fill("24")
    dim.press("Tab")
    expect(page.locator("#toml-preview")).to_contain_text("network_dim = 24", timeout=15000)
    page.locator("#preset-title textarea, #preset-title input").first.fill("My rank 24")
    page.locator("#preset-save").click()
    expect(page.locator("#preset-message")).to_contain_text("Saved", timeout=15000)
    saved = json.loads((app_server["presets_dir"] / "my-rank-24.json").read_text())
    assert saved["config"] == {"network": {"network_dim": 24}}
    page.locator("#preset-save").click()
    expect(page.locator("#preset-message")).to_contain_text(re.compile("already exists"), timeout=15000)


def test_warnings_show_without_blocking(page):
    open_section(page, "Optimizer")
    page.locator("#field-optimizer-optimizer_type textarea, #field-optimizer-optimizer_type input").first.fill(
        "Prodigy")
    page.keyboard.press("Tab")
    status = page.locator("#validation-status")
    expect(status).to_contain_text("Not ready to train", timeout=15000)  # no base model yet; warnings show too
    expect(status).to_contain_text("warning: optimizer.learning_rate", timeout=15000)


def test_importing_a_kohya_json_fills_the_form_and_lists_what_was_not_imported(page, work_dir, screenshot):
    source = work_dir / "kohya_lora_sdxl.json"
    shutil.copy(FIXTURES / "kohya_lora_sdxl.json", source)
    page.locator("#params-file textarea, #params-file input").first.fill(str(source))
    page.locator("#params-import").click()
    message = page.locator("#preset-message")
    expect(message).to_contain_text("Imported kohya_lora_sdxl.json", timeout=60000)
    expect(message).to_contain_text("Not imported (3)")
    expect(message).to_contain_text("fp8_base")
    expect(message).to_contain_text("--lowram")
    open_section(page, "Model")
    expect(page.locator("#field-model-model_family input")).to_have_value("sdxl", timeout=15000)
    screenshot(page, "parameters-import-kohya")


def test_loading_a_saved_config_fills_the_form(page, work_dir):
    config = work_dir / "my-run.toml"
    config.write_text('[network]\nnetwork_dim = 12\nnetwork_alpha = 6.0\n[training]\nseed = 777\n', encoding="utf-8")
    page.locator("#params-file textarea, #params-file input").first.fill(str(config))
    page.locator("#params-load").click()
    expect(page.locator("#preset-message")).to_contain_text("Loaded", timeout=60000)
    preview = page.locator("#toml-preview")
    expect(preview).to_contain_text("network_dim = 12", timeout=90000)  # revalidation after a whole-form fill
    open_section(page, "Training")
    expect(number_input(page, "training.seed")).to_have_value("777")
    page.locator("#params-file textarea, #params-file input").first.fill(str(work_dir / "missing.toml"))
    page.locator("#params-load").click()
    expect(page.locator("#preset-message")).to_contain_text("missing.toml", timeout=15000)
    expect(page.locator("#preset-message")).to_contain_text("file not found")
