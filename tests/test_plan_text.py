"""Text encoders in the memory plan (issue 16): the encoders a FLUX.1 or SD3 LoRA trains (CLIP-L, CLIP-G, T5-XXL with
train_t5xxl) and those DreamBooth trains with SD1/SD2/SDXL are traced training (their LoRA or own weights, gradients,
optimizer state and the activations their forward keeps), and the plan of such a tiny run is within 15 % of the
peak the real run reaches on this CPU.

Measured as tests/test_plan.py measures: a dispatch mode written here counts every storage the training steps make
and still hold at their worst moment, on top of what a GPU would hold before the first step (the denoiser's and the
resident text encoders' weights, and the LoRA's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_plan import track_run
from train_helpers import write_config

pytestmark = pytest.mark.slow


def _measured_peak(config_path: Path) -> tuple[int, list[bool]]:
    """(the weights on the device before the first step plus the steps' peak, which encoders the run trains)."""

    def on_device(session: Any) -> list[Any]:
        network = getattr(session.method, "network", None)
        return [session.model.unet, *([] if session.text_cached else session.model.text.encoders),
                *([network] if network is not None else [])]

    session, tensors, peak = track_run(config_path, on_device)
    return sum(t.numel() * t.element_size() for t in tensors) + peak, list(session.method.trains_text_encoders)


def _flux(tmp_path: Path, tiny_models: dict[str, Path], **network: Any) -> Path:
    from test_train_flux import flux_config

    return flux_config(tmp_path / "config.toml", tiny_models, network=network, training={"max_train_steps": 3})


def _sd3(tmp_path: Path, tiny_models: dict[str, Path], **network: Any) -> Path:
    from test_train_sd3 import sd3_config

    return sd3_config(tmp_path / "config.toml", tiny_models, network=network, training={"max_train_steps": 3})


def _dreambooth(tmp_path: Path, tiny_models: dict[str, Path], family: str) -> Path:
    return write_config(tmp_path / "config.toml", tiny_models, family, method="dreambooth",
                        optimizer={"learning_rate": 1e-4}, training={"max_train_steps": 3})


@pytest.mark.parametrize("make, options, trained", [
    (_flux, {}, [True, False]),  # CLIP-L; T5 only with train_t5xxl
    (_flux, {"network_args": {"train_t5xxl": True}}, [True, True]),
    (_sd3, {}, [True, True, False]),  # CLIP-L and CLIP-G
    # The UNet's and the CLIPs' own weights: the peak is the optimizer's update (engine.plan.estimate).
    (_dreambooth, {"family": "sd1"}, [True]),
    (_dreambooth, {"family": "sdxl"}, [True, True]),
], ids=["flux-clip-l", "flux-t5", "sd3-clips", "sd1-dreambooth", "sdxl-dreambooth"])
def test_the_plan_of_a_run_training_text_encoders_is_within_15_percent(make, options, trained, tiny_models,
                                                                       tmp_path):
    from engine.config.io import load_config
    from engine.plan import make_plan

    config_path = make(tmp_path, tiny_models, **options)
    config = load_config(config_path, check_packages=False)
    plan = make_plan(config, tmp_path, gpu_capacity=None)
    measured, trains = _measured_peak(config_path)
    assert trains == trained  # the engine trains the encoders this test is about
    print(f"{config_path.parent.name}: planned {plan.gpu_peak}, measured {measured}")
    assert abs(plan.gpu_peak - measured) <= 0.15 * measured, (plan.gpu_peak, measured, plan.as_dict())
    if config.method != "lora":
        return
    # What training the encoders adds (their LoRA, its gradients and state, their activations) is a small part of a
    # tiny FLUX or SD3 run: the same run with a LoRA on the denoiser only shows it apart.
    unet_only = tmp_path / "unet_only"
    unet_only.mkdir()
    frozen_path = make(unet_only, tiny_models, **options, train_unet_only=True)
    frozen_plan = make_plan(load_config(frozen_path, check_packages=False), unet_only, gpu_capacity=None)
    frozen_measured, _ = _measured_peak(frozen_path)
    added, planned_added = measured - frozen_measured, plan.gpu_peak - frozen_plan.gpu_peak
    print(f"  the encoders add: planned {planned_added}, measured {added}")
    assert added > 0 and abs(planned_added - added) <= 0.15 * added
