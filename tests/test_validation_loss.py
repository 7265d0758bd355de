"""The validation loss on tiny models: fixed work (bit-identical twice), lower once trained, reported as events and
beside the checkpoints, keep_best retention, and no effect on what training does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import assert_same_tensors, events_of, stop_by_sigterm_then_resume, train_here, write_config

from engine.config.io import load_config

HELD_OUT = {"dataset": {"general": {"validation_split": 0.34, "validation_seed": 1}}}  # 2 of the 6 tiny images


def build_trainer(config_path: Path, run_dir: Path):
    from engine.rundir.control import ControlChannel
    from engine.train.build import build_session
    from engine.train.reporting import RunLog
    from engine.train.trainer import Trainer

    config = load_config(config_path, check_packages=False)
    log = RunLog(run_dir)
    session = build_session(config, config_path.parent, run_dir, log)
    return Trainer(session, ControlChannel(run_dir)), log


@pytest.fixture(scope="module")
def sd1_validated(tiny_models, tmp_path_factory):
    """An SD1 LoRA run at a high learning rate with validation every 5 steps and keep_best; the untrained loss is
    measured twice before it trains and the trained one twice after."""
    folder = tmp_path_factory.mktemp("validated")
    config = write_config(folder / "config.toml", tiny_models, "sd1", **HELD_OUT,
                          training={"max_train_steps": 20}, optimizer={"learning_rate": 1e-2},
                          validation={"validate_every_n_steps": 5},
                          saving={"save_every_n_steps": 5, "save_last_n_steps": 5, "keep_best": True})
    trainer, log = build_trainer(config, folder / "out")
    try:
        untrained = [trainer.evaluate_trained_weights() for _ in range(2)]
        outcome = trainer.run()
        trained = [trainer.evaluate_trained_weights() for _ in range(2)]
    finally:
        log.close()
    assert outcome.status == "finished", outcome
    return folder / "out", untrained, trained, trainer


@pytest.mark.slow
def test_the_same_weights_give_the_same_loss_bit_for_bit_and_training_lowers_it(sd1_validated):
    _, untrained, trained, trainer = sd1_validated
    assert untrained[0] == untrained[1] and trained[0] == trained[1]  # every field, floats compared exactly
    assert untrained[0].images == 2 and sorted(untrained[0].by_timestep) == [200, 400, 600, 800]
    assert trained[0].loss < untrained[0].loss, (trained[0].loss, untrained[0].loss)
    # The modules are back in train mode after a pass.
    assert all(module.training for module in trainer.session.method.trainable_modules())


@pytest.mark.slow
def test_validation_events_and_the_record_beside_the_checkpoints(sd1_validated):
    out, _, trained, _ = sd1_validated
    events = events_of(out)
    validations = [event for event in events if event["type"] == "validation"]
    assert [event["step"] for event in validations] == [5, 10, 15, 20, 20]  # the last one for the final save
    for event in validations:
        assert set(event["by_timestep"]) == {"200", "400", "600", "800"} and event["images"] == 2
        assert math.isclose(event["loss"], sum(event["by_timestep"].values()) / 4, rel_tol=1e-12)
    assert validations[-1]["loss"] == trained[0].loss  # the final weights, the same work
    assert [event.get("checkpoint") for event in validations] == [
        str(out / name) for name in ("lora-step00000005.safetensors", "lora-step00000010.safetensors",
                                     "lora-step00000015.safetensors", "lora-step00000020.safetensors",
                                     "lora.safetensors")]
    record = json.loads((out / "lora-validation.json").read_text(encoding="utf-8"))
    assert record["timesteps"] == [200, 400, 600, 800]
    assert [entry["loss"] for entry in record["checkpoints"]] == [event["loss"] for event in validations]
    kept = [entry for entry in record["checkpoints"] if not entry["removed"]]
    assert record["best"] == min(kept, key=lambda entry: entry["loss"])
    assert Path(record["best"]["path"]).exists()
    for entry in record["checkpoints"]:
        assert Path(entry["path"]).exists() == (not entry["removed"])


def test_keep_best_keeps_the_lowest_loss_past_the_retention_window(tiny_models, tmp_path):
    """Retention keeps the last 2 steps' saves; the losses given to the tracker make step 2 the best until step 8."""
    from engine.train.validation import ValidationResult

    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", **HELD_OUT,
                          training={"max_train_steps": 10},
                          saving={"save_every_n_steps": 2, "save_last_n_steps": 2, "keep_best": True})
    out = tmp_path / "out"
    trainer, log = build_trainer(config, out)
    losses = {2: 0.5, 4: 0.9, 6: 0.8, 8: 0.4, 10: 0.7}

    def scripted() -> ValidationResult:  # the loss each save is told, so the retention under test is exact
        step = trainer.position.global_step
        return ValidationResult(losses[step], {200: losses[step]}, 2, 1)

    trainer.validation.validator.evaluate = scripted
    try:
        seen = []
        original = trainer._retire_steps

        def retire_and_look(step: int) -> None:
            original(step)
            seen.append((step, sorted(path.name for path in out.glob("lora-step*.safetensors"))))

        trainer._retire_steps = retire_and_look
        assert trainer.run().status == "finished"
    finally:
        log.close()
    names = {step: [f"lora-step{s:08d}.safetensors" for s in kept] for step, kept in
             {2: [2], 4: [2, 4], 6: [2, 4, 6], 8: [6, 8], 10: [8, 10]}.items()}
    # Step 6 retires step 2 but spares it (the best so far); step 8 is better, so it goes with step 4 there.
    assert seen == list(names.items())
    record = json.loads((out / "lora-validation.json").read_text(encoding="utf-8"))
    assert record["best"]["path"] == str(out / "lora-step00000008.safetensors")


