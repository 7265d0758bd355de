"""The Compare tab in Chromium: pick a run with two saved LoCon checkpoints (one measured best), render its grid with
the tiny SD1 model, watch the cells fill in, open one full size with its settings, and find the grid saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import fill, open_tab
from playwright.sync_api import expect
from train_helpers import make_locon_file, write_config

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 300_000  # ms: the engine process imports torch and loads the model on a shared CPU


def fabricated_run(runs_dir: Path, tiny_models: dict) -> Path:
    """A run folder as the Train tab leaves one: its config, two epoch saves (LoCon files on the tiny SD1 model),
    their `checkpoint` events and a validation loss for each."""
    run = runs_dir / "compare-run"
    run.mkdir()
    write_config(run / "config.toml", tiny_models, "sd1",
                 network={"network_dim": 4, "network_alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
                 sampling={"sample_prompts": ["a red square --w 64 --h 64 --s 2 --d 5"]})
    out = run / "out"
    out.mkdir()
    events = []
    for epoch, loss in ((1, 0.4), (2, 0.3)):
        path = make_locon_file(tiny_models["sd1"], out / f"lora-{epoch:06d}.safetensors", {}, seed=epoch)
        events.append({"type": "checkpoint", "kind": "epoch", "epoch": epoch, "step": epoch * 4, "path": str(path)})
        events.append({"type": "validation", "epoch": epoch, "step": epoch * 4, "loss": loss, "checkpoint": str(path)})
    (run / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"created_at": 1e12, "output_dir": str(out)}), encoding="utf-8")
    return run


def test_a_grid_fills_in_and_a_cell_opens_full_size(app_page, app_server, tiny_models, screenshot):
    page = app_page
    run = fabricated_run(app_server["runs_dir"], tiny_models)
    open_tab(page, "Compare")
    page.locator("#compare-run input").click()
    page.get_by_role("option", name="compare-run", exact=True).click()
    checkpoints = page.locator("#compare-checkpoints")
    expect(checkpoints).to_contain_text("lora-000001 (epoch 1, val loss 0.4)")
    expect(checkpoints).to_contain_text("lora-000002 (epoch 2, val loss 0.3, best)")
    expect(page.locator("#compare-prompts textarea")).to_have_value("a red square --w 64 --h 64 --s 2 --d 5")
    fill(page, "compare-strengths", "0,1")

    page.locator("#compare-render").click()
    expect(page.locator("#compare-progress")).to_contain_text("Done: 4 cells", timeout=SLOW)
    gallery = page.locator("#compare-gallery")
    expect(gallery.locator("img")).to_have_count(4)
    expect(gallery).not_to_contain_text("…")  # no pending cell left
    heads = page.locator("#compare-heads")
    expect(heads).to_contain_text("lora-000002 (val loss 0.3, best)")
    expect(heads).to_contain_text("base model, seed 5")

    gallery.locator("img").nth(3).click()  # row 2 (strength 1), column 2 (epoch 2)
    settings = page.locator("#compare-cell-settings")
    expect(settings).to_contain_text("lora-000002 · strength 1 · seed 5")
    expect(settings).to_contain_text("64×64, 2 steps")
    expect(page.locator("#compare-cell-image img")).to_be_visible()
    expect(page.locator("#compare-grid img")).to_be_visible()
    expect(page.locator("#compare-save")).to_be_visible()
    screenshot(page, "compare-tab")

    folders = [folder for folder in (run / "compare").iterdir() if folder.is_dir()]
    assert len(folders) == 1 and (folders[0] / "grid_p01.png").is_file()
    index = json.loads((folders[0] / "index.json").read_text(encoding="utf-8"))
    assert [entry["best"] for entry in index["checkpoints"]] == [False, True]
