"""The Train tab's view of the validation loss: `validation` events become the loss chart's third series (kept whole,
beside the bounded progress rows), the status line shows the newest value and the checkpoint list marks the best."""

from __future__ import annotations

import json
from pathlib import Path

from engine.rundir.layout import EVENTS_FILE
from gui.run_reader import RunReader
from gui.runs import write_record
from gui.views import train as view


def line(type_: str, **fields) -> str:
    return json.dumps({"type": type_, "time": 0.0, **fields}) + "\n"


def progress(step: int) -> str:
    return line("progress", step=step, total_steps=20, epoch=1, num_epochs=1, loss=1.0 / step, loss_avg=0.5,
                lr=[1e-4])


def test_validation_events_are_the_third_loss_series_and_mark_the_best(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_record(run_dir, {"created_at": 1.0})
    best = run_dir / "lora-step00000005.safetensors"
    best.write_bytes(b"x")
    events = [line("start", total_steps=20, num_epochs=1, num_validation_images=2),
              *(progress(step) for step in range(1, 6))]
    (run_dir / EVENTS_FILE).write_text("".join(events), encoding="utf-8")
    reader = RunReader(run_dir)
    # Before the first pass the chart already knows the series (one empty point): the plot keeps the colour domain
    # of its first draw.
    early = view.loss_frame(reader.chart().rows)
    placeholder = early[early["series"] == "validation"]
    assert len(placeholder) == 1 and placeholder["value"].isna().all()
    events += [
        line("validation", step=5, epoch=1, loss=0.25, by_timestep={"200": 0.25}, images=2, batches=1,
             checkpoint=str(best), best=str(best)),
        line("checkpoint", kind="step", path=str(best), step=5, epoch=1),
        *(progress(step) for step in range(6, 11)),
        line("validation", step=10, epoch=1, loss=float("nan"), by_timestep={}, images=2, batches=1,
             best=str(best)),
        line("validation", step=10, epoch=1, loss=0.5, by_timestep={"200": 0.5}, images=2, batches=1,
             best=str(best))]
    (run_dir / EVENTS_FILE).write_text("".join(events), encoding="utf-8")
    rows = reader.chart().rows
    frame = view.loss_frame(rows)
    validation = frame[frame["series"] == "validation"]
    assert list(zip(validation["step"], validation["value"], strict=True)) == [(5, 0.25), (10, 0.5)]  # NaN left out
    assert set(frame["series"]) == {"raw", "smoothed", "validation"}
    assert list(view.lr_frame(rows)["step"]) == list(range(1, 11))  # validation rows have no learning rate
    status = reader.status()
    assert status.validation_loss == 0.5 and status.best_checkpoint == str(best)
    assert "validation 0.5000" in view.status_markdown("run", status)
    assert "lora-step00000005.safetensors` · lowest validation loss" in view.checkpoints_markdown(status)
    version = reader.chart().version
    with (run_dir / EVENTS_FILE).open("a", encoding="utf-8") as stream:  # a new pass while the tab watches
        stream.write(line("validation", step=15, epoch=1, loss=0.2, by_timestep={}, images=2, batches=1, best=None))
    chart = reader.chart()
    assert chart.version != version and {"step": 15, "val_loss": 0.2} in chart.rows


def test_the_dataset_list_names_a_validation_only_subset(tmp_path: Path):
    from PIL import Image

    from gui.browse import FileRoots
    from gui.dataset_list import describe_rows

    folder = tmp_path / "held"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "0.png")
    rows = {row.key: row for row in describe_rows(
        [{"subsets": [{"image_dir": str(folder), "validation_only": True}]}], FileRoots((tmp_path,)))}
    assert rows["d0s0"].source == f"{folder} · validation only"