@pytest.mark.slow
def test_validation_changes_nothing_training_does_and_resumes_exactly(tiny_models, tmp_path):
    # Without a latent cache the VAE samples from the global generator, so validation must leave it as it was.
    common = {"training": {"max_train_steps": 12, "cache_latents": False}, "network": {"network_dropout": 0.1},
              "dataset": {"general": {"validation_split": 0.34, "flip_aug": True}}}
    plain = write_config(tmp_path / "plain" / "config.toml", tiny_models, **common,
                         validation={"validate_every_n_epochs": 0})
    validated_sections = {**common, "validation": {"validate_every_n_steps": 2}, "saving": {"save_every_n_steps": 4},
                          "logging": {"logging_dir": "logs"}}
    validated = write_config(tmp_path / "validated" / "config.toml", tiny_models, **validated_sections)
    for config in (plain, validated):
        train_here(config)
    assert not [event for event in events_of(tmp_path / "plain" / "out") if event["type"] == "validation"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = list((tmp_path / "validated" / "logs").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(logs[0].parent), size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = {event.step: event.value for event in accumulator.Scalars("loss/validation")}
    passes = {e["step"]: e["loss"] for e in events_of(tmp_path / "validated" / "out") if e["type"] == "validation"}
    assert logged.keys() == passes.keys() and all(math.isclose(logged[s], passes[s], rel_tol=1e-6) for s in logged)
    assert {"loss/validation_t200", "loss/validation_t800"} <= set(accumulator.Tags()["scalars"])
    assert_same_tensors(tmp_path / "plain" / "out" / "lora.safetensors",
                        tmp_path / "validated" / "out" / "lora.safetensors", rtol=0, atol=0)
    parted = write_config(tmp_path / "parted" / "config.toml", tiny_models, **validated_sections)
    run_dir = tmp_path / "parted" / "out"
    stop_by_sigterm_then_resume(parted, run_dir, total_steps=12)
    assert_same_tensors(tmp_path / "validated" / "out" / "lora.safetensors", run_dir / "lora.safetensors",
                        rtol=0, atol=0)
    whole = {e["step"]: e["loss"] for e in events_of(tmp_path / "validated" / "out") if e["type"] == "validation"}
    resumed = {e["step"]: e["loss"] for e in events_of(run_dir) if e["type"] == "validation"}
    # A stop saves at once without validating, so the step it stopped at may lack its pass; the others are equal.
    assert resumed.items() <= whole.items() and len(resumed) >= len(whole) - 1, (resumed, whole)


def test_the_network_is_in_eval_mode_during_the_pass(tiny_models, tmp_path):
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", **HELD_OUT, network={"network_dropout": 0.5})
    trainer, log = build_trainer(config, tmp_path / "out")
    modes = []
    try:
        method = trainer.session.method
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a trained-looking network: with lora_up at zero, dropout would change nothing
            for lora in method.network.all_loras():
                lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.1)
        validator = trainer.validation.validator
        evaluate = validator.evaluate

        def noting_modes():
            modes.append({module.training for module in method.trainable_modules()})
            return evaluate()

        validator.evaluate = noting_modes
        first = trainer.evaluate_trained_weights()
        second = trainer.evaluate_trained_weights()
    finally:
        log.close()
    assert modes[0] == {False}
    assert first == second  # network dropout 0.5 would differ between passes in train mode
    assert all(module.training for module in method.trainable_modules())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_flow_matching_validation_is_fixed_work_and_falls_with_training(family, tiny_models, tmp_path):
    """FLUX.1 and SD3 evaluate at the fixed σ = t/1000 too (sd-scripts' FLUX path draws random σ instead)."""
    from test_train_flux import flux_config
    from test_train_sd3 import sd3_config

    make = flux_config if family == "flux1" else sd3_config
    config = make(tmp_path / "config.toml", tiny_models,
                  dataset={"general": {"bucket_reso_steps": 16, "validation_split": 0.34, "validation_seed": 1}},
                  training={"max_train_steps": 10}, optimizer={"learning_rate": 1e-2, "lr_scheduler": "constant"},
                  validation={"validate_every_n_epochs": 0})
    trainer, log = build_trainer(config, tmp_path / "out")
    try:
        untrained = [trainer.evaluate_trained_weights() for _ in range(2)]
        assert trainer.run().status == "finished"
        trained = [trainer.evaluate_trained_weights() for _ in range(2)]
    finally:
        log.close()
    assert untrained[0] == untrained[1] and trained[0] == trained[1]
    assert untrained[0].images == 2 and sorted(untrained[0].by_timestep) == [200, 400, 600, 800]
    assert len(set(untrained[0].by_timestep.values())) == 4  # each σ its own loss
    assert trained[0].loss < untrained[0].loss, (trained[0].loss, untrained[0].loss)


@pytest.mark.slow
def test_two_processes_validate_every_held_out_image_once(tiny_models, tmp_path):
    """Under `accelerate launch` (two CPU processes, gloo) each process takes every other validation batch and the
    sums are added: the same images and loss as one process with the doubled batch."""
    import subprocess

    from train_helpers import REPO, engine_env

    from engine.rundir.launch import launch_command

    sections = {**HELD_OUT, "training": {"max_train_steps": 4}, "validation": {"validate_every_n_steps": 2}}
    general = HELD_OUT["dataset"]["general"]
    single = write_config(tmp_path / "single" / "config.toml", tiny_models, "sd1",
                          **{**sections, "dataset": {"general": {**general, "batch_size": 2}}})
    train_here(single)
    pair = write_config(tmp_path / "pair" / "config.toml", tiny_models, "sd1",
                        **{**sections, "dataset": {"general": {**general, "batch_size": 1}}},
                        launch={"num_processes": 2, "multi_gpu": True, "main_process_port": 29527})
    result = subprocess.run(launch_command(load_config(pair), pair), cwd=REPO, env=engine_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    passes = {name: [event for event in events_of(tmp_path / name / "out") if event["type"] == "validation"]
              for name in ("single", "pair")}
    # The main process alone reports: steps 2 and 4, and step 4's loss again for the final file.
    assert [event["step"] for event in passes["pair"]] == [2, 4, 4]
    for one, two in zip(passes["single"], passes["pair"], strict=True):
        assert one["step"] == two["step"] and one["images"] == two["images"] == 2
        assert two["batches"] == 2 and one["batches"] == 1
        # Batches of one image and of two run the same maths in another order: equal to rounding.
        assert math.isclose(one["loss"], two["loss"], rel_tol=1e-3), (one["loss"], two["loss"])


@pytest.mark.slow
def test_validation_with_the_ema_weights(tiny_models, tmp_path):
    """ema.validate_with_ema: the first EMA update copies the weights, so step 1's loss is the trained weights'; later
    the averaged weights give other losses; training itself is the same either way."""
    runs = {}
    for with_ema in (False, True):
        folder = tmp_path / f"ema-{with_ema}"
        folder.mkdir()
        config = write_config(folder / "config.toml", tiny_models, "sd1", **HELD_OUT,
                              training={"max_train_steps": 3}, optimizer={"learning_rate": 1e-2},
                              validation={"validate_every_n_steps": 1},
                              ema={"enabled": True, "decay": 0.5, "validate_with_ema": with_ema})
        trainer, log = build_trainer(config, folder / "out")
        try:
            assert trainer.run().status == "finished"
        finally:
            log.close()
        runs[with_ema] = [event["loss"] for event in events_of(folder / "out") if event["type"] == "validation"]
    plain, averaged = runs[False], runs[True]
    assert len(plain) == len(averaged) >= 3
    assert averaged[0] == plain[0]
    assert all(a != p for a, p in zip(averaged[1:3], plain[1:3], strict=True)), (plain, averaged)
    assert_same_tensors(tmp_path / "ema-False" / "out" / "lora.safetensors",
                        tmp_path / "ema-True" / "out" / "lora.safetensors", rtol=0, atol=0)
