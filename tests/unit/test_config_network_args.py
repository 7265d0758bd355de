"""network_args are checked when the config is validated, for LoRA and every LyCORIS type: a bad key or value is a
validation error (exit 2, the key named, what is allowed), not a crash when the network is built (issue 14)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main as engine_main
from engine.config.errors import ConfigError
from engine.config.io import deep_merge, default_config_dict, validate_config
from engine.config.schema import RunConfig
from engine.networks.lycoris_args import LYCORIS_PRESETS
from gui.state import config_to_form, form_to_config
from gui.views.parameters import editable_fields, status_markdown

REPO = Path(__file__).resolve().parents[2]

# network type -> (extra [network] settings it needs, a bad value of one of its own keys, words of that message)
TYPES = {
    "lora": ({}, {"loraplus_lr_ratio": -1}, "must be above 0"),
    "locon": ({"conv_dim": 4}, {"dropout": 1.5}, "below 1"),
    "loha": ({}, {"use_tucker": "maybe"}, "true or false"),
    "lokr": ({}, {"factor": 0}, "-1 (automatic) or at least 1"),
    "ia3": ({}, {"train_norm": "yes"}, "true or false"),
    "glora": ({}, {"rs_lora": 3}, "true or false"),
    "boft": ({}, {"constraint": -1}, "at least 0"),
    "diag-oft": ({}, {"rescaled": "nah"}, "true or false"),
    "full": ({}, {"preset": "no-such-preset"}, "neither a built-in LyCORIS preset"),
    "dylora": ({}, {"unit": 3}, "does not divide network.network_dim = 8"),
}


def config_text(tmp_path: Path, network_type: str, args: dict, family: str = "sd1") -> Path:
    extra, _, _ = TYPES[network_type]
    lines = ["[model]", 'pretrained_model_name_or_path = "m.safetensors"', f'model_family = "{family}"',
             "[dataset]", 'train_data_dir = "img"', "[network]", f'network_type = "{network_type}"']
    lines += [f"{key} = {value}" for key, value in extra.items()]
    lines += ["[network.network_args]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in args.items()]  # JSON scalars are TOML scalars
    path = tmp_path / f"{network_type}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("network_type", TYPES)
def test_validate_refuses_an_unknown_key_naming_it(tmp_path, capsys, network_type):
    assert engine_main(["validate", str(config_text(tmp_path, network_type, {"bogus_key": 3}))]) == 2
    out = capsys.readouterr()
    assert "network.network_args.bogus_key" in out.out + out.err


@pytest.mark.parametrize("network_type", TYPES)
def test_validate_refuses_a_bad_value_naming_the_key_and_what_is_allowed(tmp_path, capsys, network_type):
    _, bad, words = TYPES[network_type]
    assert engine_main(["validate", str(config_text(tmp_path, network_type, bad))]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert f"network.network_args.{next(iter(bad))}" in text
    assert words in text


@pytest.mark.parametrize("network_type", TYPES)
def test_good_network_args_pass(tmp_path, capsys, network_type):
    good = {"lora": {"loraplus_lr_ratio": 4}, "locon": {"dropout": 0.1}, "loha": {"use_tucker": True},
            "lokr": {"factor": 4}, "ia3": {"train_norm": True}, "glora": {"rs_lora": "true"},
            "boft": {"constraint": 0.5}, "diag-oft": {"rescaled": True}, "full": {"preset": "attn-mlp"},
            "dylora": {"unit": 4}}
    assert engine_main(["validate", str(config_text(tmp_path, network_type, good[network_type]))]) == 0, \
        capsys.readouterr()


def validate_output(path: Path, capsys) -> tuple[int, str]:
    code = engine_main(["validate", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_key_of_another_family_is_refused_but_accepted_when_the_family_is_auto(tmp_path, capsys):
    flux_key = {"split_qkv": True}
    code, text = validate_output(config_text(tmp_path, "lora", flux_key, family="sd1"), capsys)
    assert code == 2 and "network.network_args.split_qkv" in text
    assert validate_output(config_text(tmp_path, "lora", flux_key, family="auto"), capsys)[0] == 0
    # ... but a bad value of it is refused even then, with the message of the family that has the key
    code, text = validate_output(config_text(tmp_path, "lora", {"split_qkv": "perhaps"}, "auto"), capsys)
    assert code == 2 and "network.network_args.split_qkv must be true or false" in text


def test_a_shared_setting_contradicting_its_field_names_both(tmp_path, capsys):
    code, text = validate_output(config_text(tmp_path, "locon", {"conv_dim": 8}), capsys)  # conv_dim = 4 already
    assert code == 2 and "contradicts network.conv_dim" in text


@pytest.mark.parametrize(("family", "valid"), [("sd1", True), ("sdxl", True), ("auto", True), ("flux1", False),
                                               ("chroma", False), ("sd3", False)])
def test_dylora_is_refused_for_the_families_sd_scripts_has_none_for(tmp_path, capsys, family, valid):
    code, text = validate_output(config_text(tmp_path, "dylora", {}, family=family), capsys)
    assert code == (0 if valid else 2), text
    if not valid:
        assert "network.network_type: network.network_type = 'dylora' is sd-scripts' DyLoRA for SD1.x" in text


def test_dylora_dropouts_and_conv_settings_sd_scripts_lacks_are_refused(tmp_path, capsys):
    base = tmp_path / "base.toml"
    base.write_text(config_text(tmp_path, "dylora", {}).read_text(encoding="utf-8").replace(
        "[network.network_args]", "network_dropout = 0.1\n[network.network_args]"), encoding="utf-8")
    code, text = validate_output(base, capsys)
    assert code == 2 and "network.network_dropout: network.network_dropout has no effect" in text
    conv = tmp_path / "conv.toml"
    conv.write_text(base.read_text(encoding="utf-8").replace("network_dropout = 0.1", "conv_dim = 8\nconv_alpha = 2.0"),
                    encoding="utf-8")
    code, text = validate_output(conv, capsys)
    assert code == 2 and "network.conv_alpha: network.conv_alpha = 2 has no effect with DyLoRA" in text


def test_dylora_with_the_fused_backward_pass_on_several_processes_is_refused():
    data = deep_merge(default_config_dict(), {
        "model": {"model_family": "sd1"}, "network": {"network_type": "dylora"},
        "optimizer": {"optimizer_type": "Adafactor", "fused_backward_pass": True, "lr_scheduler": "adafactor"},
        "training": {"mixed_precision": "bf16"}, "launch": {"num_processes": 2, "multi_gpu": True}})
    with pytest.raises(ConfigError) as caught:
        validate_config(data, check_packages=False)
    assert [problem.path for problem in caught.value.problems] == ["optimizer.fused_backward_pass"]
    data["launch"] = {"num_processes": 1, "multi_gpu": False}
    validate_config(data, check_packages=False)


def test_a_bad_key_ends_train_at_validation_with_exit_2_not_a_crash(tmp_path):
    """The reported defect: the run started, built the model and failed with exit 1 ("please report it")."""
    path = config_text(tmp_path, "lora", {"bogus_key": 3})
    for command in ("validate", "train"):
        result = subprocess.run([sys.executable, "-m", "engine", command, str(path)], capture_output=True, text=True,
                                cwd=REPO, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "network.network_args.bogus_key" in result.stdout + result.stderr
        assert "please report" not in result.stdout + result.stderr


def test_the_rule_path_imports_no_torch():
    code = ("import sys\nfrom engine.config.io import validate_config\n"
            "try:\n    validate_config({'network': {'network_type': 'loha', 'network_args': {'preset': 'x'}}})\n"
            "except Exception as error:\n    assert 'network.network_args.preset' in str(error), error\n"
            "else:\n    raise SystemExit('no error')\n"
            "assert 'torch' not in sys.modules and 'lycoris' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("network_type", ["lora", "lokr"])
def test_the_gui_status_names_the_bad_key(network_type):
    specs = editable_fields()
    data = deep_merge(default_config_dict(), {"model": {"model_family": "sd1"},
                                              "network": {"network_type": network_type}})
    values = config_to_form(data, specs)
    values["network.network_args"] = "bogus_key = 3"
    config, _, problems = form_to_config(values, specs)
    assert config is None
    status = status_markdown(config, problems)
    assert "network.network_args.bogus_key" in status
    values["network.network_args"] = ""
    config, _, problems = form_to_config(values, specs)
    assert "bogus_key" not in status_markdown(config, problems)


def test_the_preset_names_are_lycoris_own():
    lycoris_config = pytest.importorskip("lycoris.config")
    assert set(LYCORIS_PRESETS) <= set(lycoris_config.PRESET)


def test_valid_config_object_is_built_for_a_good_lycoris_config():
    data = deep_merge(default_config_dict(), {"network": {"network_type": "lokr",
                                                          "network_args": {"factor": 8, "preset": "full"}}})
    assert RunConfig.model_validate(data, context={"check_packages": False}).network.network_args["factor"] == 8
