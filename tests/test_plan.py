"""`python -m engine plan` (issue 16): the plan of a tiny run is within 15 % of the peak memory the real run reaches
on this CPU; the traced LoRA is the one the engine trains; the real-size traces run on the CPU (fake tensors); the
CLI says whether a run fits a card and what to change.

On a CPU the "device" is the CPU: the measured peak is the denoiser's weights plus every storage the training steps
make and still hold at their worst moment (activations, gradients, optimizer state), counted by a dispatch mode
written here independently of the planner's own tracer.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from train_helpers import run_engine, write_config

pytestmark = pytest.mark.slow


class _LiveBytes(TorchDispatchMode):
    def __init__(self, resident: set[int]) -> None:
        super().__init__()
        self.resident, self.sizes, self.now, self.peak = resident, {}, 0, 0

    def _add(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = storage._cdata
            if key not in self.sizes and key not in self.resident:
                self.sizes[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._drop, key)

    def _drop(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tree_map(self._add, out)
        return out


def track_run(config_path: Path, on_device: Any) -> tuple[Any, list[torch.Tensor], int]:
    """Train the run for real on the CPU: (its session, the tensors of the modules `on_device(session)` names, which
    a GPU would hold before the first step, and the steps' peak of live storages beyond them)."""
    from accelerate.state import AcceleratorState

    from engine.config.io import load_config
    from engine.rundir.control import ControlChannel
    from engine.train.build import build_session
    from engine.train.reporting import RunLog
    from engine.train.trainer import Trainer

    AcceleratorState._reset_state(True)
    out = config_path.parent / "out"
    log = RunLog(out)
    try:
        session = build_session(load_config(config_path, check_packages=False), config_path.parent, out, log)
        tensors = list({id(t): t for module in on_device(session)
                        for t in (*module.parameters(), *module.buffers())}.values())
        trainer = Trainer(session, ControlChannel(out))
        tracker = _LiveBytes({t.untyped_storage()._cdata for t in tensors})
        with tracker:
            assert trainer.run().status == "finished"
    finally:
        log.close()
    return session, tensors, tracker.peak


def _measured_peak(config_path: Path) -> int:
    """The denoiser's resident weights plus the training steps' peak of live storages, in a real run on the CPU."""
    # What a GPU would hold: the denoiser, and the text encoders when their outputs are not cached.
    _, tensors, peak = track_run(config_path, lambda session: [
        session.model.unet, *([] if session.text_cached else session.model.text.encoders)])
    frozen = sum(t.numel() * t.element_size() for t in tensors
                 if isinstance(t, torch.nn.Parameter) and not t.requires_grad)
    return frozen + peak


@pytest.mark.parametrize("family, network, training", [
    ("sd1", {"train_unet_only": True}, {"cache_text_encoder_outputs": True}),
    ("sdxl", {"train_unet_only": True}, {"cache_text_encoder_outputs": True, "gradient_checkpointing": True}),
    # The LoRA trains both of SDXL's text encoders: their LoRA, gradients and activations are traced too.
    ("sdxl", {}, {}),
])
def test_the_plan_of_a_tiny_run_is_within_15_percent_of_its_measured_peak(family, network, training, tiny_models,
                                                                          tmp_path):
    from engine.config.io import load_config
    from engine.plan import make_plan

    config_path = write_config(tmp_path / "config.toml", tiny_models, family, network=network,
                               training={"max_train_steps": 3, **training})
    plan = make_plan(load_config(config_path, check_packages=False), tmp_path)
    measured = _measured_peak(config_path)
    print(f"{family}: planned {plan.gpu_peak} bytes, measured {measured} bytes")
    assert abs(plan.gpu_peak - measured) <= 0.15 * measured, (plan.gpu_peak, measured, plan.as_dict())


def test_the_traced_lora_is_the_one_the_engine_trains(tiny_models, tmp_path):
    from engine.config.io import load_config
    from engine.models.loading import load_model
    from engine.networks.lora import create_lora_network
    from engine.plan import make_plan

    config_path = write_config(tmp_path / "config.toml", tiny_models, "sdxl", network={"train_unet_only": True,
                               "network_dim": 8, "conv_dim": 4})
    plan = make_plan(load_config(config_path, check_packages=False), tmp_path)
    model = load_model(tiny_models["sdxl"], family="sdxl")
    network = create_lora_network(model.unet, model.text.encoders, "sdxl", dim=8, alpha=4.0, conv_dim=4,
                                  train_text_encoder=False)
    expected = sum(p.numel() for p in network.parameters()) * 4
    assert next(item.bytes for item in plan.items if item.name == "trained weights (LoRA)") == expected


def _real_size(family: str, **training: Any) -> Any:
    from engine.config.io import deep_merge, default_config_dict
    from engine.config.schema import RunConfig

    data = deep_merge(default_config_dict(), {
        "model": {"pretrained_model_name_or_path": "not/local", "model_family": family},
        "network": {"network_dim": 16, "network_alpha": 16.0, "train_unet_only": True},
        "dataset": {"train_data_dir": "/nowhere", "general": {"resolution": 1024, "batch_size": 1}},
        "training": {"mixed_precision": "bf16", "cache_latents": True, "cache_text_encoder_outputs": True,
                     **training}})
    return RunConfig.model_validate(data, context={"check_packages": False})


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux1"])
def test_real_size_steps_trace_on_the_cpu_and_checkpointing_shrinks_them(family, tmp_path):
    """Fake tensors: the 12 B-parameter FLUX.1 transformer traces at 1024 px with no memory allocated."""
    from engine.plan import make_plan

    def step(plan: Any) -> int:
        return next(item.bytes for item in plan.items if item.name.startswith("the step"))

    plain = make_plan(_real_size(family), tmp_path, gpu_capacity=None)
    checkpointed = make_plan(_real_size(family, gradient_checkpointing=True), tmp_path, gpu_capacity=None)
    weights = next(item.bytes for item in plain.items if item.name == "denoiser weights (frozen)")
    parameters = {"sd1": 859_520_964, "sdxl": 2_567_463_684, "flux1": 11_901_408_320}[family]  # the published sizes
    assert weights == parameters * 2  # bf16
    assert 0 < step(checkpointed) < step(plain) / 2


def _cli(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = run_engine("plan", str(config), "--json", *args)
    assert result.returncode in (0, 3), result.stdout + result.stderr
    return result.returncode, json.loads(result.stdout)


def test_cli_says_a_run_fits_a_large_card_and_not_a_tiny_one(tiny_models, tmp_path):
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1")
    code, plan = _cli(config, "--gpu-memory", "80GiB")
    assert code == 0 and plan["fits"] is True and plan["gpu_capacity_bytes"] == 80 * 1024**3
    assert {"denoiser weights (frozen)", "optimizer state"} <= {item["name"] for item in plan["items"]}
    code, plan = _cli(config, "--gpu-memory", "0.5GiB")
    assert code == 3 and plan["fits"] is False


def test_cli_fit_proposes_changes_in_order_of_cost(tiny_models, tmp_path):
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1",
                          training={"cache_latents": False, "gradient_checkpointing": False})
    _, result = _cli(config, "--gpu-memory", "0.6GiB", "--fit")  # under the context alone: every change is listed
    keys = [change["key"] for change in result["changes"]]
    assert keys[:2] == ["training.cache_latents", "training.gradient_checkpointing"], keys
    needed = [change["gpu_needed_bytes"] for change in result["changes"]]
    assert needed == sorted(needed, reverse=True), needed  # each change keeps or lowers the need
    assert result["plan"]["gpu_needed_bytes"] == needed[-1]


def test_cli_fit_without_a_gpu_or_a_size_says_what_to_give(tiny_models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is detected here")
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1")
    result = run_engine("plan", str(config), "--fit")
    assert result.returncode == 2 and "--gpu-memory" in result.stderr


def test_a_gpu_run_that_does_not_fit_warns_at_start_with_the_changes(tiny_models, tmp_path):
    from train_helpers import events_of

    from engine.config.io import load_config
    from engine.plan import GIB
    from engine.train.memory_check import memory_plan_check
    from engine.train.reporting import RunLog

    config = load_config(write_config(tmp_path / "config.toml", tiny_models, "sd1",
                                      training={"gradient_checkpointing": False}), check_packages=False)
    log = RunLog(tmp_path / "run")
    try:
        assert memory_plan_check(config, tmp_path, log, device_type="cpu") is None  # no card to fit
        roomy = memory_plan_check(config, tmp_path, log, device_type="cuda", capacity=80 * GIB)
        tight = memory_plan_check(config, tmp_path, log, device_type="cuda", capacity=int(0.6 * GIB))
    finally:
        log.close()
    assert roomy["fits"] is True and tight["fits"] is False and tight["gpu_needed_bytes"] > 0.6 * GIB
    warnings = [event for event in events_of(tmp_path / "run") if event["type"] == "warning"]
    assert len(warnings) == 1 and "run out of GPU memory" in warnings[0]["message"]
    assert "training.gradient_checkpointing = True" in warnings[0]["hint"]


def test_the_traced_step_holds_one_gradient_per_trained_weight(tiny_models, tmp_path):
    """Gradients: every trained LoRA weight gets one, in its own dtype (float32, or bf16 with full_bf16)."""
    from engine.config.io import load_config
    from engine.plan.architecture import build_architecture
    from engine.plan.trace import StepShape, trace_step

    for full_bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        config = load_config(write_config(tmp_path / "config.toml", tiny_models, "sd1",
                                          training={"mixed_precision": "bf16", "full_bf16": full_bf16}),
                             check_packages=False)
        architecture = build_architecture(config, tiny_models["sd1"])
        traced = trace_step(config, "sd1", architecture.denoiser, StepShape(2, 64, 64, 77),
                            frozen_dtype=torch.bfloat16, trained_dtype=dtype)
        assert traced.gradient_bytes == traced.trained_bytes == traced.trained_parameters * dtype.itemsize > 0
        assert traced.peak_bytes > traced.gradient_bytes


def test_plans_of_one_run_share_its_traced_step_until_the_step_changes(tiny_models, tmp_path):
    """Fit to my GPU plans many variations of one run: caches and the optimizer leave the step as it was traced."""
    from engine.config.io import load_config
    from engine.plan import make_plan
    from engine.plan.trace import TracedStep

    def plan(name: str, **sections: Any) -> Any:
        config = load_config(write_config(tmp_path / f"{name}.toml", tiny_models, "sd1", **sections),
                             check_packages=False)
        return make_plan(config, tmp_path, gpu_capacity=None, traces=traces)

    def steps_traced() -> int:  # the dict keeps the VAE's traces too
        return sum(isinstance(traced, TracedStep) for traced in traces.values())

    def step_item(plan: Any) -> Any:
        return next(item for item in plan.items if item.name.startswith("the step"))

    traces: dict = {}
    first = plan("a")
    other_optimizer = plan("b", optimizer={"optimizer_type": "AdamW8bit"}, training={"cache_latents": False})
    assert steps_traced() == 1
    assert step_item(first) == step_item(other_optimizer)  # the same traced step
    assert first.total("gpu") != other_optimizer.total("gpu")  # the optimizer's state and the VAE still differ
    plan("c", training={"gradient_checkpointing": True})
    assert steps_traced() == 2


def _measured_sampling_peak(config_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """The peak of live storages while the run draws its samples on this CPU, beyond every model's own weights."""
    from accelerate.state import AcceleratorState

    from engine.config.io import load_config
    from engine.rundir.control import ControlChannel
    from engine.train import sample_hooks
    from engine.train.build import build_session
    from engine.train.reporting import RunLog
    from engine.train.trainer import Trainer

    AcceleratorState._reset_state(True)
    out = config_path.parent / "out"
    log = RunLog(out)
    peaks = []
    draw = sample_hooks.sample_now
    try:
        session = build_session(load_config(config_path, check_packages=False), config_path.parent, out, log)
        model = session.model
        modules = [model.unet, model.vae.vae, *model.text.encoders]
        resident = {t.untyped_storage()._cdata for module in modules for t in (*module.parameters(), *module.buffers())}

        def observed(*args: Any, **kwargs: Any) -> Any:
            tracker = _LiveBytes(resident)
            with tracker:
                drawn = draw(*args, **kwargs)
            peaks.append(tracker.peak)
            return drawn

        monkeypatch.setattr(sample_hooks, "sample_now", observed)
        assert Trainer(session, ControlChannel(out)).run().status == "finished"
    finally:
        log.close()
    assert peaks, "the run drew no samples"
    return max(peaks)


def test_samples_are_planned_from_traces_of_the_denoiser_and_the_vae_decoder(tiny_models, tmp_path, monkeypatch):
    """A run that draws samples gets a plan item for them; the traced working memory of sampling (the denoiser
    without gradients at the sample size with CFG, or the VAE decoding) is within 15 % of what sampling holds at its
    peak on this CPU. A run without samples gets no such item."""
    from engine.config.io import load_config
    from engine.models.vae import vae_dtype
    from engine.plan import make_plan
    from engine.plan.architecture import build_architecture
    from engine.plan.sampling import sample_shape, trace_vae_decode
    from engine.plan.trace import trace_step

    sampling = {"sample_at_first": True, "sample_prompts": ["a photo --w 128 --h 96 --s 2 --l 7 --d 1"]}
    config_path = write_config(tmp_path / "config.toml", tiny_models, "sd1", network={"train_unet_only": True},
                               training={"max_train_steps": 1, "cache_text_encoder_outputs": True,
                                         "cache_latents": True}, sampling=sampling)
    config = load_config(config_path, check_packages=False)
    plan = make_plan(config, tmp_path)
    assert "samples, beyond the step" in {item.name for item in plan.items}
    without = load_config(write_config(tmp_path / "plain.toml", tiny_models, "sd1", network={"train_unet_only": True},
                                       training={"max_train_steps": 1}), check_packages=False)
    assert "samples, beyond the step" not in {item.name for item in make_plan(without, tmp_path).items}

    architecture = build_architecture(config, tiny_models["sd1"])
    shape = sample_shape(config, tmp_path, "sd1", 77)
    assert (shape.batch_size, shape.width, shape.height) == (2, 128, 96)  # CFG: the prompt and the negative one
    traced = trace_step(config, "sd1", architecture.denoiser, shape, frozen_dtype=torch.float32,
                        trained_dtype=torch.float32, sample_shape=shape)
    decode = trace_vae_decode(architecture.vae_config, shape, vae_dtype(False, "cpu", torch.float32))
    planned = max(traced.sampling_bytes, decode)
    measured = _measured_sampling_peak(config_path, monkeypatch)
    print(f"samples: denoiser {traced.sampling_bytes}, decoder {decode}, measured {measured} bytes")
    assert abs(planned - measured) <= 0.15 * measured, (traced.sampling_bytes, decode, measured)
