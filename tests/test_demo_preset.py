"""The demo preset points at exactly what tools/make_tiny_model.py builds into demo/ beside the run config."""

import importlib.util
from pathlib import Path

from engine.config.io import load_config, load_preset, resolve_path, save_config
from engine.data.scan import scan_config
from engine.models import detect_family

REPO = Path(__file__).resolve().parents[1]


def load_builder():
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "tools" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_run_config_finds_the_tiny_model_and_dataset(tmp_path):
    run_dir = tmp_path / "run"
    load_builder().build_all(run_dir / "demo", only=["sd1", "dataset"])
    save_config(load_preset(REPO / "presets" / "demo.json"), run_dir / "config.toml")

    config = load_config(run_dir / "config.toml")
    checkpoint = resolve_path(config.model.pretrained_model_name_or_path, run_dir)
    assert checkpoint.is_file()
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as handle:
        assert detect_family(handle.keys()) == config.model.model_family == "sd1"

    scan = scan_config(config, run_dir, verify_images=True)
    assert not scan.has_errors, scan.findings
    subsets = scan.datasets[0].subsets
    assert [(s.params["num_repeats"], s.params["class_tokens"], s.is_reg) for s in subsets] == [
        (10, "sks dog", False), (1, "dog", True)]
    assert all(s.records for s in subsets)
