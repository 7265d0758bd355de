"""EMA of the trained weights on tiny SD1 runs: the EMA files equal an EMA computed by hand from the trained weights
saved at each step, "instead" saves the EMA weights, a resume continues the EMA exactly, retention removes the EMA
files with their checkpoints, and the EMA file is a LoRA like any other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import events_of, load_pipeline, run_trainer, write_config

from engine.config.io import load_config

STEPS = 6


def lora_config(folder: Path, tiny_models: dict, *, ema: dict, **sections) -> Path:
    """SD1 LoRA, 6 steps, float32 saves after every step (so the EMA can be recomputed from them)."""
    saving = {"save_every_n_steps": 1, **sections.pop("saving", {})}
    return write_config(folder / "config.toml", tiny_models, "sd1", ema={"enabled": True, **ema},
                        training={"max_train_steps": STEPS}, optimizer={"learning_rate": 2e-2},
                        saving=saving, **sections)


def ti_config(folder: Path, tiny_models: dict, *, ema: dict) -> Path:
    return write_config(folder / "config.toml", tiny_models, "sd1", method="textual_inversion",
                        embedding={"token_string": "zqtok", "init_word": "dog", "num_vectors_per_token": 2},
                        ema={"enabled": True, **ema}, training={"max_train_steps": STEPS},
                        optimizer={"learning_rate": 5e-2}, saving={"save_every_n_steps": 1, "output_name": "emb"})


def dreambooth_config(folder: Path, tiny_models: dict, *, ema: dict) -> Path:
    """SD1 DreamBooth (UNet and text encoder), whole float32 checkpoints after every step."""
    return write_config(folder / "config.toml", tiny_models, "sd1", method="dreambooth",
                        dataset={"general": {"caption_extension": ".tags"}}, ema={"enabled": True, **ema},
                        training={"max_train_steps": STEPS}, optimizer={"learning_rate": 1e-3},
                        saving={"save_every_n_steps": 1, "output_name": "model"})


def loha_config(folder: Path, tiny_models: dict, *, ema: dict) -> Path:
    return lora_config(folder, tiny_models, ema=ema, network={"network_type": "loha", "network_dim": 4,
                                                              "network_alpha": 2.0})


CONFIGS = {"lora": lora_config, "loha": loha_config, "ti": ti_config, "dreambooth": dreambooth_config}
OUTPUT_NAMES = {"lora": "lora", "loha": "lora", "ti": "emb", "dreambooth": "model"}


def hand_ema(trained_files: list[Path], *, decay: float, warmup: bool) -> dict[str, torch.Tensor]:
    """The EMA, in float64, of the weights in `trained_files` (one per EMA update, oldest first): the first update
    copies the weights, update k moves (1 - d_k) towards them, d_k = min(decay, k / (9 + k)) with warm-up."""
    average: dict[str, torch.Tensor] = {}
    for k, path in enumerate(trained_files, start=1):
        weights = {key: value.double() for key, value in load_file(str(path)).items()}
        if k == 1:
            average = weights
            continue
        d = min(decay, k / (9 + k)) if warmup else decay
        average = {key: d * average[key] + (1 - d) * weights[key] for key in average}
    return average


def step_file(out: Path, name: str, step: int, ema: bool = False) -> Path:
    return out / f"{name}-step{step:08d}{'-ema' if ema else ''}.safetensors"


CASES = {
    # decay 0.3: the warm-up (2/11, 3/12) is below it for two updates, then the decay takes over.
    "lora-warmup": ("lora", {"decay": 0.3, "warmup": True}),
    "lora-every-2": ("lora", {"decay": 0.5, "warmup": False, "update_every_n_steps": 2}),
    # LyCORIS (LoHa): the network's own parameters, saved in kohya's keys by lycoris' own code.
    "loha": ("loha", {"decay": 0.5, "warmup": False}),
    "ti": ("ti", {"decay": 0.5, "warmup": False}),
    # The whole model: every key of the checkpoint, the VAE's and other untrained ones included (their EMA is them).
    "dreambooth": ("dreambooth", {"decay": 0.5, "warmup": False, "device": "cpu"}),
}


@pytest.fixture(scope="module")
def case_runs(tiny_models, tmp_path_factory):
    """The run of a CASES entry, trained once per module: (case, ema settings, output folder, trainer)."""
    runs: dict[str, tuple] = {}

    def run(case: str) -> tuple:
        if case not in runs:
            method, ema = CASES[case]
            folder = tmp_path_factory.mktemp(case)
            config = CONFIGS[method](folder, tiny_models, ema=ema)
            trainer = run_trainer(config, folder)
            runs[case] = case, ema, trainer.session.output_dir, trainer
        return runs[case]

    return run


@pytest.fixture(scope="module", params=list(CASES))
def beside_run(request, case_runs):
    return case_runs(request.param)


@pytest.fixture(scope="module")
def lora_run(case_runs):
    return case_runs("lora-warmup")


@pytest.mark.slow
def test_ema_files_equal_an_ema_computed_by_hand_from_the_saved_weights(beside_run):
    case, ema, out, trainer = beside_run
    name = OUTPUT_NAMES[CASES[case][0]]
    every = ema.get("update_every_n_steps", 1)
    for step in range(1, STEPS + 1):
        updated_at = list(range(every, step + 1, every))
        saved = load_file(str(step_file(out, name, step, ema=True)))
        if not updated_at:  # no update yet: the EMA is still the weights the run started from
            continue
        expected = hand_ema([step_file(out, name, at) for at in updated_at], decay=ema["decay"],
                            warmup=ema["warmup"])
        assert saved.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(saved[key].double(), expected[key], rtol=1e-5, atol=1e-7, msg=key)
    final_ema = load_file(str(out / f"{name}-ema.safetensors"))
    assert all(torch.equal(final_ema[key], value)
               for key, value in load_file(str(step_file(out, name, STEPS, ema=True))).items())
    # The EMA is not just the trained weights again: the average lags behind them.
    trained = load_file(str(out / f"{name}.safetensors"))
    assert any(not torch.equal(trained[key], final_ema[key]) for key in trained)
    assert trainer.ema.updates == STEPS // every


@pytest.mark.slow
def test_ema_file_is_a_kohya_lora_with_the_runs_metadata_and_checkpoint_events(lora_run, tiny_models):
    _, _, out, _ = lora_run
    with safe_open(str(out / "lora.safetensors"), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    with safe_open(str(out / "lora-ema.safetensors"), "pt") as handle:
        ema_keys, ema_metadata = set(handle.keys()), handle.metadata()
    assert ema_keys == keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in ema_keys
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in ema_keys)
    assert ema_metadata["ss_ema"] == "true" and ema_metadata["ss_ema_decay"] == "0.3"
    assert ema_metadata["ss_ema_warmup"] == "True" and ema_metadata["ss_ema_updates"] == str(STEPS)
    assert not any(key.startswith("ss_ema") for key in metadata)
    hashes = ("sshs_model_hash", "sshs_legacy_hash", "ss_training_finished_at")
    assert {key: value for key, value in ema_metadata.items() if not key.startswith("ss_ema") and key not in hashes} \
        == {key: value for key, value in metadata.items() if key not in hashes}
    assert ema_metadata["sshs_model_hash"] != metadata["sshs_model_hash"]  # the hash of its own tensors
    pipe = load_pipeline(tiny_models["sd1"])
    pipe.load_lora_weights(str(out / "lora-ema.safetensors"))  # diffusers reads kohya's format
    events = [event for event in events_of(out.parent) if event["type"] == "checkpoint"]
    assert [(event["kind"], Path(event["path"]).name) for event in events[-2:]] == \
        [("last", "lora.safetensors"), ("ema", "lora-ema.safetensors")]


@pytest.mark.slow
def test_instead_saves_the_ema_weights_and_the_state_keeps_the_trained_ones(lora_run, tiny_models, tmp_path):
    _, ema, out, _ = lora_run
    config = lora_config(tmp_path, tiny_models, ema={**ema, "save": "instead"},
                         saving={"save_every_n_steps": 0, "save_state_on_train_end": True})
    instead = run_trainer(config, tmp_path).session.output_dir
    assert sorted(path.name for path in instead.iterdir() if path.name.startswith("lora")) == \
        ["lora-state", "lora.safetensors"]
    saved = load_file(str(instead / "lora.safetensors"))
    averaged = load_file(str(out / "lora-ema.safetensors"))
    assert saved.keys() == averaged.keys() and all(torch.equal(saved[key], averaged[key]) for key in saved)
    with safe_open(str(instead / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_ema"] == "true"
    # The state resumes from the trained weights, not the EMA: they are the other run's lora.safetensors.
    state = load_file(str(instead / "lora-state" / "trained.safetensors"))
    trained = load_file(str(out / "lora.safetensors"))
    assert all(torch.equal(state[key], trained[key]) for key in trained)
    assert (instead / "lora-state" / "ema.safetensors").is_file()
    checkpoint = next(event for event in events_of(tmp_path) if event["type"] == "checkpoint")
    assert checkpoint["kind"] == "last" and checkpoint["ema"] is True


@pytest.mark.slow
@pytest.mark.parametrize("ema", [{"decay": 0.5, "warmup": True},
                                 # updates at steps 3 and 6: the state at step 4 lies between two of them
                                 {"decay": 0.5, "warmup": False, "update_every_n_steps": 3, "device": "cpu"}],
                         ids=["warmup", "every-3"])
def test_resume_continues_the_ema_exactly_and_retention_removes_ema_files(ema, tiny_models, tmp_path):
    """6 steps straight equal 4 steps, a state, and 2 resumed steps: the trained weights and the EMA alike."""
    straight = run_trainer(lora_config(tmp_path / "a", tiny_models, ema=ema, saving={"save_every_n_steps": 0}),
                                tmp_path / "a")
    parted = lora_config(tmp_path / "b", tiny_models, ema=ema,
                         saving={"save_every_n_steps": 2, "save_state": True, "save_last_n_steps": 2})
    first = run_trainer(parted, tmp_path / "b").session.output_dir
    # Retention: the step-2 save went with its EMA file and state once step 6 was saved.
    assert sorted(path.name for path in first.iterdir() if "step" in path.name) == [
        "lora-step00000004-ema.safetensors", "lora-step00000004-state", "lora-step00000004.safetensors",
        "lora-step00000006-ema.safetensors", "lora-step00000006-state", "lora-step00000006.safetensors"]
    state = first / "lora-step00000004-state"
    assert (state / "ema.safetensors").is_file()
    resumed = run_trainer(lora_config(tmp_path / "c", tiny_models, ema=ema, saving={
        "save_every_n_steps": 0, "resume": str(state)}), tmp_path / "c")
    assert resumed.ema.updates == straight.ema.updates == STEPS // ema.get("update_every_n_steps", 1)
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        expected = load_file(str(straight.session.output_dir / name))
        actual = load_file(str(resumed.session.output_dir / name))
        assert expected.keys() == actual.keys()
        assert all(torch.equal(actual[key], expected[key]) for key in expected), name


@pytest.mark.slow
def test_a_state_without_ema_resumes_and_starts_the_ema_again(tiny_models, tmp_path):
    first = run_trainer(lora_config(tmp_path / "a", tiny_models, ema={"decay": 0.5}, saving={
        "save_every_n_steps": 4, "save_state": True}), tmp_path / "a").session.output_dir
    state = first / "lora-step00000004-state"
    (state / "ema.safetensors").unlink()  # as a state saved before EMA existed, or by a run without it
    resumed = run_trainer(lora_config(tmp_path / "b", tiny_models, ema={"decay": 0.5}, saving={
        "save_every_n_steps": 0, "resume": str(state)}), tmp_path / "b")
    warning = next(event for event in events_of(tmp_path / "b") if event["type"] == "warning")
    assert "no EMA" in warning["message"] and warning["where"] == "saving.resume"
    assert resumed.ema.updates == 2  # steps 5 and 6: the first copied the resumed weights


def test_applied_swaps_the_ema_in_and_the_trained_weights_back_exactly():
    from engine.train.ema import WeightsEMA

    module = torch.nn.Linear(3, 2).to(torch.float16)  # trained weights in a half type; the EMA stays float32
    parameters = dict(module.named_parameters())
    ema = WeightsEMA(parameters, decay=0.9, warmup=False, every_n_steps=1, device=torch.device("cpu"))
    ema.after_step(1)
    start = module.weight.detach().float()
    with torch.no_grad():
        module.weight.add_(0.5)
    ema.after_step(2)
    trained = {name: value.detach().clone() for name, value in parameters.items()}
    expected = 0.9 * start + 0.1 * module.weight.float()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    with ema.applied():
        assert torch.equal(module.weight, ema.shadow["weight"].half())
    assert all(torch.equal(parameters[name], trained[name]) for name in trained)


def test_ema_names_follow_the_methods_modules():
    from engine.train.ema import named_trainable_parameters

    class Method:
        def __init__(self):
            self.first, self.second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
            self.second.bias.requires_grad_(False)

        def trainable_modules(self):
            return [self.first, self.second]

        def trainable_parameters(self):
            return [p for module in self.trainable_modules() for p in module.parameters() if p.requires_grad]

    assert list(named_trainable_parameters(Method())) == ["0.weight", "0.bias", "1.weight"]


@pytest.mark.slow
def test_samples_use_the_ema_weights_when_asked_and_training_goes_on_unchanged(lora_run, tiny_models, tmp_path):
    """Samples drawn with the EMA differ from those drawn with the trained weights of the same run, and putting the
    EMA in for sampling changes nothing in what the run trains and saves."""
    import numpy as np
    from PIL import Image

    _, ema, out, _ = lora_run
    sampling = {"sample_every_n_steps": 3, "sample_prompts": ["sks dog, red square --w 64 --h 64 --s 2 --d 5"]}
    images = {}
    for with_ema in (False, True):
        folder = tmp_path / str(with_ema)
        config = lora_config(folder, tiny_models, ema={**ema, "sample_with_ema": with_ema}, sampling=sampling)
        run_out = run_trainer(config, folder).session.output_dir
        samples = [event for event in events_of(folder) if event["type"] == "sample"]
        assert [event["step"] for event in samples] == [3, 6]
        images[with_ema] = [np.asarray(Image.open(event["images"][0]["path"])) for event in samples]
        for name in ("lora.safetensors", "lora-ema.safetensors"):  # the same as the run that drew no samples
            expected, actual = load_file(str(out / name)), load_file(str(run_out / name))
            assert all(torch.equal(actual[key], expected[key]) for key in expected), name
    assert all(not np.array_equal(plain, averaged) for plain, averaged in zip(images[False], images[True],
                                                                              strict=True))


@pytest.mark.slow
def test_the_memory_plan_counts_the_ema_copy_where_it_is_kept(tiny_models, tmp_path):
    from engine.plan import make_plan

    traces: dict = {}
    plans = {}
    for device in ("gpu", "cpu"):
        config = load_config(lora_config(tmp_path / device, tiny_models, ema={"device": device}),
                             check_packages=False)
        plans[device] = make_plan(config, tmp_path, gpu_capacity=None, traces=traces)
    for device, where in (("gpu", "gpu"), ("cpu", "host")):
        items = {item.name: item for item in plans[device].items}
        ema = items["EMA of the trained weights"]
        assert ema.where == where and ema.bytes == items["trained weights (LoRA)"].bytes > 0  # float32 both
    assert plans["cpu"].total("gpu") < plans["gpu"].total("gpu")
