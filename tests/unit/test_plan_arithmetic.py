"""engine.plan's arithmetic against hand-computed values (issue 16): optimizer states per optimizer, frozen weights
by dtype with fp8 storage and swapped blocks, the trained LoRA counted as the engine builds it, and sizes."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from engine.cli.plan_cmd import parse_size
from engine.config.io import deep_merge, default_config_dict
from engine.config.schema import RunConfig
from engine.plan import optimizer_state_bytes
from engine.plan.architecture import Architecture
from engine.plan.weights import denoiser_weights as _denoiser_weights


def _config(**sections: dict) -> RunConfig:
    data = deep_merge(default_config_dict(), {"model": {"model_family": "flux1"}, **sections})
    return RunConfig.model_validate(data, context={"check_packages": False})


@pytest.mark.parametrize("optimizer, dtype, expected", [
    ("AdamW", torch.float32, 1000 * 2 * 4),  # two float32 moments
    ("AdamW", torch.bfloat16, 1000 * 2 * 2),  # full_bf16: the moments follow the weights' dtype
    ("AdamW8bit", torch.float32, 1000 * 2),  # two one-byte moments
    ("Lion", torch.float32, 1000 * 4),  # one momentum
    ("SGDNesterov", torch.float32, 1000 * 4),
    ("Prodigy", torch.float32, 1000 * 4 * 4),  # p0, s, exp_avg, exp_avg_sq
    ("Adafactor", torch.float32, 1000 * 4 // 100),
])
def test_optimizer_state_per_optimizer(optimizer, dtype, expected):
    config = _config(optimizer={"optimizer_type": optimizer})
    assert optimizer_state_bytes(config, 1000, dtype) == expected


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 16)  # weight 128, bias 16
        self.norm = nn.LayerNorm(16)  # weight 16, bias 16


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.double_blocks = nn.ModuleList(_Block() for _ in range(2))
        self.single_blocks = nn.ModuleList(_Block() for _ in range(2))
        self.head = nn.Linear(16, 4)  # weight 64, bias 4


def _weights(monkeypatch: pytest.MonkeyPatch, swapped: list[str], **model: object) -> dict[str, int]:
    import engine.plan.weights as weights

    monkeypatch.setattr(weights, "swapped_blocks", lambda config, architecture: swapped)
    config = _config(model=model, training={"mixed_precision": "bf16"})
    architecture = Architecture("flux1", _Tiny(), {}, 0, "test")
    return {item.name: item.bytes for item in _denoiser_weights(config, architecture, torch.bfloat16)}


def test_frozen_weights_by_dtype_fp8_and_swapped_blocks(monkeypatch):
    # bf16: every parameter 2 bytes. 4 blocks x (128 + 16 + 16 + 16) + 64 + 4 = 772 parameters.
    assert _weights(monkeypatch, []) == {"denoiser weights (frozen)": 772 * 2}
    # fp8: Linear weights 1 byte (4 x 128 + 64), the rest 2 bytes (4 x 48 + 4).
    assert _weights(monkeypatch, [], fp8_base=True) == {"denoiser weights (frozen)": 576 + 196 * 2}
    # Two blocks swapped: their Linear weights (2 x 128) wait on the host, biases and norms stay; one block's weight
    # (128) is on the GPU while it runs.
    both = _weights(monkeypatch, ["double_blocks.1", "single_blocks.0"])
    assert both == {"denoiser weights (frozen)": (772 - 256 + 128) * 2, "denoiser blocks swapped to the CPU": 256 * 2}


def test_full_fine_tuning_counts_the_whole_denoiser_in_its_training_dtype(monkeypatch):
    config = _config(method="dreambooth", training={"mixed_precision": "bf16", "full_bf16": True})
    items = _denoiser_weights(config, Architecture("flux1", _Tiny(), {}, 0, "test"), torch.bfloat16)
    assert [(item.name, item.bytes) for item in items] == [("trained weights (the whole denoiser)", 772 * 2)]


@pytest.mark.parametrize("text, expected", [
    ("12GiB", 12 * 1024**3), ("24 GB", 24 * 1000**3), ("8192MiB", 8 * 1024**3), ("12", 12 * 1024**3),
    ("0.5g", 1024**3 // 2),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


def test_a_bad_size_is_refused_with_an_example():
    with pytest.raises(argparse.ArgumentTypeError, match="12GiB"):
        parse_size("twelve")


def test_device_cache_entries_by_hand():
    """training.cache_on_device: float32 latents at the bucket (8x smaller each way), twice with flip_aug, the loss
    mask at the bucket's pixels; float32 hidden states and pooled embedding, T5's mask one byte a token."""
    from engine.plan.caches import latent_entry_bytes, text_entry_bytes

    assert latent_entry_bytes(4, 8, (1024, 768), flip=False, mask=False) == 4 * 96 * 128 * 4  # SDXL 1024x768
    assert latent_entry_bytes(16, 8, (1024, 1024), flip=True, mask=True) == 16 * 128 * 128 * 4 * 2 + 1024 * 1024 * 4
    assert text_entry_bytes(77, 2048, 1280, 0) == 77 * 2048 * 4 + 1280 * 4  # SDXL: CLIP-L+G states, G pooled
    assert text_entry_bytes(512, 4096, 768, 512) == 512 * 4096 * 4 + 768 * 4 + 512  # FLUX.1 dev: T5, CLIP-L, mask


@pytest.mark.parametrize("family, tokens, expected", [
    ("sd1", 77, 77 * 768 * 4),
    ("sdxl", 77, 77 * 2048 * 4 + 1280 * 4),
    ("flux1", 512, 512 * 4096 * 4 + 768 * 4 + 512),
    ("sd3", 256, (77 + 256) * 4096 * 4 + 2048 * 4),  # CLIP-L/G padded to T5's width, then T5; L+G pooled
])
def test_a_cached_captions_bytes_come_from_the_real_size_denoisers_inputs(family, tokens, expected, tmp_path):
    from engine.models.families import family_info
    from engine.plan.architecture import build_architecture
    from engine.plan.caches import _TEXT_SHAPES, text_entry_bytes

    config = RunConfig.model_validate(deep_merge(default_config_dict(), {"model": {"model_family": family}}),
                                      context={"check_packages": False})
    architecture = build_architecture(config, "not/local")
    shape = _TEXT_SHAPES[family_info(family).text_encoding](architecture, tokens)
    assert text_entry_bytes(*shape) == expected
