"""The run status the Train tab shows comes from one incremental reader per run (gui.run_reader.RunReader): checked
against a fresh read of the same files after every append, a resume, a replaced or rewritten file, and concurrent
viewers; the chart rows stay bounded and keep the loss's shape."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from engine.rundir.layout import EVENTS_FILE
from gui import run_reader, runs
from gui.run_reader import CHART_BUCKETS, ProgressSeries, RunReader, read_status
from gui.runner import RunManager
from gui.runs import RunHandle, write_record


def line(type_: str, **fields) -> str:
    return json.dumps({"type": type_, "time": 0.0, **fields}) + "\n"


def progress(step: int, loss: float | None = 1.0, total: int = 100) -> str:
    return line("progress", step=step, total_steps=total, epoch=1, num_epochs=2, loss=loss, loss_avg=0.5,
                it_per_s=2.0, eta_s=3.0, lr=[1e-4 * step, 5e-5])


def append(run_dir: Path, text: str) -> None:
    with (run_dir / EVENTS_FILE).open("a", encoding="utf-8") as stream:
        stream.write(text)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    write_record(folder, {"created_at": 1.0, "status": "created"})
    return folder


def a_run(run_dir: Path, steps: range) -> list[str]:
    """A run's event lines: start, progress, a saved model and state, a sample, a warning, done."""
    model, state = run_dir / "out" / "m.safetensors", run_dir / "out" / "m-state"
    state.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"x")
    image = run_dir / "samples" / "s.png"
    return [line("start", total_steps=100, num_epochs=2), *(progress(step) for step in steps[:3]),
            line("checkpoint", kind="step", path=str(model), step=3, epoch=1),
            line("checkpoint", kind="state", path=str(state), step=3, epoch=1),
            line("sample", step=3, epoch=1, images=[{"path": str(image)}]),
            line("warning", message="slow disk"), *(progress(step) for step in steps[3:]),
            line("done", ok=False, stopped=True, global_step=steps[-1], summary="stopped", state=str(state))]


def test_every_append_reads_like_a_fresh_read(run_dir: Path):
    reader = RunReader(run_dir)
    text = "".join(a_run(run_dir, range(1, 9)))
    # Appended in uneven pieces, cutting lines in half: a line still being written waits for the next look.
    for cut in [*range(7, len(text), 37), len(text)]:
        (run_dir / EVENTS_FILE).write_text(text[:cut], encoding="utf-8")
        assert reader.status() == read_status(RunHandle(run_dir))
    final = reader.status()
    assert final.state == "stopped" and final.step == 8 and final.summary == "stopped"
    assert [entry["kind"] for entry in final.checkpoints] == ["step", "state"]
    assert final.samples == [str(run_dir / "samples" / "s.png")] and final.warnings == ["slow disk"]
    assert [row["step"] for row in reader.chart().rows] == list(range(1, 9))


def test_a_resume_keeps_only_the_files_of_earlier_processes(run_dir: Path):
    reader = RunReader(run_dir)
    (run_dir / EVENTS_FILE).write_text("".join(a_run(run_dir, range(1, 6))), encoding="utf-8")
    assert reader.status().state == "stopped"
    offset = (run_dir / EVENTS_FILE).stat().st_size
    write_record(run_dir, {"created_at": 1.0, "pid": os.getpid(), "proc_start": runs.process_start_ticks(os.getpid()),
                           "events_offset": offset})
    resumed = reader.status()
    assert resumed == read_status(RunHandle(run_dir))
    assert resumed.state == "running" and resumed.warnings == [] and resumed.summary == ""
    assert len(resumed.checkpoints) == 2 and resumed.resume_state.endswith("m-state") and resumed.samples
    append(run_dir, line("start", total_steps=100, num_epochs=2) + progress(6))
    assert reader.status() == read_status(RunHandle(run_dir))
    assert reader.status().step == 6
    assert [row["step"] for row in reader.chart().rows] == [1, 2, 3, 4, 5, 6]  # the charts keep every process


