"""The Train tab's memory line in Chromium (issue 16): a run folder whose events carry the start event's memory plan
and progress events' measured peaks (written here, no engine run) shows the peak beside the plan and the card, marked
when the peak is over the plan; a CPU run shows its RAM peak alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import open_tab
from playwright.sync_api import expect

from gui.runs import write_record

pytestmark = [pytest.mark.browser, pytest.mark.slow]
GIB = 2**30
PLAN = {"gpu_peak_bytes": round(6.4 * GIB), "gpu_needed_bytes": round(7.1 * GIB),
        "gpu_capacity_bytes": round(139.8 * GIB), "fits": True}


def fake_run(runs_dir: Path, name: str, events: list[dict]) -> None:
    """A finished run as the engine leaves it, oldest of the runs folder (the tab opens on the newest)."""
    run_dir = runs_dir / name
    run_dir.mkdir()
    write_record(run_dir, {"created_at": 1.0, "output_name": name})
    start = {"type": "start", "task": "train", "total_steps": 2, "num_epochs": 1}
    done = {"type": "done", "ok": True, "global_step": 2, "summary": "trained 2 steps"}
    lines = [start | events[0], *({"type": "progress", "step": step, "total_steps": 2, "epoch": 1, "loss": 0.5}
                                  | figures for step, figures in enumerate(events[1:], start=1)), done]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def show(page, name: str) -> None:
    page.locator("#run-picker input").click()
    page.get_by_role("option", name=name, exact=True).click()
    expect(page.locator("#run-status")).to_contain_text(name, timeout=10_000)


def test_the_measured_peak_shows_beside_the_plan_and_is_marked_over_it(app_page, app_server, screenshot):
    runs_dir = app_server["runs_dir"]
    fake_run(runs_dir, "memory-gpu-within", [{"memory_plan": PLAN}, {"gpu_peak_mib": 6.5 * 1024,
                                                                     "gpu_reserved_mib": 7000.0}])
    fake_run(runs_dir, "memory-gpu-over", [{"memory_plan": PLAN}, {"gpu_peak_mib": 6.0 * 1024},
                                           {"gpu_peak_mib": 7.2 * 1024}])
    fake_run(runs_dir, "memory-cpu", [{"memory_plan": None}, {"rss_peak_mib": 1228.8}])
    page = app_page
    open_tab(page, "Train")
    memory = page.locator("#run-memory")

    show(page, "memory-gpu-within")
    expect(memory).to_have_text("GPU memory: peak 6.5 GiB (plan 6.4 GiB, card 139.8 GiB)", timeout=10_000)
    show(page, "memory-gpu-over")
    expect(memory).to_contain_text("GPU memory: peak 7.2 GiB (plan 6.4 GiB, card 139.8 GiB)", timeout=10_000)
    expect(memory).to_contain_text(re.compile(r"⚠\s*the peak is 12% above the plan"))
    screenshot(page, "train_memory_over_plan")
    show(page, "memory-cpu")
    expect(memory).to_have_text("RAM peak 1.2 GiB", timeout=10_000)
