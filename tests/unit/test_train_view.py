"""What the Train tab shows, from a RunStatus and events: checked against the inputs, not against a browser."""

from pathlib import Path

from gui.runs import RunHandle, RunStatus
from gui.views import train as view


def progress(step: int, loss: float, avg: float, lr: float) -> dict:
    return {"type": "progress", "step": step, "loss": loss, "loss_avg": avg, "lr": [lr, lr / 2]}


def test_durations_read_like_a_clock():
    assert view.format_duration(None) == "—"
    assert view.format_duration(42.4) == "42s"
    assert view.format_duration(185) == "3m 05s"
    assert view.format_duration(3720) == "1h 02m"


def test_status_line_names_state_step_epoch_speed_and_eta():
    status = RunStatus(state="running", step=17, total_steps=120, epoch=1, num_epochs=4, loss=1.25,
                       it_per_s=6.5, eta_s=16)
    line = view.status_markdown("run-a", status)
    for part in ("running", "step 17/120", "epoch 1/4", "6.50 it/s", "ETA 16s", "loss 1.2500"):
        assert part in line
    assert view.progress_fraction(status) == 17 / 120
    assert 'value="17" max="120"' in view.progress_html(status)


def test_error_box_only_for_failed_runs_and_carries_the_hint():
    failed = RunStatus(state="failed", error="loss is NaN at step 3", hint="lower the learning rate")
    text = view.error_markdown(failed)
    assert "loss is NaN at step 3" in text and "lower the learning rate" in text
    assert view.error_markdown(RunStatus(state="stopped", error="old", hint="old")) == ""


def test_chart_rows_follow_progress_events_only():
    events = [{"type": "start", "total_steps": 3}, progress(1, 1.0, 1.0, 1e-3), {"type": "sample", "step": 1},
              progress(2, 0.5, 0.75, 5e-4)]
    rows = view.progress_rows(events)
    assert [row["step"] for row in rows] == [1, 2]
    assert [row["lr"] for row in rows] == [1e-3, 5e-4]  # the first parameter group
    loss = view.loss_frame(rows)
    assert len(loss) == 2 * len(rows)
    smoothed = loss[loss["series"] == "smoothed"]
    assert list(smoothed["value"]) == [1.0, 0.75]
    assert list(view.lr_frame(rows)["lr"]) == [1e-3, 5e-4]


def test_empty_charts_keep_numeric_steps():
    assert str(view.loss_frame([])["step"].dtype) == "int64"
    assert str(view.lr_frame([])["lr"].dtype) == "float64"


def test_checkpoints_list_and_resume_rule(tmp_path: Path):
    status = RunStatus(state="stopped", resume_state=str(tmp_path / "x-state"),
                       checkpoints=[{"kind": "stop", "path": str(tmp_path / "x.safetensors"), "step": 40}])
    text = view.checkpoints_markdown(status)
    assert "step 40" in text and "x.safetensors" in text and "x-state" in text
    assert view.can_resume(status)
    assert not view.can_resume(RunStatus(state="finished", resume_state="s"))
    assert not view.can_resume(RunStatus(state="stopped"))
    assert view.checkpoints_markdown(RunStatus(state="running")) == "No checkpoints yet."


def test_run_choices_keep_the_given_order(tmp_path: Path):
    handles = [RunHandle(tmp_path / "b"), RunHandle(tmp_path / "a")]
    assert view.run_choices(handles) == [("b", "b"), ("a", "a")]


def test_tensorboard_opens_on_the_runs_own_log_folder(tmp_path):
    """Runs sharing logging_dir each log into <logging_dir>/<prefix><date-time>: TensorBoard for one run shows its
    folder (the start event names it), the shared folder only before it starts."""
    import json

    from engine.config.io import save_config, validate_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shared = tmp_path / "logs"
    save_config(validate_config({"logging": {"logging_dir": str(shared)}}, check_packages=False),
                run_dir / "config.toml")
    handle = RunHandle(run_dir)
    assert view.log_dir(handle) == str(shared)

    def start(folder: Path) -> str:
        return json.dumps({"type": "start", "config": {"log_dir": str(folder)}}) + "\n"

    (run_dir / "events.jsonl").write_text(start(shared / "last20261204101010"), encoding="utf-8")
    assert view.log_dir(handle) == str(shared / "last20261204101010")
    with (run_dir / "events.jsonl").open("a", encoding="utf-8") as events:  # resumed: a second folder
        events.write(start(shared / "last20261204111111"))
    assert view.log_dir(handle) == str(shared)


