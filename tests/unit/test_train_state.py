"""Training states: only tensors and plain data load (a crafted file never runs), every shipped optimizer and
scheduler round-trips, generator states round-trip exactly, and a crash mid-save is recovered or cleaned."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config.sections_training import OptimizerSection
from engine.files import atomic_output, clean_stale_temporaries, recover_folder, replace_folder
from engine.rundir.naming import name_in_use
from engine.train.lr_schedulers import SCHEDULER_NAMES, build_lr_scheduler
from engine.train.optimizers import OPTIMIZER_RECIPES, OptimizerConfigError, build_optimizer
from engine.train.save_checks import non_finite_tensors
from engine.train.state import (
    SavedState,
    StateError,
    TrainPosition,
    load_state,
    plain_data,
    read_rng_file,
    rng_states,
    save_state,
    set_rng_states,
    write_rng_file,
)

REPO = Path(__file__).resolve().parents[2]


class _RunsACommand:
    """What an attacker would put in a .pt file: unpickling it would run `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tiny_state() -> SavedState:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return SavedState(trained={"weight": model.weight.detach().clone()}, optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(), scaler={"scale": 65536.0, "_growth_tracker": 0},
                      position=TrainPosition(1, 2, 2), info={"files": []})


def _round_trip(tmp_path: Path, part: str, value: dict) -> dict:
    """`value` as the `part` (optimizer, scheduler) of a state saved and loaded back; checked equal to the bit."""
    state = _tiny_state()
    setattr(state, part, value)
    loaded = getattr(load_state(save_state(tmp_path / "state", state)), part)
    assert _same(loaded, value)
    return loaded


def _same(a, b) -> bool:
    """Equal to the bit: tensors by value and dtype, containers item by item, the rest by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- only tensors and plain data load ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "scaler.pt"])
@pytest.mark.parametrize("legacy", [False, True], ids=["torch_save", "plain_pickle"])
def test_a_crafted_pickle_is_refused_without_running(tmp_path, name, legacy):
    folder = save_state(tmp_path / "lora-state", _tiny_state())
    marker = tmp_path / "PWNED"
    payload = {"state": {}, "param_groups": [], "x": _RunsACommand(marker)}
    if legacy:
        (folder / name).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, folder / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the pickle protocol of the plain pickle
        with pytest.raises(StateError) as refused:
            load_state(folder)
    message = str(refused.value)
    assert str(folder / name) in message and "not a state Atelier wrote" in message and "run code" in message
    assert not marker.exists(), "the payload ran"


def test_a_damaged_file_is_refused_by_name(tmp_path):
    folder = save_state(tmp_path / "lora-state", _tiny_state())
    written = (folder / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(written[:len(written) // 2])  # a copy cut short
    with pytest.raises(StateError, match=r"optimizer\.pt: damaged"):
        load_state(folder)


@pytest.mark.parametrize(("document", "expected"), [
    ({"version": 99, "step": 5}, "written by a newer Atelier"),  # a newer format, its position named differently
    ({"version": "one", "epoch": 1, "batches_done": 0, "global_step": 0}, r"train_state\.json: damaged"),
    ([1, 2], r"train_state\.json: damaged"),
])
def test_the_position_file_is_read_version_first(tmp_path, document, expected):
    folder = save_state(tmp_path / "lora-state", _tiny_state())
    (folder / "train_state.json").write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(StateError, match=expected):
        load_state(folder)


def test_a_state_round_trips(tmp_path):
    state = _tiny_state()
    loaded = load_state(save_state(tmp_path / "lora-state", state))
    assert torch.equal(loaded.trained["weight"], state.trained["weight"])
    assert loaded.position == state.position and loaded.scaler == state.scaler
    assert _same(loaded.scheduler, state.scheduler)
    assert _same(loaded.optimizer, state.optimizer)
    assert not (tmp_path / "lora-state" / "rng.pt").exists()


def test_objects_a_state_cannot_store_are_refused_before_writing(tmp_path):
    state = _tiny_state()
    state.optimizer["param_groups"][0]["custom"] = object()
    with pytest.raises(StateError, match=r"optimizer state\['param_groups'\]\[0\]\['custom'\] holds a builtins"):
        save_state(tmp_path / "lora-state", state)
    assert os.listdir(tmp_path) == []
    assert plain_data({"a": np.float32(0.5), "b": [np.int64(3)]}, "x") == {"a": 0.5, "b": [3]}


def _optimizer_names() -> list[str]:
    return list(OPTIMIZER_RECIPES)


@pytest.mark.parametrize("name", _optimizer_names())
def test_every_shipped_optimizer_state_round_trips(tmp_path, name):
    adaptive = "Adapt" in name or name == "Prodigy"
    section = OptimizerSection(optimizer_type=name, learning_rate=1.0 if adaptive else 1e-3)
    model = torch.nn.Linear(64, 64)
    try:
        optimizer = build_optimizer(section, [{"params": list(model.parameters())}]).optimizer
    except OptimizerConfigError as error:  # an optional package this machine lacks
        pytest.skip(str(error))
    for _ in range(2):
        model(torch.randn(4, 64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.load_state_dict(_round_trip(tmp_path, "optimizer", optimizer.state_dict()))


_SCHEDULER_ARGS = {"cosine_with_min_lr": {"min_lr_ratio": 0.1}, "warmup_stable_decay": {"num_decay_steps": 0.2},
                   "piecewise_constant": {"step_rules": "1:5,0.1"}}


@pytest.mark.parametrize("name", [*SCHEDULER_NAMES, "schedule_free"])
def test_every_shipped_scheduler_state_round_trips(tmp_path, name):
    optimizer_type = {"adafactor": "Adafactor", "schedule_free": "AdamWScheduleFree"}.get(name, "AdamW")
    section = OptimizerSection(optimizer_type=optimizer_type, learning_rate=1e-3,
                               lr_scheduler="constant" if name == "schedule_free" else name,
                               lr_scheduler_args=_SCHEDULER_ARGS.get(name, {}))
    try:
        optimizer = build_optimizer(section, [{"params": list(torch.nn.Linear(4, 4).parameters())}]).optimizer
    except OptimizerConfigError as error:
        pytest.skip(str(error))
    scheduler = build_lr_scheduler(section, optimizer, 20, schedule_free=name == "schedule_free")
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    scheduler.load_state_dict(_round_trip(tmp_path, "scheduler", scheduler.state_dict()))


def test_generator_states_round_trip_exactly(tmp_path):
    random.gauss(0, 1)  # leaves a cached second Gaussian in Python's state
    np.random.standard_normal()  # and in NumPy's
    states = rng_states()
    write_rng_file(tmp_path / "rng.safetensors", states)
    expected = random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()
    set_rng_states(read_rng_file(tmp_path / "rng.safetensors"))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
    loaded = load_state(save_state(tmp_path / "lora-state", _tiny_state())).rng
    assert loaded is not None and loaded["python"][0] == states["python"][0]


def test_non_finite_and_out_of_range_tensors_are_named():
    values = {"ok": torch.ones(3), "nan": torch.tensor([1.0, float("nan")]), "big": torch.tensor([1e5]),
              "state": [{"inf": torch.tensor([float("-inf")])}], "ints": torch.tensor([1, 2]), "empty": torch.ones(0)}
    assert non_finite_tensors(values) == ["nan", "state[0]['inf']"]
    assert non_finite_tensors(values, torch.float16) == ["nan", "big", "state[0]['inf']"]


# --- a crash mid-save --------------------------------------------------------------------------------------------


def test_a_crash_between_the_renames_of_a_replacement_is_recovered_on_load(tmp_path):
    """A real process is killed at the point the issue found fatal: after the old state was moved aside."""
    folder = save_state(tmp_path / "lora-state", _tiny_state())
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from engine.train import state as state_module
        real_replace, calls = os.replace, []

        def replace_then_die(source, target):
            calls.append(target)
            if len(calls) == 2:  # the old folder is already retired; the new one is not in place yet
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(source, target)

        os.replace = replace_then_die
        state = state_module.load_state(Path({str(folder)!r}))
        state.position = state_module.TrainPosition(1, 3, 3)
        state_module.save_state(Path({str(folder)!r}), state)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    _, errors = child.communicate(timeout=300)
    assert child.returncode == -9, errors
    assert not folder.exists() and any(name.startswith(".lora-state.old-") for name in os.listdir(tmp_path))
    assert load_state(folder).position == TrainPosition(1, 2, 2)  # the last complete state, restored
    assert folder.is_dir()
    cleaned = clean_stale_temporaries(tmp_path, lambda name: name == "lora-state")
    assert [path.name for path in cleaned] == [f".lora-state.tmp-{child.pid}"]
    assert os.listdir(tmp_path) == ["lora-state"]


def test_stale_temporaries_of_dead_processes_are_cleaned_and_others_kept(tmp_path):
    dead, alive = _dead_pid(), os.getppid()  # our parent is alive; our own id would count as an earlier process
    made = {f".lora.safetensors.tmp-{dead}-ab12_x": "file", f".lora-000001-state.tmp-{dead}": "folder",
            f".lora-state.old-{dead}": "folder", f".lora-step00000002-state.del-{dead}": "folder",
            f".lora.safetensors.tmp-{alive}-cd34": "file", f".other.safetensors.tmp-{dead}-ef56": "file",
            "lora.safetensors": "file", "notes.txt": "file"}
    for name, kind in made.items():
        if kind == "folder":
            (tmp_path / name).mkdir()
            (tmp_path / name / "trained.safetensors").write_text("x")
        else:
            (tmp_path / name).write_text("x")
    owns = {"lora.safetensors", "lora-000001-state", "lora-state", "lora-step00000002-state"}.__contains__
    clean_stale_temporaries(tmp_path, owns)
    assert sorted(os.listdir(tmp_path)) == sorted([f".lora.safetensors.tmp-{alive}-cd34",
                                                   f".other.safetensors.tmp-{dead}-ef56", "lora-state",
                                                   "lora.safetensors", "notes.txt"])
    assert (tmp_path / "lora-state" / "trained.safetensors").is_file()  # restored, not deleted


def test_a_retired_folder_keeps_its_name_in_use_and_a_present_target_is_not_replaced(tmp_path):
    (tmp_path / f".lora-state.old-{_dead_pid()}").mkdir()
    assert name_in_use(tmp_path, "lora", "safetensors") and not name_in_use(tmp_path, "other", "safetensors")
    (tmp_path / "lora-state").mkdir()
    assert not recover_folder(tmp_path / "lora-state")


def test_temporaries_carry_the_process_id_and_swaps_leave_nothing(tmp_path):
    with atomic_output(tmp_path / "lora.safetensors") as temporary:
        assert temporary.name.startswith(f".lora.safetensors.tmp-{os.getpid()}-")
        temporary.write_text("new")
    old, new = tmp_path / "lora-state", tmp_path / ".lora-state.tmp-1"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "a").write_text(text)
    replace_folder(new, old)
    assert sorted(os.listdir(tmp_path)) == ["lora-state", "lora.safetensors"]
    assert (old / "a").read_text() == "new"
