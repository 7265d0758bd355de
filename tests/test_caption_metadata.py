"""`python -m engine caption` with the real tiny models: captions into fine-tune metadata (read back by the trainer's
dataset scan), GIFs captioned, and offline errors that name what each captioner's folder needs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.config.io import validate_config
from engine.data.scan import scan_config

REPO = Path(__file__).resolve().parents[1]


def engine(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    pictures = tmp_path / "train"
    pictures.mkdir()
    Image.new("RGB", (128, 96), (220, 40, 40)).save(pictures / "red.png")
    frames = [Image.new("P", (96, 128), 3), Image.new("P", (96, 128), 9)]
    frames[0].save(pictures / "moving.gif", save_all=True, append_images=frames[1:])
    return pictures


@pytest.mark.parametrize(("captioner", "needs"), [
    ("wd14", ["model.onnx", "selected_tags.csv"]),
    ("blip", ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"]),
    ("git", ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"]),
])
def test_offline_error_names_the_files_and_how_to_give_a_folder(folder, tmp_path, captioner, needs):
    result = engine("caption", folder, "--captioner", captioner, env={"HOME": str(tmp_path)})  # an empty model cache
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr
    assert "cannot reach the Hugging Face hub" in message and f"A {captioner.upper()} model folder needs" in message
    assert all(name in message for name in needs), message
    assert "--model /path/to/folder" in message and "Model box of the Captioning tab" in message
    if captioner == "wd14":
        assert "config.json" not in message  # not a transformers folder


def test_a_wd14_folder_without_its_csv_is_a_plain_error(folder, tmp_path, tiny_models):
    partial = tmp_path / "wd14"
    partial.mkdir()
    shutil.copy(tiny_models["wd14"] / "model.onnx", partial)
    result = engine("caption", folder, "--captioner", "wd14", "--model", partial)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "selected_tags.csv" in result.stderr and str(partial) in result.stderr


@pytest.mark.slow
def test_wd14_and_blip_write_one_metadata_file_the_trainer_reads(folder, tmp_path, tiny_models):
    tags = tmp_path / "tags.json"
    events = tmp_path / "events.jsonl"
    result = engine("caption", folder, "--captioner", "wd14", "--model", tiny_models["wd14"], "--metadata", tags,
                    "--general-threshold", "0.0", "--events", events)
    assert result.returncode == 0, result.stderr
    assert not list(folder.glob("*.txt"))  # no caption files: the metadata holds them
    written = json.loads(tags.read_text(encoding="utf-8"))
    assert set(written) == {"red", "moving"} and all(set(entry) == {"tags"} for entry in written.values())
    progress = [json.loads(line) for line in events.read_text().splitlines() if '"progress"' in line]
    assert progress[-1]["done"] == progress[-1]["total"] == 2

    both = tmp_path / "both.json"
    result = engine("caption", folder, "--captioner", "blip", "--model", tiny_models["blip"], "--metadata", both,
                    "--in-json", tags, "--max-length", "8")
    assert result.returncode == 0, result.stderr
    merged = json.loads(both.read_text(encoding="utf-8"))
    assert {key: set(entry) for key, entry in merged.items()} == {"red": {"tags", "caption"},
                                                                   "moving": {"tags", "caption"}}
    assert json.loads(tags.read_text(encoding="utf-8")) == written  # the input is never changed

    # The GIF is captioned; the trainer (which reads png/jpg/webp/bmp) reads the entry of the PNG.
    config = validate_config({"method": "finetune", "dataset": {
        "train_data_dir": str(folder), "in_json": str(both),
        "general": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 256}}}, check_packages=False)
    records = [record for d in scan_config(config, tmp_path).datasets for s in d.subsets for record in s.records]
    assert [(record.path.name, record.caption) for record in records] == [
        ("red.png", f"{merged['red']['caption']},{merged['red']['tags']}")]


def test_an_existing_metadata_output_is_refused_before_the_model_loads(folder, tmp_path):
    existing = tmp_path / "meta.json"
    existing.write_text("{}", encoding="utf-8")
    result = engine("caption", folder, "--captioner", "wd14", "--model", tmp_path / "no-such-model",
                    "--metadata", existing)
    assert result.returncode == 2 and "never overwritten" in result.stderr and "no-such-model" not in result.stderr
    assert existing.read_text(encoding="utf-8") == "{}"
    result = engine("caption", folder, "--captioner", "wd14", "--in-json", existing)
    assert result.returncode == 2 and "--metadata" in result.stderr
