"""The EMA's settings, names and state file: nonsense is refused naming the field, settings that would do nothing are
warned about, EMA files count as the run's own, and a state keeps the EMA (an older state without it still loads)."""

from __future__ import annotations

import pytest
import torch

from engine.config.errors import ConfigError
from engine.config.io import validate_config
from engine.config.schema import config_warnings
from engine.rundir.naming import ema_stem, file_name, name_in_use, owns_name, step_stem
from engine.train.state import EmaSnapshot, SavedState, TrainPosition, load_state, save_state

STEPS_RUN = {"training": {"max_train_epochs": 0, "max_train_steps": 100}}


def problems(data: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(data, check_packages=False)
    return {problem.path: problem.message for problem in caught.value.problems}


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_decay_outside_zero_to_one_is_refused(decay):
    assert "ema.decay" in problems({"ema": {"enabled": True, "decay": decay}})


def test_choices_and_counts_are_checked():
    assert "ema.device" in problems({"ema": {"device": "tpu"}})
    assert "ema.save" in problems({"ema": {"save": "both"}})
    assert "ema.update_every_n_steps" in problems({"ema": {"update_every_n_steps": 0}})


def test_an_ema_that_would_never_update_is_refused():
    message = problems({**STEPS_RUN, "ema": {"enabled": True, "update_every_n_steps": 101}})["ema.update_every_n_steps"]
    assert "never be updated" in message and "at most 100" in message


def test_settings_of_an_ema_that_is_off_are_a_warning():
    config = validate_config({"ema": {"save": "instead", "sample_with_ema": True}}, check_packages=False)
    warnings = {problem.path: problem.message for problem in config_warnings(config)}
    assert "ema.enabled = true" in warnings["ema.save"] and "ema.sample_with_ema" in warnings["ema.save"]


def test_a_decay_longer_than_the_run_is_a_warning():
    config = validate_config({**STEPS_RUN, "ema": {"enabled": True, "decay": 0.999}}, check_packages=False)
    assert any(problem.path == "ema.decay" for problem in config_warnings(config))
    config = validate_config({**STEPS_RUN, "ema": {"enabled": True, "decay": 0.9}}, check_packages=False)
    assert not config_warnings(config)


def test_ema_files_are_the_runs_own_names(tmp_path):
    stem = ema_stem(step_stem("lora", 20))
    assert file_name(stem, "safetensors") == "lora-step00000020-ema.safetensors"
    assert owns_name("lora", "safetensors", "lora-step00000020-ema.safetensors")
    assert owns_name("lora", "safetensors", "lora-ema.safetensors")
    assert owns_name("model", "diffusers", "model-000002-ema")
    assert owns_name("model", "safetensors", "model-ema_clip_l.safetensors")  # SD3's text encoder beside it
    (tmp_path / "lora-ema.safetensors").write_bytes(b"")  # a later run called "lora" must not overwrite it
    assert name_in_use(tmp_path, "lora", "safetensors")


def _state(ema: EmaSnapshot | None) -> SavedState:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return SavedState(trained={"weight": model.weight.detach().clone()}, optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(), scaler=None, position=TrainPosition(1, 2, 2), ema=ema)


def test_a_state_keeps_the_ema_and_its_update_count(tmp_path):
    tensors = {"0.weight": torch.randn(2, 2), "0.bias": torch.randn(2)}
    loaded = load_state(save_state(tmp_path / "x-state", _state(EmaSnapshot(tensors, 7))))
    assert loaded.ema is not None and loaded.ema.updates == 7
    assert loaded.ema.tensors.keys() == tensors.keys()
    assert all(torch.equal(loaded.ema.tensors[key], value) for key, value in tensors.items())
    assert load_state(save_state(tmp_path / "y-state", _state(None))).ema is None


def test_the_section_is_named_ema_to_users():
    from engine.config.describe import section_title

    assert section_title("ema") == "EMA"  # the field's title, not "Ema"
    assert section_title("training") == "Training"
