"""The dataset doctor as the GUI shows it: a table of findings, a bucket histogram and the steps arithmetic.

The doctor itself (engine.data.doctor) reads only image headers and files, no torch, so it runs in the GUI
process. `report_for` returns its JSON form (the same as `python -m engine doctor --json`); the functions below
turn that dict into what the page shows, and `DoctorPanel` holds the components that show it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from engine.config.errors import ConfigError
from engine.config.io import deep_merge, default_config_dict, validate_config

FINDING_COLUMNS = ["severity", "file", "problem", "what to do"]
# Marks from common fonts: emoji show as empty boxes on machines without an emoji font.
_SEVERITY_MARK = {"error": "✖ error", "warning": "⚠ warning", "info": "· note"}


def report_for(config_dict: Mapping[str, Any] | None, base_dir: str | Path, *, quick: bool = False,
               overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the doctor on a config dict (defaults filled in), with `overrides` (a nested dict) on top.

    Raises:
        ConfigError: when the config is not valid; its problems name the fields.
    """
    from engine.data.doctor import run_doctor  # image libraries load when the doctor first runs

    data = deep_merge(deep_merge(default_config_dict(), dict(config_dict or {})), dict(overrides or {}))
    return run_doctor(validate_config(data), base_dir, quick=quick).to_dict()


def short_path(where: str, base: str | Path | None) -> str:
    """A finding's file relative to the folder the user is looking at, so the table keeps 'what to do' in view."""
    if not where or base is None:
        return where or ""
    try:
        return str(Path(where).relative_to(base))
    except ValueError:
        return where


def findings_rows(report: Mapping[str, Any], base: str | Path | None = None) -> list[list[str]]:
    """One row per finding, errors first (the doctor's order); files shown relative to `base` when inside it."""
    return [[_SEVERITY_MARK.get(f["severity"], f["severity"]), short_path(f.get("where") or "", base),
             f["message"], f.get("hint") or ""] for f in report["findings"]]


def bucket_frame(report: Mapping[str, Any]) -> pd.DataFrame | None:
    """Images per bucket over all datasets ('768x512' → count), for a bar chart; None when there are none."""
    counts: dict[str, int] = {}
    for dataset in report["datasets"]:
        for bucket in dataset["buckets"]:
            label = "x".join(str(side) for side in bucket["bucket"])
            counts[label] = counts.get(label, 0) + bucket["images"]
    if not counts:
        return None  # not an empty frame: Gradio 6.31 plots first drawn empty keep a broken scale
    return pd.DataFrame({"bucket": list(counts), "images": list(counts.values())})


def steps_markdown(report: Mapping[str, Any]) -> str:
    """The arithmetic from images to total steps, in the words a user checks it with."""
    totals = report["totals"]
    counts = report["counts"]
    verdict = "**Ready to train.**" if report["ok"] else f"**{counts.get('error', 0)} error(s) to fix first.**"
    lines = [f"{verdict} {counts.get('warning', 0)} warning(s), {counts.get('info', 0)} note(s).", ""]
    lines.append(f"- {totals['train_images']} training images → {totals['train_samples_per_epoch']} samples per "
                 f"epoch (images × repeats)")
    if totals["reg_images"]:
        lines.append(f"- {totals['reg_images']} regularization images → {totals['reg_samples_per_epoch']} samples "
                     f"per epoch")
    if totals.get("validation_images"):  # reports of older engines lack the key
        lines.append(f"- {totals['validation_images']} images held out for the validation loss (never trained on)")
    lines.append(f"- {totals['batches_per_epoch']} batches per epoch (batches never mix buckets) → "
                 f"{totals['steps_per_epoch']} optimizer steps per epoch")
    lines.append(f"- {totals['epochs']} epochs → **{totals['total_steps']} steps** in total")
    return "\n".join(lines)


class DoctorPanel:
    """The components that show a doctor report; build inside a gr.Blocks context."""

    def __init__(self, elem_prefix: str):
        self.summary = gr.Markdown(elem_id=f"{elem_prefix}-summary")
        self.findings = gr.Dataframe(headers=FINDING_COLUMNS, value=None, interactive=False, wrap=True,
                                     column_widths=["12%", "26%", "32%", "30%"], label="Findings",
                                     elem_id=f"{elem_prefix}-findings")
        # y_lim from 0: with one bucket (or equal counts) the automatic axis starts at the value and bars vanish
        self.histogram = gr.BarPlot(None, x="bucket", y="images", title="Images per bucket", height=240,
                                    y_lim=[0, None], elem_id=f"{elem_prefix}-buckets")

    @property
    def outputs(self) -> list[gr.Component]:
        return [self.summary, self.findings, self.histogram]

    def show(self, report: Mapping[str, Any], base: str | Path | None = None) -> dict[gr.Component, Any]:
        rows = findings_rows(report, base)
        return {self.summary: steps_markdown(report),
                self.findings: pd.DataFrame(rows or [["", "", "no findings", ""]], columns=FINDING_COLUMNS),
                self.histogram: bucket_frame(report)}

    def show_error(self, error: ConfigError | Exception) -> dict[gr.Component, Any]:
        problems = getattr(error, "problems", None)
        text = "\n".join(f"- `{p.path}`: {p.message}" for p in problems) if problems else f"- {error}"
        return {self.summary: f"**The doctor could not run:**\n{text}", self.findings: None, self.histogram: None}
