"""FLUX.1 in Chromium: a family shows only its own fields (CLIP-L / T5 / AE files with the file browser and the flow
section for FLUX, clip_skip and the SD noise options for SD); the doctor refuses a missing AE file before any GPU
time, naming the field; then the FLUX.1 dev preset pointed at the tiny model files trains a LoRA to the end."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import choose, field, fill, open_advanced, open_section, open_tab, set_number
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
WAIT = 30_000  # ms: a preset fill re-renders hundreds of widgets
SLOW = 400_000  # ms: the engine loads torch, the tiny FLUX files and caches latents and T5 outputs on a CPU
STEPS = 4
FLUX_PRESET = "FLUX.1 dev LoRA 24 GB"


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict:
    """The tiny FLUX.1 dev files, in a folder the app may browse (its --allow-path roots)."""
    from flux_tiny import tiny_flux_files, write_tiny_flux

    if os.environ.get("ATELIER_TINY_MODELS"):  # kept between sessions, beside the tiny SD models the app allows
        return tiny_flux_files("dev")
    return write_tiny_flux(tmp_path_factory.mktemp("flux_dev"), "dev")





def choose_preset(page, title: str, family: str) -> None:
    page.locator("#preset-choice input").click()
    page.get_by_role("option", name=title, exact=True).click()
    open_section(page, "Model")
    expect(page.locator("#field-model-model_family input")).to_have_value(family, timeout=WAIT)
    expect(page.locator("#toml-preview")).to_contain_text(f'model_family = "{family}"', timeout=WAIT)




def test_a_family_shows_only_its_own_fields(page, screenshot):
    choose_preset(page, "SDXL LoRA", "sdxl")
    for path in ("model.clip_l", "model.t5xxl", "model.ae", "model.fp8_base"):
        expect(field(page, path)).to_be_hidden(timeout=WAIT)
    expect(field(page, "model.clip_skip")).to_be_visible()
    expect(field(page, "model.v_parameterization")).to_be_visible()
    open_section(page, "Flow")
    expect(page.locator("#unused-flow")).to_contain_text("Only FLUX.1, Chroma and SD3 / SD3.5 models use these")
    expect(field(page, "flow.timestep_sampling")).to_be_hidden()
    expect(page.locator("#advanced-flow")).to_be_hidden()

    choose_preset(page, FLUX_PRESET, "flux1")
    for path in ("model.clip_l", "model.t5xxl", "model.ae"):
        expect(field(page, path)).to_be_visible(timeout=WAIT)
        expect(page.locator(f"#field-{path.replace('.', '-')}-browse")).to_be_visible()  # the file browser
    for path in ("model.clip_skip", "model.v_parameterization"):
        expect(field(page, path)).to_be_hidden()
    open_advanced(page, "model")
    expect(field(page, "model.tokenizer_cache_dir")).to_be_visible()
    expect(field(page, "model.vae")).to_be_hidden()
    open_section(page, "Training")
    expect(field(page, "training.blocks_to_swap")).to_be_visible()
    open_advanced(page, "training")
    expect(field(page, "training.noise_offset")).to_be_hidden()
    expect(field(page, "training.min_snr_gamma")).to_be_hidden()
    open_section(page, "Flow")
    expect(page.locator("#field-flow-timestep_sampling input")).to_have_value("flux_shift")
    expect(page.locator("#unused-flow")).to_be_hidden()
    expect(page.locator("#advanced-flow")).to_be_visible()
    screenshot(page, "parameters-flux-preset")

    choose_preset(page, "Chroma LoRA", "chroma")
    expect(field(page, "model.clip_l")).to_be_hidden(timeout=WAIT)  # Chroma has no CLIP-L
    expect(field(page, "model.t5xxl")).to_be_visible()
    expect(page.locator("#validation-status")).to_contain_text("Not ready to train", timeout=WAIT)  # no model


def set_up_flux(page, flux_files, dataset, ae: str) -> None:
    """The FLUX.1 dev 24 GB preset pointed at the tiny files, sized for a CPU: 64 px, buckets of 16, 4 steps, fp8
    and mixed precision off, plain AdamW (8-bit AdamW needs a GPU)."""
    choose_preset(page, FLUX_PRESET, "flux1")
    fill(page, "field-model-pretrained_model_name_or_path", str(flux_files["model"]))
    fill(page, "field-model-clip_l", str(flux_files["clip_l"]))
    fill(page, "field-model-t5xxl", str(flux_files["t5xxl"]))
    fill(page, "field-model-ae", ae)
    page.locator("#field-model-fp8_base input[type=checkbox]").uncheck()
    open_advanced(page, "model")
    fill(page, "field-model-tokenizer_cache_dir", str(flux_files["t5_tokenizer"]))
    # The server has the value before the next section opens (once, under load, the run got an empty one).
    expect(page.locator("#toml-preview")).to_contain_text(
        f'tokenizer_cache_dir = "{flux_files["t5_tokenizer"]}"', timeout=WAIT)
    open_section(page, "Dataset")
    fill(page, "field-dataset-train_data_dir", str(dataset))
    fill(page, "field-dataset-general-resolution", "64")
    open_advanced(page, "dataset")
    set_number(page, "dataset.general.min_bucket_reso", 64)
    set_number(page, "dataset.general.max_bucket_reso", 128)
    set_number(page, "dataset.general.bucket_reso_steps", 16)
    open_section(page, "Optimizer")
    fill(page, "field-optimizer-optimizer_type", "AdamW")
    open_section(page, "Training")
    set_number(page, "training.max_train_epochs", 0)
    set_number(page, "training.max_train_steps", STEPS)
    set_number(page, "training.blocks_to_swap", 0)
    choose(page, "training.mixed_precision", "no")
    expect(page.locator("#field-training-cache_latents input[type=checkbox]")).to_be_checked()
    preview = page.locator("#toml-preview")
    expect(preview).to_contain_text(f"max_train_steps = {STEPS}", timeout=WAIT)
    expect(preview).to_contain_text('mixed_precision = "no"', timeout=WAIT)
    # "Valid." means ready: a missing autoencoder is named in the status before Start
    expect(page.locator("#validation-status")).to_contain_text("Valid." if Path(ae).is_file() else "model.ae",
                                                               timeout=WAIT)


def test_flux_preset_refuses_a_missing_ae_then_trains_a_lora(app_page, flux_files, tiny_models, work_dir,
                                                              screenshot):
    page = app_page
    page.set_default_timeout(90_000)
    open_tab(page, "Parameters")
    missing = work_dir / "ae.safetensors"
    # A private copy: the preset caches latents beside the images, which must not land in the shared tiny dataset.
    dataset = shutil.copytree(tiny_models["dataset_img"], work_dir / "img", ignore=shutil.ignore_patterns("*.npz"))
    set_up_flux(page, flux_files, dataset, str(missing))
    open_tab(page, "Train")
    page.locator("#train-start").click()
    message = page.locator("#train-message")
    expect(message).to_contain_text("Not started", timeout=WAIT)
    expect(message).to_contain_text("model.ae: no such file")
    expect(message).to_contain_text(str(missing))
    expect(message).to_contain_text("ae.safetensors")  # what to do: point it at the FLUX autoencoder
    screenshot(page, "flux-start-refused-missing-ae")

    open_tab(page, "Parameters")
    open_section(page, "Model")
    fill(page, "field-model-ae", f"{flux_files['ae'].parent}/")  # then pick the file in the browser
    page.locator("#field-model-ae-browse").click()
    page.locator("#field-model-ae-entries").get_by_text("ae.safetensors", exact=True).click()
    expect(page.locator("#field-model-ae input, #field-model-ae textarea").first).to_have_value(
        str(flux_files["ae"]), timeout=WAIT)
    expect(page.locator("#toml-preview")).to_contain_text(f'ae = "{flux_files["ae"]}"', timeout=WAIT)
    expect(page.locator("#validation-status")).to_contain_text("Valid.", timeout=WAIT)

    open_tab(page, "Train")
    page.locator("#train-name textarea, #train-name input").first.fill("flux-gui")
    page.locator("#train-start").click()
    expect(message).to_contain_text("Started", timeout=WAIT)
    status = page.locator("#run-status")
    # This run's status, not the last one an earlier test left in the live view of the shared app
    expect(status).to_contain_text("flux-gui", timeout=SLOW)
    expect(status).to_contain_text(re.compile("running|finished|failed"), timeout=SLOW)
    expect(status).to_contain_text(re.compile(f"step [1-9]\\d*/{STEPS}|finished|failed"), timeout=SLOW)
    expect(status).to_contain_text(re.compile("finished|failed"), timeout=SLOW)
    screenshot(page, "flux-trained")
    expect(page.locator("#run-error")).to_be_hidden()
    expect(status).to_contain_text("finished")
    expect(status).to_contain_text(f"step {STEPS}/{STEPS}")
    expect(page.locator("#run-checkpoints")).to_contain_text("safetensors", timeout=WAIT)
