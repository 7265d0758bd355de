"""The Parameters form keeps the whole config: every importer fixture and every shipped preset, put into the form as
Import / Load / a preset does and read back, is the config the importer or preset gives, field for field (inline
datasets included); a partial file (a dataset TOML) merges onto the form instead of resetting it."""

from pathlib import Path

import pytest

from engine.config.errors import ConfigError
from engine.config.importers.registry import import_file
from engine.config.io import (
    config_to_dict,
    config_to_toml,
    deep_merge,
    default_config_dict,
    load_preset,
    validate_config,
)
from gui.state import config_to_form, form_to_config
from gui.views.parameters import editable_fields, imported_values, load_preset_values

SPECS = editable_fields()
REPO = Path(__file__).resolve().parents[2]
FIXTURES = sorted((REPO / "tests" / "fixtures" / "import").iterdir())
PRESETS = sorted((REPO / "presets").glob("*.json"))


def form_config(values: dict) -> dict:
    """The config the form builds, as plain data (packages are not checked: the fixtures name xformers)."""
    _, data, problems = form_to_config(values, SPECS)
    assert [p for p in problems if p.path != "training.attention"] == [], problems  # xformers is not installed
    return config_to_dict(validate_config(data, check_packages=False))


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda path: path.name)
def test_an_import_into_the_default_form_reads_back_as_the_importers_config(fixture):
    result = import_file(fixture)
    imported = deep_merge(default_config_dict(), result.overlay)
    values, _ = imported_values(result, config_to_form(default_config_dict(), SPECS), SPECS)
    try:
        expected = config_to_dict(validate_config(imported, check_packages=False))
    except ConfigError:  # a config the rules refuse is still kept whole, for the user to fix in the form
        assert form_to_config(values, SPECS)[1] == imported
        return
    assert form_config(values) == expected


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_a_preset_in_the_form_reads_back_as_the_preset(preset):
    assert form_config(load_preset_values(preset, SPECS)) == config_to_dict(load_preset(preset, check_packages=False))


def test_loading_a_config_with_inline_datasets_keeps_them(tmp_path):
    source = import_file(REPO / "tests" / "fixtures" / "import" / "dataset_captions.toml")
    config = validate_config(deep_merge(default_config_dict(), source.overlay), check_packages=False)
    saved = tmp_path / "config.toml"
    saved.write_text(config_to_toml(config), encoding="utf-8")
    back = form_config(load_preset_values(saved, SPECS))
    assert back == config_to_dict(config) and len(back["dataset"]["datasets"][0]["subsets"]) == 2


def test_importing_a_dataset_toml_merges_onto_the_form():
    current = config_to_form(default_config_dict(), SPECS) | {
        "model.pretrained_model_name_or_path": "/models/base.safetensors", "network.network_dim": 12,
        "dataset.train_data_dir": "/data/img"}
    result = import_file(REPO / "tests" / "fixtures" / "import" / "dataset_multires.toml")
    values, cleared = imported_values(result, current, SPECS)
    config = form_config(values)
    assert config["model"]["pretrained_model_name_or_path"] == "/models/base.safetensors"
    assert config["network"]["network_dim"] == 12
    assert [entry["resolution"] for entry in config["dataset"]["datasets"]] == [[512, 512], [768, 768]]
    # one source of images: the imported datasets replace the folder, and the form says so
    assert cleared == ["dataset.train_data_dir"] and config["dataset"]["train_data_dir"] == ""
