"""Every shipped preset is a partial overlay that validates on the defaults."""

import json
from pathlib import Path

import pytest

from engine.config.io import PRESET_FORMAT, default_config_dict, load_preset

PRESETS = sorted((Path(__file__).resolve().parents[2] / "presets").glob("*.json"))
REQUIRED = {"sd15-lora-character", "sd15-lora-style", "sd15-lora-8gb", "sdxl-lora", "sd15-dreambooth",
            "sd15-textual-inversion", "demo"}


def test_the_required_presets_ship():
    assert {path.stem for path in PRESETS} >= REQUIRED


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_on_the_defaults(path):
    document = json.loads(path.read_text())
    assert document["format"] == PRESET_FORMAT
    assert document["title"] and document["description"]
    config = load_preset(path)  # packages checked: the test extras install every optional one presets use
    assert config.method == document["config"].get("method", "lora")
    for section, values in document["config"].items():
        if isinstance(values, dict):
            assert values, f"{section} is an empty overlay"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_partial(path):
    overlay = json.loads(path.read_text())["config"]
    full = default_config_dict()
    count = sum(len(v) if isinstance(v, dict) else 1 for v in overlay.values())
    assert count < sum(len(v) if isinstance(v, dict) else 1 for v in full.values()) / 3


def test_presets_describe_different_methods_and_families():
    configs = {path.stem: load_preset(path) for path in PRESETS}
    assert configs["sd15-dreambooth"].method == "dreambooth"
    assert configs["sd15-textual-inversion"].method == "textual_inversion"
    assert configs["sdxl-lora"].model.model_family == "sdxl"
    assert configs["sd15-lora-8gb"].optimizer.optimizer_type == "AdamW8bit"
    demo = configs["demo"]
    assert demo.training.mixed_precision == "no" and demo.dataset.general.resolution == [64, 64]
