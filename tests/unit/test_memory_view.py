"""The Parameters tab's Memory section: the plan's JSON read into the bar and the breakdown, the fit's changes into
a list and into form values to apply and to undo, and the plan's command line (gui/views/memory.py,
gui/memory_plan.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.config.io import deep_merge, default_config_dict
from gui import engine_json
from gui.browse import FileRoots
from gui.memory_plan import PlanFailed, plan_arguments, plan_report, report_from
from gui.state import to_widget
from gui.views.memory import (
    GIB,
    applied_markdown,
    change_values,
    fit_markdown,
    plan_bar_html,
    plan_markdown,
    previous_values,
    undone_markdown,
)
from gui.views.parameters import editable_fields

MIB = 1024**2


def plan(capacity: int | None = 12 * GIB, needed: int = 6 * GIB, fits: bool | None = True) -> dict:
    """A plan as `python -m engine plan --json` prints it."""
    return {"family": "sdxl", "gpu_peak_bytes": needed - 512 * MIB, "gpu_needed_bytes": needed,
            "host_bytes": 3 * GIB, "gpu_capacity_bytes": capacity, "fits": fits, "batch_size": 2,
            "resolution": [1024, 768], "architecture_from": "the checkpoint's header",
            "items": [{"name": "denoiser weights (frozen)", "bytes": 5 * GIB, "where": "gpu", "detail": "float16"},
                      {"name": "VAE", "bytes": GIB // 4, "where": "host", "detail": "latents cached"}],
            "notes": ["the text encoders' outputs are cached"]}


CHANGES = [
    {"key": "training.gradient_checkpointing", "value": True, "reason": "recomputes activations",
     "gpu_needed_bytes": 10 * GIB},
    {"key": "dataset.general.batch_size", "value": 1, "reason": "half the activations", "gpu_needed_bytes": 9 * GIB},
    {"key": "training.gradient_accumulation_steps", "value": 2, "reason": "the same effective batch",
     "gpu_needed_bytes": 9 * GIB},
]


def test_a_plan_that_fits_shows_a_partly_filled_bar_and_the_breakdown():
    bar = plan_bar_html(plan())
    assert 'data-state="fits"' in bar and "width:50.0%" in bar and "<img" not in bar
    assert "It fits: needs 6.00 GiB of the card&#x27;s 12.00 GiB." in bar
    text = plan_markdown(plan())
    assert "sdxl, batch 2 at 1024x768; architecture from the checkpoint's header." in text
    assert "with the CUDA context and the allocator's slack 6.00 GiB; system RAM 3.00 GiB" in text
    assert "| denoiser weights (frozen) | 5.000 | GPU | float16 |" in text
    assert "| VAE | 0.250 | system RAM | latents cached |" in text
    assert "- note: the text encoders' outputs are cached" in text
    assert "does not fit" not in text + bar


def test_a_plan_over_the_card_is_marked_does_not_fit_and_fills_the_bar():
    over = plan(capacity=4 * GIB, needed=6 * GIB, fits=False)
    bar = plan_bar_html(over)
    assert 'data-state="over"' in bar and "width:100.0%" in bar and "does not fit" in bar
    assert "<strong>It does not fit: needs 6.00 GiB, the card has 4.00 GiB.</strong>" in bar


def test_without_a_gpu_the_plan_asks_for_the_card_size():
    unknown = plan(capacity=None, fits=None)
    assert 'data-state="unknown"' in plan_bar_html(unknown)
    assert "no GPU detected: type the card&#x27;s size in GPU memory" in plan_bar_html(unknown)
    assert "does not fit" not in plan_bar_html(unknown)


def test_the_changes_are_listed_in_order_with_the_memory_after_each():
    text = fit_markdown({"fits": True, "changes": CHANGES, "plan": plan()})
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert [row.split("|")[2].strip() for row in rows] == [f"`{change['key']}`" for change in CHANGES]
    assert rows[0] == "| 1 | `training.gradient_checkpointing` | `true` | recomputes activations | 10.00 GiB |"
    assert "These changes make it fit" in text
    assert "does not fit" in fit_markdown({"fits": False, "changes": CHANGES, "plan": plan()})
    assert "No change needed" in fit_markdown({"fits": True, "changes": [], "plan": plan()})
    assert "no change this planner knows" in fit_markdown({"fits": False, "changes": [], "plan": plan()})


def test_applying_and_undoing_the_changes_on_the_form_values():
    specs = editable_fields()
    current = {"training.gradient_checkpointing": False, "dataset.general.batch_size": 2,
               "training.gradient_accumulation_steps": 1, "network.network_dim": 16}
    new_values, unknown = change_values([*CHANGES, {"key": "no.such_field", "value": 1, "reason": "",
                                                    "gpu_needed_bytes": 0}], specs, to_widget)
    assert new_values == {"training.gradient_checkpointing": True, "dataset.general.batch_size": 1,
                          "training.gradient_accumulation_steps": 2}
    assert unknown == ["no.such_field"]
    previous = previous_values(new_values, current)
    assert previous == {"training.gradient_checkpointing": False, "dataset.general.batch_size": 2,
                        "training.gradient_accumulation_steps": 1}
    applied = current | new_values
    assert applied | previous == current  # Undo puts the form back as it was
    message = applied_markdown(new_values, current, unknown)
    assert "Changed in the form (3)" in message and "`training.gradient_checkpointing`: False → True" in message
    assert "`no.such_field`" in message
    assert "already had these values" in applied_markdown(new_values, applied, [])
    assert "`dataset.general.batch_size`" in undone_markdown(previous)


def test_the_command_line_is_a_list_with_the_base_dir_the_size_and_fit():
    assert plan_arguments("/tmp/c.toml", "/home/me") == ["plan", "/tmp/c.toml", "--json", "--base-dir", "/home/me"]
    assert plan_arguments("/tmp/c.toml", "/home/me", " 12GiB ", fit=True) == [
        "plan", "/tmp/c.toml", "--json", "--base-dir", "/home/me", "--gpu-memory", "12GiB", "--fit"]


def done(returncode: int, stdout: str = "", stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], returncode, stdout, stderr)


def test_a_report_is_read_from_exit_0_and_3_and_a_failure_names_its_output():
    assert report_from(done(3, '{"items": [], "fits": false}'))["fits"] is False
    assert report_from(done(0, '{"changes": [], "fits": true}'), fit=True)["fits"] is True
    with pytest.raises(PlanFailed, match="(?s)exit code 2.*'12XB' is not a size"):
        report_from(done(2, "", "usage: ...\nerror: argument --gpu-memory: '12XB' is not a size"))
    with pytest.raises(PlanFailed, match="exit code 0"):
        report_from(done(0, "not json"))


def test_a_form_with_problems_or_paths_outside_the_roots_runs_no_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_json.subprocess, "run", lambda *a, **k: pytest.fail("no process for this"))
    roots = FileRoots.from_paths([tmp_path / "allowed"], include_home=False)
    with pytest.raises(PlanFailed, match="problems"):
        plan_report(None, roots, tmp_path)
    outside = deep_merge(default_config_dict(), {"model": {"pretrained_model_name_or_path": "/etc/model.ckpt"}})
    with pytest.raises(PlanFailed, match="pretrained_model_name_or_path"):
        plan_report(outside, roots, tmp_path)


def test_a_plan_that_does_not_finish_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_json, "engine_command",
                        lambda args: [sys.executable, "-c", "import time; time.sleep(5)"])
    roots = FileRoots.from_paths([tmp_path], include_home=False)
    with pytest.raises(PlanFailed, match="did not finish within 0.2 s"):
        plan_report(default_config_dict(), roots, tmp_path, timeout=0.2)


@pytest.mark.slow
def test_the_engine_plans_the_form_config_on_a_tiny_model(tiny_models, tmp_path):
    overlay = {"model": {"pretrained_model_name_or_path": "sd1", "model_family": "sd1"},  # relative to the base
               "dataset": {"train_data_dir": str(tiny_models["dataset_img"]),
                           "general": {"resolution": 64, "batch_size": 2, "min_bucket_reso": 64,
                                       "max_bucket_reso": 128}},
               "training": {"mixed_precision": "no", "max_train_steps": 4, "max_train_epochs": 0}}
    config = deep_merge(default_config_dict(), overlay)
    base = tiny_models["sd1"].parent
    roots = FileRoots.from_paths([base, tmp_path], include_home=False)
    estimate = plan_report(config, roots, base, "0.05GiB")
    assert estimate["fits"] is False and estimate["gpu_capacity_bytes"] == int(0.05 * GIB)
    fit = plan_report(config, roots, base, "0.05GiB", fit=True)
    assert fit["changes"][0]["key"] == "training.gradient_checkpointing"
    with pytest.raises(PlanFailed, match="is not a size"):  # the engine's own words for a size it cannot read
        plan_report(config, roots, base, "12 bananas")