GIB = 2**30
H200 = {"gpu_peak_bytes": round(6.4 * GIB), "gpu_needed_bytes": round(7.1 * GIB),
        "gpu_capacity_bytes": round(139.8 * GIB), "fits": True}


def test_memory_line_puts_the_measured_peak_beside_the_plan_and_the_card():
    line = view.memory_line(H200, {"type": "progress", "gpu_peak_mib": 6.5 * 1024, "gpu_reserved_mib": 7000.0})
    assert line == "GPU memory: peak 6.5 GiB (plan 6.4 GiB, card 139.8 GiB)"
    assert "⚠" not in line
    # Before the first step: the plan, and a dash for the peak not measured yet.
    assert view.memory_line(H200, {}) == "GPU memory: peak — (plan 6.4 GiB, card 139.8 GiB)"
    unknown_card = {**H200, "gpu_capacity_bytes": 0, "fits": None}
    assert view.memory_line(unknown_card, {"gpu_peak_mib": 6.5 * 1024}) == "GPU memory: peak 6.5 GiB (plan 6.4 GiB)"


def test_memory_line_without_a_plan_shows_the_measured_peak_alone():
    assert view.memory_line(None, {"gpu_peak_mib": 6.5 * 1024, "gpu_reserved_mib": 7000.0}) == "GPU peak 6.5 GiB"
    assert view.memory_line(None, {"type": "progress", "rss_peak_mib": 1228.8}) == "RAM peak 1.2 GiB"  # a CPU run
    assert view.memory_line(None, {"type": "progress", "step": 3}) == ""  # an older run's events have no figures
    assert view.memory_line({"gpu_peak_bytes": None}, {"rss_peak_mib": 512.0}) == "RAM peak 0.5 GiB"


def test_memory_line_marks_a_peak_over_the_plan_and_a_plan_that_does_not_fit():
    within = view.memory_line(H200, {"gpu_peak_mib": 6.4 * 1.09 * 1024})  # 9 % over: the planner's spread
    assert "⚠" not in within
    over = view.memory_line(H200, {"gpu_peak_mib": 7.2 * 1024})
    assert over.startswith("GPU memory: peak 7.2 GiB (plan 6.4 GiB, card 139.8 GiB) — ⚠ ")
    assert "12% above the plan" in over
    small_card = {**H200, "gpu_capacity_bytes": 6 * GIB, "fits": False}
    no_fit = view.memory_line(small_card, {"gpu_peak_mib": 6.5 * 1024})
    assert "⚠" in no_fit and "does not fit" in no_fit and "above the plan" not in no_fit
    assert "does not fit" in view.memory_line(small_card, {})  # said before the first step too


def test_the_reader_folds_the_plan_and_the_newest_memory_figures(tmp_path):
    import json

    from gui.run_reader import RunReader

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    events = [{"type": "start", "total_steps": 3, "memory_plan": H200},
              {"type": "progress", "step": 1, "gpu_peak_mib": 6.0 * 1024, "gpu_reserved_mib": 7000.0},
              {"type": "progress", "step": 2, "gpu_peak_mib": 7.2 * 1024, "gpu_reserved_mib": 8000.0},
              {"type": "progress", "step": 3}]  # no figures: the last ones stay
    (run_dir / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    status = RunReader(run_dir).status()
    assert status.memory_plan == H200 and status.memory["gpu_peak_mib"] == 7.2 * 1024
    assert "12% above the plan" in view.memory_markdown(status)
    cpu_dir = tmp_path / "cpu"
    cpu_dir.mkdir()
    cpu = [{"type": "start", "memory_plan": None}, {"type": "progress", "step": 1, "rss_peak_mib": 1228.8}]
    (cpu_dir / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in cpu), encoding="utf-8")
    assert view.memory_markdown(RunReader(cpu_dir).status()) == "RAM peak 1.2 GiB"
    assert view.memory_markdown(RunStatus(state="created")) == ""
