"""`python -m engine` as a user runs it: real subprocesses, exit codes and messages."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from engine.config.reference import parameters_markdown

REPO = Path(__file__).resolve().parents[2]


def engine(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_help_lists_the_commands():
    result = engine("--help")
    assert result.returncode == 0
    for command in ("validate", "schema", "import"):
        assert command in result.stdout
        assert engine(command, "--help").returncode == 0


def test_the_console_scripts_pyproject_declares_run():
    """`atelier-engine` (pyproject's [project.scripts]) is what pip installs: its target must exist and run."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, function = target.split(":")
        code = f"import sys; sys.argv = [{name!r}, '--version']; from {module} import {function}; {function}()"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert result.stdout.startswith("atelier engine"), (name, result.stderr)


def test_validate_accepts_a_good_config_with_a_one_line_summary(tmp_path):
    (tmp_path / "run.toml").write_text('[model]\npretrained_model_name_or_path = "m.safetensors"\n'
                                       '[dataset]\ntrain_data_dir = "img"\n')
    result = engine("validate", str(tmp_path / "run.toml"), "--set", "network.network_dim=16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert result.stdout.startswith("ok: lora dim 16 on m.safetensors")


def test_validate_lists_every_error_as_path_and_message(tmp_path):
    (tmp_path / "bad.toml").write_text('[training]\nmax_train_epoch = 3\nseed = "x"\n'
                                       '[network]\nnetwork_dim = 4\nnetwork_alpha = 8.0\n'
                                       '[dataset.general]\ncolor_aug = true\n')
    result = engine("validate", str(tmp_path / "bad.toml"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "error: training.max_train_epoch: unknown key; did you mean 'max_train_epochs'?" in lines
    assert "error: training.seed: expected a whole number, got the text 'x'" in lines
    assert any(line.startswith("error: network.network_alpha: alpha 8 is above network_dim 4") for line in lines)
    assert any(line.startswith("error: dataset.general.color_aug:") for line in lines)


def test_validate_applies_overrides_before_checking(tmp_path):
    (tmp_path / "run.toml").write_text("")
    result = engine("validate", str(tmp_path / "run.toml"), "--set", "training.full_fp16=true", "--set",
                    "training.mixed_precision=bf16")
    assert result.returncode == 2
    assert "error: training.full_fp16: needs training.mixed_precision = 'fp16'" in result.stderr


@pytest.mark.parametrize("preset", sorted((REPO / "presets").glob("*.json")), ids=lambda p: p.stem)
def test_validate_accepts_every_shipped_preset(preset):
    result = engine("validate", str(preset))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")


def test_schema_prints_the_parameter_reference():
    result = engine("schema")
    assert result.returncode == 0
    assert result.stdout == parameters_markdown()
    assert "`network_dim`" in result.stdout and "## [dataset]" in result.stdout


def test_schema_as_json_schema():
    import json

    schema = json.loads(engine("schema", "--format", "json-schema").stdout)
    assert "training" in schema["properties"]


FIXTURES = REPO / "tests" / "fixtures" / "import"


def test_import_writes_a_config_that_validates_and_lists_what_was_left_out(tmp_path):
    output = tmp_path / "run.toml"
    result = engine("import", str(FIXTURES / "kohya_lora_sdxl.json"), "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert "format: kohya_gui" in result.stderr
    assert "not imported: fp8_base = True: Atelier keeps the base model in fp8 only for FLUX.1 and Chroma" \
        in result.stderr
    assert output.read_text().startswith("# Imported from kohya_lora_sdxl.json")
    validated = engine("validate", str(output), "--skip-package-check")
    assert validated.returncode == 0, validated.stderr
    assert "(sdxl)" in validated.stdout


def test_import_never_overwrites_without_force(tmp_path):
    output = tmp_path / "run.toml"
    output.write_text("mine")
    result = engine("import", str(FIXTURES / "dataset_class_identifier.toml"), "-o", str(output))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert output.read_text() == "mine"
    assert engine("import", str(FIXTURES / "dataset_class_identifier.toml"), "-o", str(output), "--force",
                  ).returncode == 0


@pytest.mark.parametrize("name", ["dataset_class_identifier.toml", "dataset_captions.toml", "dataset_finetune.toml"])
def test_sd_scripts_dataset_examples_import_and_validate(tmp_path, name):
    output = tmp_path / "run.toml"
    assert engine("import", str(FIXTURES / name), "-o", str(output)).returncode == 0
    assert engine("validate", str(output)).returncode == 0


def test_import_prints_the_config_when_no_output_is_named():
    result = engine("import", str(FIXTURES / "dataset_captions.toml"), "--set", "training.seed=9")
    assert result.returncode == 0
    assert "seed = 9" in result.stdout and "[[dataset.datasets]]" in result.stdout


def test_import_of_an_unknown_file_names_it(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text("[1, 2]")
    result = engine("import", str(path))
    assert result.returncode == 2 and str(path) in result.stderr
