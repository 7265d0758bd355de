"""The training step queues its work without waiting for the device: no value is read back to the host before the
backward pass (issue 18). On a GPU such a read (`.item()`, `float()`, `bool()` of a tensor, or a plain copy to the
device from ordinary CPU memory) makes the CPU wait for the forward pass before it can queue the backward.

Every aten call of a real training run on the tiny models is recorded by a dispatch mode, with the start of each
micro-batch and of each backward pass: between a micro-batch's start and its backward there must be no host read
and no blocking host-to-device copy. The update's single read of the losses (after backward, for the NaN check and
the reported loss) must be there, which also shows that the recorder sees reads at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_flux import flux_config
from test_train_sd3 import sd3_config
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import train_in_process, write_config

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}
# Options whose code runs inside the step: noise offset and input perturbation with random strengths, min-SNR and
# debiased weights, a Huber loss with the SNR schedule, and a dataset's network multiplier.
SD_OPTIONS = {"noise_offset": 0.05, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.01,
              "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True, "min_snr_gamma": 5.0,
              "debiased_estimation_loss": True, "loss_type": "huber", "huber_schedule": "snr"}


class StepRecorder(TorchDispatchMode):
    """Notes host reads and blocking host-to-device copies, in order with the marks the test adds."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def mark(self, name: str) -> None:
        self.events.append((name, ""))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in HOST_READS:
            self.events.append(("read", str(func)))
        elif func is aten._to_copy.default and _blocking_upload(args[0], kwargs):
            self.events.append(("upload", _engine_caller()))
        return func(*args, **kwargs)


def _engine_caller() -> str:
    """Where in the engine a copy was asked for (the innermost engine frame), to name it in a failure."""
    import traceback

    frames = [frame for frame in traceback.extract_stack() if "/engine/" in frame.filename]
    return f"{frames[-1].filename.split('/engine/')[-1]}:{frames[-1].lineno}" if frames else "outside the engine"


def _blocking_upload(source: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    target = kwargs.get("device")
    return (source.device.type == "cpu" and target is not None and torch.device(target).type != "cpu"
            and not kwargs.get("non_blocking", False))


def _record_run(config_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    recorder = StepRecorder()
    train_in_process(config_path, monkeypatch, recorder, on_micro_batch=lambda: recorder.mark("micro-batch"),
                     on_update=lambda: recorder.mark("update"), on_backward=lambda: recorder.mark("backward"))
    return recorder.events


def _check(events: list[tuple[str, str]], micro_batches: int, updates: int) -> None:
    starts = [index for index, (name, _) in enumerate(events) if name == "micro-batch"]
    assert len(starts) == micro_batches and sum(name == "update" for name, _ in events) == updates
    for start in starts:
        backward = next(index for index in range(start, len(events)) if events[index][0] == "backward")
        waits = [event for event in events[start:backward] if event[0] in ("read", "upload")]
        assert not waits, f"the step waits for the device before backward: {waits}"
    for index, (name, _) in enumerate(events):
        if name == "update":  # the losses were read once since the last backward
            last_backward = max(i for i in range(index) if events[i][0] == "backward")
            assert any(event[0] == "read" for event in events[last_backward:index])


def test_sd_step_reads_nothing_back_before_backward(tiny_models, tmp_path, monkeypatch):
    folder = str(tiny_models["dataset_img"] / "10_sks dog")
    dataset = {"train_data_dir": "", "datasets": [
        {"batch_size": 4, "enable_bucket": False, "network_multiplier": 0.5,
         "subsets": [{"image_dir": folder, "num_repeats": 1}]},
    ]}
    config = write_config(tmp_path / "config.toml", tiny_models, "sdxl", dataset=dataset,
                          training={"max_train_steps": 2, "gradient_accumulation_steps": 2, **SD_OPTIONS})
    _check(_record_run(config, monkeypatch), micro_batches=4, updates=2)


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_flow_steps_read_nothing_back_before_backward(family, tiny_models, tmp_path, monkeypatch):
    training: dict[str, Any] = {"max_train_steps": 2}
    if family == "flux1":
        training.update(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
        config = flux_config(tmp_path / "config.toml", tiny_models, training=training)
    else:
        config = sd3_config(tmp_path / "config.toml", tiny_models, training=training)
    _check(_record_run(config, monkeypatch), micro_batches=2, updates=2)
