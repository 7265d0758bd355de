"""The Tools tab in Chromium: inspect a tiny LoRA and see its base model and ranks, resize it to rank 2 and see the
new file, and run the dataset doctor on a config file and see its findings and steps."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import open_tab
from playwright.sync_api import expect
from safetensors import safe_open
from train_helpers import make_locon_file

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 120_000  # ms: each LoRA tool is an engine process that loads torch


def ranks_in(path: Path) -> Counter:
    with safe_open(str(path), "pt") as handle:
        keys = handle.keys()  # a safe_open handle is not iterable itself
        return Counter(handle.get_slice(key).get_shape()[0] for key in keys if key.endswith(".lora_down.weight"))


def fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(text)


@pytest.fixture
def tools(app_page):
    open_tab(app_page, "Tools")
    return app_page


def test_inspect_then_resize_a_lora(tools, work_dir, tiny_models, screenshot):
    lora = make_locon_file(tiny_models["sd1"], work_dir / "style.safetensors",
                           {"ss_base_model_version": "sd_v1", "ss_output_name": "tiny-style"})
    ranks = ranks_in(lora)
    fill(tools, "tools-inspect-file", str(lora))
    tools.locator("#tools-inspect-run").click()
    summary = tools.locator("#tools-inspect-summary")
    expect(summary).to_contain_text("Base model: sd_v1", timeout=SLOW)
    expect(summary).to_contain_text(f"Modules: {sum(ranks.values())}")
    expect(summary).to_contain_text(", ".join(f"{rank} ({count} modules)" for rank, count in ranks.most_common()))
    expect(summary).to_contain_text("No NaN or inf weights")
    expect(tools.locator("#tools-inspect-metadata")).to_contain_text("tiny-style")
    screenshot(tools, "tools-tab")

    tools.get_by_role("tab", name="Resize", exact=True).click()
    fill(tools, "tools-resize-file", str(lora))
    tools.locator("#tools-resize-value input[type=number]").fill("2")
    tools.locator("#tools-resize-run").click()
    written = work_dir / "style_rank2.safetensors"
    expect(tools.locator("#tools-resize-result")).to_contain_text(f"Wrote {written}", timeout=SLOW)
    expect(tools.locator("#tools-resize-written")).to_contain_text(f"Rank: 2 ({sum(ranks.values())} modules)",
                                                                   timeout=SLOW)
    assert ranks_in(written) == Counter({2: sum(ranks.values())})

    fill(tools, "tools-resize-output", str(lora))  # onto its own input: the engine refuses, the page says why
    tools.locator("#tools-resize-run").click()
    expect(tools.locator("#tools-resize-result")).to_contain_text("is one of the inputs", timeout=SLOW)


def test_doctor_on_a_config_file(tools, work_dir, tiny_models, screenshot):
    concept = work_dir / "img" / "5_toy cat"
    concept.mkdir(parents=True)
    images = sorted(p for p in Path(tiny_models["dataset_img"]).rglob("*") if p.suffix in (".png", ".jpg"))[:2]
    for image in images:
        shutil.copy(image, concept / image.name)
        if image is images[0]:
            shutil.copy(image.with_suffix(".txt"), concept / image.with_suffix(".txt").name)
    config = work_dir / "run.toml"
    config.write_text(f'[model]\npretrained_model_name_or_path = "{tiny_models["sd1_ckpt"]}"\nmodel_family = "sd1"\n'
                      '[dataset]\ntrain_data_dir = "img"\n[dataset.general]\nresolution = 64\n'
                      "min_bucket_reso = 64\nmax_bucket_reso = 128\nbucket_reso_steps = 64\n", encoding="utf-8")
    tools.get_by_role("tab", name="Doctor", exact=True).click()
    fill(tools, "tools-doctor-config", str(config))
    tools.locator("#tools-doctor-run").click()
    summary = tools.locator("#tools-doctor-summary")
    expect(summary).to_contain_text(f"{len(images)} training images → {len(images) * 5} samples per epoch",
                                    timeout=30_000)
    expect(summary).to_contain_text("steps in total")
    findings = tools.locator("#tools-doctor-findings")
    expect(findings).to_contain_text("no .txt caption file")
    expect(findings).to_contain_text(images[1].name)
    screenshot(tools, "tools-doctor")
