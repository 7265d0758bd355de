"""The doctor's FLUX model-file checks, on the tiny FLUX.1 dev / Chroma files: each finding names the field and
says what to do, and the checks read headers only (no torch or safetensors in the process that runs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flux_tiny import tiny_flux_files

from engine.config.io import deep_merge, default_config_dict, validate_config
from engine.data.doctor import run_doctor
from engine.data.doctor_models import read_safetensors_header
from engine.data.model_findings import model_findings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dev():
    return tiny_flux_files("dev")


@pytest.fixture(scope="module")
def chroma():
    return tiny_flux_files("chroma")


def flux_config(files, family: str = "flux1", **model):
    values = {"model_family": family, "pretrained_model_name_or_path": str(files["model"]),
              "t5xxl": str(files["t5xxl"]), "ae": str(files["ae"]), "apply_t5_attn_mask": family == "chroma"}
    if family == "flux1":
        values["clip_l"] = str(files["clip_l"])
    data = deep_merge(default_config_dict(), {"model": {**values, **model}})
    return validate_config(data, check_packages=False)


def found(config, base: Path) -> list[tuple[str, str, str]]:
    """(code, where, message + hint) of each finding."""
    return [(f.code, f.where, f"{f.message} -> {f.hint}") for f in model_findings(config, base)]


def test_matching_files_have_no_findings(dev, chroma, tmp_path):
    assert found(flux_config(dev), tmp_path) == []
    assert found(flux_config(chroma, "chroma"), tmp_path) == []
    assert found(flux_config(dev, "auto", clip_l=str(dev["clip_l"])), tmp_path) == []


def test_a_missing_file_is_named_with_its_field(dev, tmp_path):
    missing = tmp_path / "ae.safetensors"
    [(code, where, text)] = found(flux_config(dev, ae=str(missing)), tmp_path)
    assert code == "model-file-missing" and where == str(missing)
    assert text.startswith("model.ae: no such file") and "ae.safetensors" in text.split("->")[1]
    # relative paths start from the config's folder, as the run reads them
    shutil.copy(dev["ae"], tmp_path / "my-ae.safetensors")
    assert found(flux_config(dev, ae="my-ae.safetensors"), tmp_path) == []


def test_files_in_the_wrong_fields_are_named(dev, tmp_path):
    swapped = found(flux_config(dev, t5xxl=str(dev["clip_l"]), ae=str(dev["t5xxl"])), tmp_path)
    assert [(code, where) for code, where, _ in swapped] == [("model-file", str(dev["clip_l"])),
                                                             ("model-file", str(dev["t5xxl"]))]
    assert swapped[0][2].startswith("model.t5xxl: not a T5 encoder")
    assert swapped[1][2].startswith("model.ae: no autoencoder weights")
    [(_, where, text)] = found(flux_config(dev, pretrained_model_name_or_path=str(dev["ae"])), tmp_path)
    assert where == str(dev["ae"]) and text.startswith("model.pretrained_model_name_or_path: not a FLUX.1/Chroma")


def test_files_that_do_not_fit_together(dev, chroma, tmp_path):
    [(code, _, text)] = found(flux_config(dev, pretrained_model_name_or_path=str(chroma["model"])), tmp_path)
    assert code == "model-file" and "this is a Chroma model, but model.model_family is 'flux1'" in text
    assert "set model.model_family to chroma" in text
    # a T5 of another width than the transformer's text input, and an SD-like 4-channel AE
    narrow_t5 = rewrite_header(dev["t5xxl"], tmp_path / "t5.safetensors", "shared.weight", [96, 16])
    sd_vae = rewrite_header(dev["ae"], tmp_path / "vae.safetensors", "encoder.conv_out.weight", [8, 64, 3, 3])
    findings = found(flux_config(dev, t5xxl=str(narrow_t5), ae=str(sd_vae)), tmp_path)
    assert [(code, where) for code, where, _ in findings] == [("model-files-mismatch", str(narrow_t5)),
                                                              ("model-files-mismatch", str(sd_vae))]
    assert "a T5 16 wide, but the transformer takes 32-wide" in findings[0][2]
    assert "4 latent channels" in findings[1][2] and "16-channel AE" in findings[1][2]


def test_a_lora_or_a_broken_file_is_refused(dev, tmp_path):
    broken = tmp_path / "ae.safetensors"
    broken.write_bytes(b"\x00" * 16)
    [(_, where, text)] = found(flux_config(dev, ae=str(broken)), tmp_path)
    assert where == str(broken) and "not a readable safetensors file" in text
    lora = tmp_path / "lora.safetensors"
    write_header(lora, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": [4, 64]})
    [(_, _, text)] = found(flux_config(dev, t5xxl=str(lora)), tmp_path)
    assert "this is a LoRA file" in text


def test_sd_configs_and_unknown_families_get_no_model_findings(dev, tiny_models, tmp_path):
    data = deep_merge(default_config_dict(), {"model": {"model_family": "sd1",
                                                        "pretrained_model_name_or_path": str(tiny_models["sd1_ckpt"])}})
    assert model_findings(validate_config(data, check_packages=False), tmp_path) == []
    data["model"]["model_family"] = "auto"
    assert model_findings(validate_config(data, check_packages=False), tmp_path) == []


def test_the_doctor_reports_them_with_the_dataset(dev, tiny_models, tmp_path):
    data = deep_merge(default_config_dict(), {
        "model": {"model_family": "flux1", "pretrained_model_name_or_path": str(dev["model"]),
                  "clip_l": str(dev["clip_l"]), "t5xxl": str(dev["t5xxl"]), "ae": str(tmp_path / "no-ae.sft")},
        "dataset": {"train_data_dir": str(tiny_models["dataset_img"]), "general": {"bucket_reso_steps": 16}}})
    report = run_doctor(validate_config(data, check_packages=False), tmp_path, quick=True).to_dict()
    assert not report["ok"]
    missing = [f["where"] for f in report["findings"] if f["code"] == "model-file-missing"]
    assert missing == [str(tmp_path / "no-ae.sft")]


def test_the_header_reader_matches_safetensors_and_stays_light(dev):
    from safetensors import safe_open

    header = read_safetensors_header(dev["model"])
    with safe_open(str(dev["model"]), "pt") as handle:
        assert header.shapes == {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    code = ("import sys; from pathlib import Path; from engine.data.model_findings import model_findings; "
            "from engine.config.io import deep_merge, default_config_dict, validate_config; "
            f"files = {json.dumps({k: str(v) for k, v in dev.items()})}; "
            "data = deep_merge(default_config_dict(), {'model': {'model_family': 'flux1', "
            "'pretrained_model_name_or_path': files['model'], 'clip_l': files['clip_l'], 't5xxl': files['t5xxl'], "
            "'ae': files['ae']}}); "
            "assert model_findings(validate_config(data, check_packages=False), Path('.')) == []; "
            "print(sorted(m for m in ('torch', 'safetensors', 'transformers', 'diffusers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "[]"


def write_header(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A safetensors file with float32 zeros of `shapes` (written by hand, as the header is all that is read)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 4
        for side in shape:
            size *= side
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\x00" * offset)
    return path


def rewrite_header(source: Path, target: Path, key: str, shape: list[int]) -> Path:
    """`source`'s keys and shapes with one shape changed (the checks read nothing but the header)."""
    shapes = {k: list(v) for k, v in read_safetensors_header(source).shapes.items()}
    assert key in shapes
    shapes[key] = shape
    return write_header(target, shapes)
