"""The Train tab's loss chart in Chromium shows the validation loss beside the training loss: a run folder whose
events are written here (no engine run) gets a third, blue line once its `validation` events arrive while the tab
watches, and the status line and checkpoint list show the newest value and the best file."""

from __future__ import annotations

import json
import re

import pytest
from conftest import open_tab
from playwright.sync_api import expect

from gui.runs import write_record
from gui.views import train as view

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _lines(events: list[dict]) -> str:
    return "".join(json.dumps({"time": 0.0, **event}) + "\n" for event in events)


def test_validation_loss_joins_the_loss_chart_while_the_tab_watches(app_page, app_server, screenshot):
    run_dir = app_server["runs_dir"] / "validated-run"
    run_dir.mkdir()
    write_record(run_dir, {"created_at": 2.0e9, "output_name": "validated-run"})  # the newest run: shown first
    checkpoint = run_dir / "lora-step00000010.safetensors"
    checkpoint.write_bytes(b"x")
    progress = [{"type": "progress", "step": step, "total_steps": 30, "epoch": 1, "num_epochs": 1,
                 "loss": 0.3 + 0.5 / step, "loss_avg": 0.3 + 0.6 / step, "lr": [1e-4]} for step in range(1, 21)]
    events = run_dir / "events.jsonl"
    events.write_text(_lines([{"type": "start", "task": "train", "total_steps": 30, "num_epochs": 1,
                                       "num_validation_images": 2}, *progress]),
                      encoding="utf-8")
    page = app_page
    open_tab(page, "Train")
    # Pick it: a run another test in this worker left running would open first.
    page.locator("#run-picker input").click()
    page.get_by_role("option", name="validated-run", exact=True).click()
    expect(page.locator("#run-picker input")).to_have_value("validated-run")
    chart = page.locator("#loss-chart")
    expect(chart.locator(".mark-line path")).to_have_count(3)  # raw, smoothed and validation (no point yet)
    validation_line = chart.locator(f'.mark-line path[stroke="{view.LOSS_COLORS["validation"]}"]')
    expect(validation_line).to_have_count(1)
    assert "L" not in (validation_line.get_attribute("d") or "")  # nothing drawn: no segment

    passes = [{"type": "validation", "step": step, "epoch": 1, "loss": loss, "by_timestep": {"200": loss},
               "images": 2, "batches": 1, "best": str(checkpoint)} for step, loss in ((10, 0.52), (20, 0.47))]
    passes[0]["checkpoint"] = str(checkpoint)
    with events.open("a", encoding="utf-8") as stream:  # the run goes on: two passes and the checkpoint
        stream.write(_lines([passes[0], {"type": "checkpoint", "kind": "step", "path": str(checkpoint), "step": 10,
                                         "epoch": 1}, passes[1]]))
    expect(validation_line).to_have_attribute("d", re.compile(r"^M[^L]+L"))  # a segment from step 10 to 20
    expect(chart).to_contain_text("validation")  # the legend names the series
    expect(page.locator("#run-status")).to_contain_text("validation 0.4700")
    expect(page.locator("#run-checkpoints")).to_contain_text("lowest validation loss")
    screenshot(page, "train-validation-loss")
