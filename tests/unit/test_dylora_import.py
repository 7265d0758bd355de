"""sd-scripts' and kohya_ss' DyLoRA configs import as Atelier's DyLoRA, which is sd-scripts' algorithm: ``unit`` stays
``unit`` (it used to become LyCORIS' ``block_size``), and the imported config validates (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.config.importers.registry import import_file
from engine.config.io import deep_merge, default_config_dict, validate_config
from engine.config.schema import RunConfig


def merged(result) -> RunConfig:
    return validate_config(deep_merge(default_config_dict(), result.overlay), check_packages=False)


def test_sd_scripts_networks_dylora_keeps_its_unit(tmp_path: Path):
    path = tmp_path / "args.toml"
    path.write_text('[model_arguments]\npretrained_model_name_or_path = "/m/v1-5.safetensors"\n'
                    '[additional_network_arguments]\nnetwork_module = "networks.dylora"\nnetwork_dim = 16\n'
                    'network_alpha = 8\nnetwork_args = ["unit=4"]\n'
                    '[training_arguments]\noutput_dir = "/out"\ntrain_data_dir = "/img"\n', encoding="utf-8")
    network = merged(import_file(path)).network
    assert (network.network_type, network.network_dim, network.network_args) == ("dylora", 16, {"unit": 4})


def test_lycoris_dylora_block_size_becomes_unit(tmp_path: Path):
    path = tmp_path / "args.toml"
    path.write_text('[model_arguments]\npretrained_model_name_or_path = "/m/v1-5.safetensors"\n'
                    '[additional_network_arguments]\nnetwork_module = "lycoris.kohya"\nnetwork_dim = 8\n'
                    'network_alpha = 4\nnetwork_args = ["algo=dylora", "block_size=2", "conv_dim=8", "conv_alpha=4"]\n'
                    '[training_arguments]\noutput_dir = "/out"\ntrain_data_dir = "/img"\n', encoding="utf-8")
    result = import_file(path)
    network = merged(result).network
    assert network.network_type == "dylora" and network.network_args == {"unit": 2}
    assert any("block_size becomes unit" in note for note in result.notes)


def test_kohya_ss_kohya_dylora_passes_unit(tmp_path: Path):
    path = tmp_path / "dylora.json"
    path.write_text(json.dumps({"LoRA_type": "Kohya DyLoRA", "network_dim": 8, "network_alpha": 4, "unit": 2,
                                "conv_dim": 0, "conv_alpha": 1, "epoch": 1, "optimizer": "AdamW"}), encoding="utf-8")
    network = merged(import_file(path)).network
    assert network.network_type == "dylora" and network.network_args == {"unit": 2}
