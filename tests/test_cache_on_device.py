"""training.cache_on_device: the caches are converted once to tensors on the run's device and batches are stacked
from them, and the run trains exactly as with the caches in system memory (issue 18). On this CPU machine the
device is the CPU, so this checks the conversion and that every later step uses it; GPU residency is the same code
with another device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_config

pytestmark = pytest.mark.slow

CACHES = {"cache_latents": True, "cache_text_encoder_outputs": True, "max_train_steps": 4}


def _run(tmp_path: Path, tiny_models: dict[str, Path], name: str, on_device: bool) -> tuple[Path, Any]:
    from accelerate.state import AcceleratorState

    from engine.config.io import load_config
    from engine.rundir.control import ControlChannel
    from engine.train.build import build_session
    from engine.train.reporting import RunLog
    from engine.train.trainer import Trainer

    AcceleratorState._reset_state(True)
    folder = tmp_path / name
    folder.mkdir()
    path = write_config(folder / "config.toml", tiny_models, "sdxl", network={"train_unet_only": True},
                        training={**CACHES, "cache_on_device": on_device})
    log = RunLog(folder / "run")
    try:
        session = build_session(load_config(path, check_packages=False), folder, folder / "run", log)
        assert Trainer(session, ControlChannel(folder / "run")).run().status == "finished"
    finally:
        log.close()
    return folder / "out" / "lora.safetensors", session.dataset


def test_caches_kept_on_the_device_train_as_the_ones_in_system_memory(tiny_models, tmp_path):
    in_memory, plain_dataset = _run(tmp_path, tiny_models, "memory", on_device=False)
    on_device, device_dataset = _run(tmp_path, tiny_models, "device", on_device=True)
    latents = next(iter(device_dataset.latents.values()))
    text = next(iter(device_dataset.texts.values()))
    assert isinstance(latents.latents, torch.Tensor) and latents.latents.dtype == torch.float32
    assert isinstance(text.hidden_states, torch.Tensor) and isinstance(text.pooled, torch.Tensor)
    assert not isinstance(next(iter(plain_dataset.latents.values())).latents, torch.Tensor)
    expected, actual = load_file(in_memory), load_file(on_device)
    assert expected.keys() == actual.keys()
    if torch.cuda.is_available():
        # CUDA's backward kernels sum in no fixed order, so equal runs differ in the last bits, and four AdamW steps
        # (which divide by the gradients' scale) grow that to ~7e-4 in 2 % of the weights (H200, 2026-12-04).
        for key, tensor in expected.items():
            torch.testing.assert_close(actual[key], tensor, rtol=1e-2, atol=2e-3)
    else:
        assert all(torch.equal(actual[key], tensor) for key, tensor in expected.items())