def test_a_replaced_or_rewritten_file_is_read_anew(run_dir: Path):
    reader = RunReader(run_dir)
    path = run_dir / EVENTS_FILE
    path.write_text("".join(progress(step) for step in range(1, 20)), encoding="utf-8")
    assert reader.status().step == 19
    before = reader.chart().version
    replacement = run_dir / "new.jsonl"
    replacement.write_text(progress(1, total=7), encoding="utf-8")
    replacement.replace(path)  # a new file (new inode), shorter
    assert reader.status() == read_status(RunHandle(run_dir)) and reader.status().total_steps == 7
    assert reader.chart().version != before and [row["step"] for row in reader.chart().rows] == [1]
    # Rewritten in place, longer than what was read: noticed by the byte before the read position.
    with path.open("r+", encoding="utf-8") as stream:
        stream.write(line("progress", step=2, total_steps=9, note="longer than the line it overwrites " * 9))
    assert reader.status().total_steps == 9 and reader.status() == read_status(RunHandle(run_dir))
    path.unlink()
    assert reader.status().state == "created" and reader.chart().rows == []


def test_a_removed_checkpoint_disappears(run_dir: Path):
    reader = RunReader(run_dir)
    (run_dir / EVENTS_FILE).write_text("".join(a_run(run_dir, range(1, 6))), encoding="utf-8")
    assert len(reader.status().checkpoints) == 2
    time.sleep(0.05)  # the folder's mtime must move past the one seen: coarse clocks tick every few ms
    (run_dir / "out" / "m.safetensors").unlink()
    assert [entry["kind"] for entry in reader.status().checkpoints] == ["state"]


def test_checkpoints_are_not_stat_ed_again_while_their_folder_is_unchanged(run_dir: Path, monkeypatch):
    folder = run_dir / "out"
    folder.mkdir()
    for index in range(500):
        (folder / f"m-{index}.safetensors").write_bytes(b"")
    append(run_dir, "".join(line("checkpoint", kind="step", path=str(folder / f"m-{index}.safetensors"), step=index)
                            for index in range(500)))
    reader = RunReader(run_dir)
    assert len(reader.status().checkpoints) == 500
    checked = []
    monkeypatch.setattr(runs.os.path, "exists", lambda path: checked.append(path) or os.stat(path) is not None)
    assert len(reader.status().checkpoints) == 500 and checked == []


def test_chart_rows_stay_bounded_and_keep_the_shape():
    series = ProgressSeries(buckets=1000)
    for step in range(1, 1001):
        series.add({"step": step, "loss": 1.0, "loss_avg": 1.0, "lr": 0.1})
    assert [row["step"] for row in series.rows()] == list(range(1, 1001))  # a short run keeps every point
    series = ProgressSeries(buckets=1000)
    for step in range(1, 100_001):
        loss = 5.0 if step == 40_000 else 0.01 if step == 70_000 else 1.0 + (step % 7) / 100
        series.add({"step": step, "loss": loss, "loss_avg": 1.0 - step / 1e6, "lr": step / 1e5})
    rows = series.rows()
    raw = [row for row in rows if row.get("loss") is not None]
    smooth = [row for row in rows if row.get("loss_avg") is not None]
    assert len(raw) <= 2000 and len(smooth) <= 1000 and len(raw) > 1000
    assert max(row["loss"] for row in raw) == 5.0 and min(row["loss"] for row in raw) == 0.01  # spikes survive
    assert raw[-1]["step"] == smooth[-1]["step"] == rows[-1]["step"] == 100_000  # the newest point is drawn
    assert rows[-1]["lr"] == 1.0 and [row["step"] for row in rows] == sorted(row["step"] for row in rows)


