"""The Parameters form keeps what it is given, clicked through in Chromium: an imported dataset TOML keeps the rest
of the form and its datasets, "Use in Parameters" works on every press, and a preset asks before it clears what
another tab set."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import fill, open_section, open_tab
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "import"
WAIT = 30_000
REG_DIR = "#field-dataset-reg_data_dir textarea, #field-dataset-reg_data_dir input"
# The whole preview text (the page draws the TOML preview whole, as a code block).
PREVIEW_JS = "document.querySelector('#toml-preview pre code, #toml-preview pre').textContent"


def preview_has(page, text: str) -> None:
    """Wait until the TOML preview holds `text` anywhere in it."""
    for _ in range(WAIT // 250):
        if text in page.evaluate(PREVIEW_JS):
            return
        page.wait_for_timeout(250)
    assert text in page.evaluate(PREVIEW_JS)


def test_importing_a_dataset_toml_keeps_the_model_and_the_datasets(page, work_dir):
    fill(page, "field-model-pretrained_model_name_or_path", "/models/my-base.safetensors")
    preview = page.locator("#toml-preview")
    expect(preview).to_contain_text("my-base.safetensors", timeout=WAIT)
    source = work_dir / "dataset_captions.toml"
    shutil.copy(FIXTURES / "dataset_captions.toml", source)
    fill(page, "params-file", str(source))
    page.locator("#params-import").click()
    expect(page.locator("#preset-message")).to_contain_text("Imported", timeout=WAIT)
    preview_has(page, "[[dataset.datasets.subsets]]")
    preview_has(page, 'image_dir = "C:\\\\fuga"')
    expect(preview).to_contain_text("my-base.safetensors")  # the base model was not reset
    # editing another field keeps the datasets: the form rebuilds the config from every value it holds
    open_section(page, "Network")
    fill(page, "field-network-network_dim", "12")
    expect(preview).to_contain_text("network_dim = 12", timeout=WAIT)
    preview_has(page, "[[dataset.datasets.subsets]]")


def use_regularization_folder(page, folder: Path) -> None:
    open_tab(page, "Regularization")
    fill(page, "reg-parent", str(folder))
    page.locator("#reg-apply").click()
    expect(page.locator("#reg-message")).to_contain_text("now trains with", timeout=WAIT)


def test_use_in_parameters_works_on_every_press(app_page, work_dir):
    page = app_page
    reg = work_dir / "reg"
    reg.mkdir()
    use_regularization_folder(page, reg)
    open_tab(page, "Parameters")
    open_section(page, "Dataset")
    box = page.locator(REG_DIR).first
    expect(box).to_have_value(str(reg), timeout=WAIT)
    fill(page, "field-dataset-reg_data_dir", str(work_dir))  # the user types something else
    expect(box).to_have_value(str(work_dir))
    use_regularization_folder(page, reg)  # the same folder again: a second press sets it again
    open_tab(page, "Parameters")
    expect(box).to_have_value(str(reg), timeout=WAIT)


def choose_preset(page, title: str) -> None:
    page.locator("#preset-choice input").click()
    page.get_by_role("option", name=title, exact=True).click()


def test_a_preset_asks_before_clearing_what_another_tab_set(app_page, work_dir):
    page = app_page
    reg = work_dir / "reg"
    reg.mkdir()
    use_regularization_folder(page, reg)
    open_tab(page, "Parameters")
    open_section(page, "Dataset")
    box = page.locator(REG_DIR).first
    expect(box).to_have_value(str(reg), timeout=WAIT)

    choose_preset(page, "SDXL LoRA")
    confirm = page.locator("#preset-confirm")
    expect(confirm).to_be_visible(timeout=WAIT)
    expect(confirm).to_contain_text("dataset.reg_data_dir")
    expect(box).to_have_value(str(reg))  # nothing applied yet
    page.locator("#preset-confirm-cancel").click()
    expect(confirm).to_be_hidden(timeout=WAIT)
    expect(page.locator("#preset-message")).to_contain_text("not applied")

    choose_preset(page, "SD1.5 LoRA: 8 GB of VRAM")
    expect(confirm).to_be_visible(timeout=WAIT)
    page.locator("#preset-confirm-keep").click()
    expect(confirm).to_be_hidden(timeout=WAIT)
    preview_has(page, f'reg_data_dir = "{reg}"')

    choose_preset(page, "SDXL LoRA")
    expect(confirm).to_be_visible(timeout=WAIT)
    page.locator("#preset-confirm-apply").click()
    expect(confirm).to_be_hidden(timeout=WAIT)
    expect(box).to_have_value("", timeout=WAIT)
    expect(page.locator("#toml-preview")).to_contain_text('model_family = "sdxl"', timeout=WAIT)


def test_valid_means_ready_every_missing_thing_is_listed_at_once(page, work_dir):
    from PIL import Image

    status = page.locator("#validation-status")
    fill(page, "field-model-pretrained_model_name_or_path", str(work_dir / "base.safetensors"))
    open_section(page, "Dataset")
    fill(page, "field-dataset-train_data_dir", str(work_dir / "img"))
    expect(status).to_contain_text("Not ready to train: 2 problem(s)", timeout=WAIT)
    for named in ("model.pretrained_model_name_or_path", "dataset.train_data_dir", "does not exist"):
        expect(status).to_contain_text(named)

    (work_dir / "base.safetensors").write_bytes(b"x")
    concept = work_dir / "img" / "10_dog"
    concept.mkdir(parents=True)
    fill(page, "field-dataset-train_data_dir", str(work_dir / "img") + "/")
    expect(status).to_contain_text("Not ready to train: 1 problem(s)", timeout=WAIT)
    expect(status).to_contain_text("no images")  # the folder is there, the images are not
    Image.new("RGB", (8, 8)).save(concept / "a.png")
    fill(page, "field-dataset-train_data_dir", str(work_dir / "img"))
    expect(status).to_contain_text("Valid.", timeout=WAIT)


def preview_text(page) -> str:
    return page.evaluate(PREVIEW_JS)


def test_optional_numbers_stay_unset_when_other_fields_are_edited(page):
    open_section(page, "Network")
    fill(page, "field-network-network_dim", "12")
    expect(page.locator("#toml-preview")).to_contain_text("network_dim = 12", timeout=WAIT)
    preview_has(page, "[dataset.general]")
    text = preview_text(page)
    for name in ("validation_seed", "t5xxl_max_token_length", "unet_lr", "text_encoder_lr", "caption_prefix",
                 "face_crop_aug_range", "resize_interpolation", "secondary_separator"):
        assert f"\n{name} =" not in text, name
    choose_preset(page, "SDXL LoRA")
    expect(page.locator("#toml-preview")).to_contain_text('model_family = "sdxl"', timeout=WAIT)
    open_section(page, "Training")
    fill(page, "field-training-seed", "5")
    preview_has(page, "\nseed = 5")
    assert "\nvalidation_seed =" not in preview_text(page)


def test_a_value_typed_while_a_load_is_on_its_way_is_kept(page, work_dir):
    """The page sends a Load, and the server gets it only after the user has typed into another field (the browser
    holds the request back: deterministically, what a loaded server does). The box keeps what was typed, and so
    must the config: last session a typed tokenizer folder was lost so (the handler that started earlier finished
    later, with the form of before the typing)."""
    source = work_dir / "rank12.toml"
    source.write_text("[network]\nnetwork_dim = 12\n", encoding="utf-8")
    fill(page, "params-file", str(source))
    held = []

    def hold_the_first(route) -> None:
        # Only the Load (it sends the file's path with the whole form): under load, the path field's own completion
        # requests from the fill above (one to three values) can still be on their way and must pass.
        values = json.loads(route.request.post_data or "{}").get("data") or []
        if held or str(source) not in values or len(values) < 10:
            route.continue_()
        else:
            held.append(route)

    page.route("**/queue/join**", hold_the_first)
    page.locator("#params-load").click()
    open_section(page, "Saving")
    fill(page, "field-saving-output_name", "typed-meanwhile")
    preview_has(page, 'output_name = "typed-meanwhile"')
    assert len(held) == 1 and str(source) in held[0].request.post_data  # the Load, still in the browser
    held[0].continue_()
    # the Load's own answer (the first preview with its value) already holds the value typed meanwhile
    page.wait_for_function("document.querySelector('#toml-preview').innerText.includes('network_dim = 12')",
                           timeout=WAIT, polling=50)
    assert 'output_name = "typed-meanwhile"' in preview_text(page)
    expect(page.locator("#preset-message")).to_contain_text("Loaded", timeout=WAIT)
    expect(page.locator("#field-saving-output_name textarea, #field-saving-output_name input").first
           ).to_have_value("typed-meanwhile")
