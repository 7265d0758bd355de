"""Class images from an SD3.5 medium file (`python -m engine class-images` with --clip-l/--clip-g/--t5xxl), through
the Regularization tab's command line: numbered images and captions from the tiny files, and a missing CLIP-G named
with its flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sd3_tiny import tiny_sd3_files

from engine.cli import main
from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK
from engine.config.io import default_config_dict
from engine.config.paths import set_path
from engine.rundir.event_reader import read_events
from gui.views import regularization as view

PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return tiny_sd3_files("5-medium")


def parameters(files: dict[str, Path], **changes: str) -> dict:
    """The Parameters tab's config: the SD3 family with the tiny file and its separate text encoders."""
    config = default_config_dict()
    values = {view.MODEL_PATH: str(files["model"]), "model.model_family": "sd3", "model.clip_l": str(files["clip_l"]),
              "model.clip_g": str(files["clip_g"]), "model.t5xxl": str(files["t5xxl"]),
              "model.tokenizer_cache_dir": str(files["t5_tokenizer"]), view.T5_LENGTH: 32, view.LG_MASK: True}
    for path, value in (values | changes).items():
        set_path(config, path, value)
    return config


def test_the_regularization_tabs_command_makes_sd3_class_images(files, tmp_path):
    out = tmp_path / "1_dog"
    request = view.GenerateRequest(model=str(files["model"]), out=str(out), prompt=PROMPT, count=2, steps=2,
                                   width=64, height=64, seed=3)
    args = view.class_images_args(request, parameters(files))
    assert args[args.index("--clip-g") + 1] == str(files["clip_g"]) and "--apply-lg-attn-mask" in args
    assert main([*args, "--device", "cpu"]) == EXIT_OK
    assert sorted(entry.name for entry in out.iterdir()) == ["0001.png", "0001.txt", "0002.png", "0002.txt"]
    assert (out / "0001.txt").read_text(encoding="utf-8") == PROMPT
    image = np.asarray(Image.open(out / "0001.png").convert("RGB"))
    assert image.shape == (64, 64, 3) and image.std() > 0  # decoded from latents, not a blank image


def test_a_missing_clip_g_is_named_with_its_flag(files, tmp_path):
    out, events_file = tmp_path / "1_dog", tmp_path / "events.jsonl"
    request = view.GenerateRequest(model=str(files["model"]), out=str(out), prompt=PROMPT, count=1, steps=2,
                                   width=64, height=64, seed=3)
    args = view.class_images_args(request, parameters(files, **{"model.clip_g": ""}))
    assert "--clip-g" not in args
    assert main([*args, "--device", "cpu", "--events", str(events_file)]) == EXIT_BAD_INPUT
    error = next(event for event in read_events(events_file) if event["type"] == "error")
    assert "--clip-g" in error["message"] and "model.clip_g" not in error["message"]
    assert not out.exists() or not any(out.iterdir())
