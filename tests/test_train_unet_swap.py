"""Training SD1 and SDXL LoRAs with training.blocks_to_swap and cpu_offload_checkpointing (issue 16): the real
`python -m engine train` (its code, run in the test's process) on the tiny models, against the same run without the
option. Swapping and offloading change where tensors wait between uses, not what is computed: the losses and the
trained LoRA weights are the same to float32 rounding (the swapper's markers may make autograd add a skip connection's
gradients in another order)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import events_of, train_here, write_config

# SGD with momentum: a weight moves in proportion to its gradient, so float32 rounding in the gradients stays
# rounding in the weights (Adam's normalisation would turn last-bit differences of near-zero gradients into steps).
OPTIMIZER = {"optimizer_type": "SGDNesterov", "learning_rate": 0.05, "lr_scheduler": "constant"}
STEPS = 4


def _train(folder: Path, tiny_models: dict[str, Path], family: str, training: dict[str, Any]
           ) -> tuple[list[float], dict[str, torch.Tensor], str]:
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder / "config.toml", tiny_models, family, optimizer=OPTIMIZER,
                          training={"max_train_steps": STEPS, **training})
    train_here(config)
    out = folder / "out"
    losses = [event["loss"] for event in events_of(out) if event["type"] == "progress"]
    return losses, load_file(str(out / "lora.safetensors")), (out / "train.log").read_text(encoding="utf-8")


CASES = {
    # family, the baseline's training settings, the same with the memory option
    "sd1-blocks_to_swap": ("sd1", {}, {"blocks_to_swap": 8}),
    "sdxl-blocks_to_swap-checkpointing": ("sdxl", {"gradient_checkpointing": True},
                                          {"gradient_checkpointing": True, "blocks_to_swap": 12}),
    "sd1-cpu_offload_checkpointing": ("sd1", {"gradient_checkpointing": True},
                                      {"gradient_checkpointing": True, "cpu_offload_checkpointing": True}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_memory_options_train_the_same_lora(case, tiny_models, tmp_path):
    family, baseline, option = CASES[case]
    base_losses, base_weights, _ = _train(tmp_path / "base", tiny_models, family, baseline)
    losses, weights, log = _train(tmp_path / "option", tiny_models, family, option)
    assert len(losses) == len(base_losses) == STEPS
    assert losses == pytest.approx(base_losses, rel=1e-5, abs=1e-8)
    assert weights.keys() == base_weights.keys() and weights
    for key, tensor in weights.items():
        assert torch.allclose(tensor, base_weights[key], rtol=1e-4, atol=1e-7), key
    trained = [key for key in weights if "lora_up" in key and weights[key].abs().sum() > 0]
    assert trained  # the LoRA did learn (its up weights start at zero)
    if "blocks_to_swap" in option:
        assert f"block swap: {option['blocks_to_swap']} blocks kept on the CPU" in log, log


@pytest.mark.slow
def test_sd1_dreambooth_with_swapped_blocks_equals_the_run_without(tiny_models, tmp_path):
    """Full fine-tuning swaps trained blocks as SD3's does (optimizer.fused_backward_pass steps each weight inside the
    backward pass while it is on the device, then the host copies are refreshed): the saved UNet equals the one
    trained without swapping, to float32 rounding."""
    saved = {}
    for swap in (0, 8):
        folder = tmp_path / f"swap{swap}"
        folder.mkdir()
        config = write_config(
            folder / "config.toml", tiny_models, "sd1", method="dreambooth",
            training={"max_train_steps": 3, "blocks_to_swap": swap},
            optimizer={"optimizer_type": "Adafactor", "learning_rate": 1e-3, "lr_scheduler": "constant",
                       "text_encoder_lr": 0.0, "max_grad_norm": 0.0, "fused_backward_pass": True,
                       "optimizer_args": {"relative_step": False, "scale_parameter": False, "warmup_init": False}},
            saving={"output_name": "model", "save_model_as": "safetensors"})
        train_here(config)
        if swap:
            assert "block swap: 8 blocks" in (folder / "out" / "train.log").read_text(encoding="utf-8")
        saved[swap] = load_file(str(folder / "out" / "model.safetensors"))
    unet_keys = [key for key in saved[0] if key.startswith("model.diffusion_model.")]
    assert unet_keys and saved[0].keys() == saved[8].keys()
    for key in unet_keys:
        torch.testing.assert_close(saved[8][key], saved[0][key], rtol=1e-5, atol=1e-6, msg=key)
