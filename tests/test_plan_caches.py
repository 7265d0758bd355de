"""training.cache_on_device in the memory plan (issue 16): the GPU bytes the plan counts for the caches are the bytes
of the cached tensors a real run of the tiny model puts on its device (on this CPU machine the device is the CPU;
the conversion is the same code). The per-entry arithmetic is checked by hand in
tests/unit/test_plan_arithmetic.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import write_config

pytestmark = pytest.mark.slow

CACHES = {"cache_latents": True, "cache_text_encoder_outputs": True, "cache_on_device": True}


def _config(family: str, tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    if family == "flux1":
        from test_train_flux import flux_config

        return flux_config(tmp_path / "config.toml", tiny_models, network={"train_unet_only": True},
                           training=CACHES)
    return write_config(tmp_path / "config.toml", tiny_models, family, network={"train_unet_only": True},
                        dataset={"general": {"flip_aug": True}}, training=CACHES)


def _device_tensor_bytes(config_path: Path) -> tuple[int, int]:
    """(latents, text outputs): the nbytes of every cached tensor the built run holds on its device."""
    from accelerate.state import AcceleratorState

    from engine.config.io import load_config
    from engine.train.build import build_session
    from engine.train.reporting import RunLog

    AcceleratorState._reset_state(True)
    log = RunLog(config_path.parent / "run")
    try:
        session = build_session(load_config(config_path, check_packages=False), config_path.parent,
                                config_path.parent / "run", log)
    finally:
        log.close()

    def nbytes(*values: Any) -> int:
        assert all(value is None or isinstance(value, torch.Tensor) for value in values)  # converted for the device
        return sum(value.nbytes for value in values if value is not None)

    dataset = session.dataset
    latents = sum(nbytes(entry.latents, entry.latents_flipped, entry.alpha_mask) for entry in dataset.latents.values())
    texts = sum(nbytes(entry.hidden_states, entry.pooled, entry.mask) for entry in dataset.texts.values())
    return latents, texts


@pytest.mark.parametrize("family", ["sdxl", "flux1"])
def test_the_planned_device_caches_are_the_bytes_of_the_real_cached_tensors(family, tiny_models, tmp_path):
    from engine.config.io import load_config
    from engine.plan import make_plan

    config_path = _config(family, tiny_models, tmp_path)
    config = load_config(config_path, check_packages=False)
    item = next(item for item in make_plan(config, tmp_path, gpu_capacity=None).items
                if item.name == "caches kept on the GPU")
    latents, texts = _device_tensor_bytes(config_path)
    print(f"{family}: planned {item.bytes} ({item.detail}); cached tensors {latents} + {texts}")
    assert latents > 0 and texts > 0 and item.where == "gpu"
    assert item.bytes == latents + texts

    without = config.model_copy(update={"training": config.training.model_copy(update={"cache_on_device": False})})
    assert "caches kept on the GPU" not in {item.name for item in make_plan(without, tmp_path).items}
