"""docs/parameters.md is generated from the config model and must be regenerated when the model changes."""

from pathlib import Path

from engine.config.describe import iter_fields
from engine.config.reference import parameters_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "parameters.md"


def test_parameter_reference_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == parameters_markdown(), (
        "docs/parameters.md is stale: run `.venv/bin/python tools/gen_parameters_doc.py`")


def test_every_parameter_has_a_description_and_appears_in_the_reference():
    text = parameters_markdown()
    for spec in iter_fields():
        assert spec.description.strip(), spec.path
        relative = spec.path.split(".", 1)[1] if spec.section else spec.path
        assert f"`{relative}`" in text, spec.path


def test_ui_hints_are_present_for_the_gui():
    specs = {spec.path: spec for spec in iter_fields()}
    assert specs["training.noise_offset"].advanced and specs["training.noise_offset"].group == "noise"
    assert not specs["optimizer.learning_rate"].advanced
    assert specs["dataset.train_data_dir"].widget == "folder"
    assert specs["training.mixed_precision"].choices == ("no", "fp16", "bf16")
    assert specs["network.network_dim"].bounds == {"ge": 1, "le": 100000}
    assert specs["dataset.general.resolution"].kind == "size"
    assert specs["optimizer.lr_warmup_steps"].kind == "number"