def test_viewers_share_one_reader_and_agree_while_the_run_writes(run_dir: Path):
    manager = RunManager(run_dir.parent)
    handle = RunHandle.from_dir(run_dir)
    append(run_dir, progress(1))
    assert manager.chart(handle) is manager.chart(handle)  # no new progress: the same rows, not a copy
    errors, done = [], threading.Event()

    def viewer() -> None:
        while not done.is_set():
            try:
                status, chart = manager.status(handle), manager.chart(handle)
                assert [row["step"] for row in chart.rows] == list(range(1, len(chart.rows) + 1))
                assert status.step >= 1
            except Exception as error:  # noqa: BLE001 - reported below, with the thread's failure
                errors.append(error)
                return

    threads = [threading.Thread(target=viewer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for step in range(2, 400):
        append(run_dir, progress(step))
    done.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert manager.status(handle) == read_status(handle) and manager.status(handle).step == 399
    assert [row["step"] for row in manager.chart(handle).rows] == list(range(1, 400))


def test_the_train_tabs_tick_sends_charts_only_when_they_change_and_keeps_no_rows(run_dir: Path, monkeypatch):
    """The tick as Gradio runs it (pre- and postprocessing, the session's gr.State), without a browser."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import gradio as gr
    from gradio.state_holder import SessionState

    from gui.browse import FileRoots
    from gui.context import TabContext
    from gui.tabs import first_open, train

    image = run_dir / "samples" / "a.png"
    image.parent.mkdir()
    image.write_bytes(bytes.fromhex("89504e470d0a1a0a"))
    sample = line("sample", step=0, images=[{"path": str(image)}])
    append(run_dir, line("start", total_steps=5000, num_epochs=1) + sample
           + "".join(progress(step, total=5000) for step in range(1, 3001)))
    write_record(run_dir, {"created_at": 1.0, "pid": os.getpid(), "proc_start": runs.process_start_ticks(os.getpid())})
    runs_dir = run_dir.parent
    with gr.Blocks() as blocks:  # the tab as a page's first opening builds it
        train.content(TabContext(runs_dir=runs_dir, presets_dir=None, roots=FileRoots.from_paths(runs_dir=runs_dir),
                                 config=gr.State(None)), first_open.train_services(runs_dir))
    tick = next(fn for fn in blocks.fns.values() if fn.api_name == "tick")
    draw_samples = next(fn for fn in blocks.fns.values() if fn.api_name == "draw_samples")
    position = {getattr(block, "elem_id", None): index for index, block in enumerate(tick.outputs)}
    cache = next(block for block in tick.outputs if isinstance(block, gr.State))
    session = SessionState(blocks)

    def complete(coroutine):
        # In a thread of its own: a browser test earlier in this worker may have left Playwright's loop running here.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coroutine).result()

    def run() -> dict:
        answer = complete(blocks.process_api(tick, [run_dir.name, None], state=session))
        shown = {elem_id: answer["data"][index] for elem_id, index in position.items()}
        if shown["run-samples-key"] != drawn.get("key"):  # the page then runs the key's change event: the gallery
            drawn["key"] = shown["run-samples-key"]
            shown["run-samples"] = complete(blocks.process_api(draw_samples, [run_dir.name], state=session))
        return shown

    drawn: dict = {}

    first = run()
    assert "running" in first["run-status"] and "step 3000/5000" in first["run-status"]
    series = [row[2] for row in first["loss-chart"]["data"]]
    assert series.count("raw") <= 2 * CHART_BUCKETS and series.count("smoothed") <= CHART_BUCKETS
    assert first["loss-chart"]["data"][-1][0] == 3000 and len(first["lr-chart"]["data"]) <= CHART_BUCKETS
    assert str(image) in json.dumps(first["run-samples"]["data"])
    assert len(repr(session[cache._id])) < 500  # fingerprints, not rows
    again = run()  # nothing new: the charts and samples are not sent again, the texts are
    assert again["loss-chart"] == again["lr-chart"] == {"__type__": "update"} and "run-samples" not in again
    assert "step 3000/5000" in again["run-status"]
    monkeypatch.setattr(run_reader, "CHART_REFRESH_S", 3600.0)  # a long run's chart waits for its refresh time
    append(run_dir, progress(3001, total=5000))
    waiting = run()
    assert waiting["loss-chart"] == {"__type__": "update"} and "step 3001/5000" in waiting["run-status"]
    monkeypatch.setattr(run_reader, "CHART_REFRESH_S", 0.0)
    third = run()
    assert third["loss-chart"]["data"][-1][0] == 3001 and "step 3001/5000" in third["run-status"]


def test_nan_losses_and_odd_characters_keep_their_events(run_dir: Path):
    """The engine's json writes NaN for a NaN loss (the fast parser refuses it: json reads it then), and a
    message may hold U+2028, which is no line end in events.jsonl."""
    odd = json.dumps({"type": "warning", "message": "two\u2028lines"}, ensure_ascii=False)
    append(run_dir, '{"type": "progress", "step": 1, "loss": NaN, "loss_avg": 1.0, "lr": [0.1]}\n'
           + odd + "\nnot json\n[1, 2]\n" + progress(2))
    status = RunReader(run_dir).status()
    assert status.step == 2 and status.warnings == ["two\u2028lines"]
    assert [row["step"] for row in RunReader(run_dir).chart().rows] == [1, 2]
