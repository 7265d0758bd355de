"""`python -m engine caption` and `captions edit` end to end, with the real tiny WD14 and BLIP models."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.rundir.event_reader import read_events

REPO = Path(__file__).resolve().parents[1]


def engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def image_folder(root: Path) -> Path:
    folder = root / "pics"
    folder.mkdir()
    Image.new("RGB", (80, 64), (220, 40, 40)).save(folder / "red.png")
    Image.new("RGBA", (64, 64), (0, 0, 255, 128)).save(folder / "blue.png")
    Image.new("L", (64, 96), 30).save(folder / "grey.jpg")
    (folder / "broken.jpg").write_text("not an image")
    (folder / "blue.txt").write_text("mine, keep\n")
    return folder


def test_wd14_captions_a_folder_skipping_existing_and_broken_files(tiny_models, tmp_path):
    folder = image_folder(tmp_path)
    events = tmp_path / "events.jsonl"
    result = engine("caption", str(folder), "--captioner", "wd14", "--model", str(tiny_models["wd14"]),
                    "--general-threshold", "0.0", "--prefix", "sks", "--events", str(events))
    assert result.returncode == 0, result.stderr
    assert "failed: " in result.stderr and "broken.jpg" in result.stderr
    assert (folder / "blue.txt").read_text() == "mine, keep\n"
    red = (folder / "red.txt").read_text().strip().split(", ")
    assert red[0] == "sks" and len(red) > 1
    assert (folder / "grey.txt").exists() and not (folder / "broken.txt").exists()
    assert "written: 2" in result.stdout and "most frequent tags" in result.stdout
    types = [event["type"] for event in read_events(events)]
    assert types[0] == "start" and "progress" in types and types[-1] == "done" and "warning" in types


def test_wd14_append_mode_merges_into_existing_captions(tiny_models, tmp_path):
    folder = image_folder(tmp_path)
    result = engine("caption", str(folder), "--captioner", "wd14", "--model", str(tiny_models["wd14"]),
                    "--mode", "append", "--general-threshold", "0.0")
    assert result.returncode == 0, result.stderr
    tags = (folder / "blue.txt").read_text().strip().split(", ")
    assert tags[:2] == ["mine", "keep"] and len(tags) > 2 and len(tags) == len(set(tags))


@pytest.mark.slow
def test_blip_dry_run_prints_and_writes_nothing(tiny_models, tmp_path):
    folder = image_folder(tmp_path)
    result = engine("caption", str(folder), "--captioner", "blip", "--model", str(tiny_models["blip"]),
                    "--mode", "overwrite", "--dry-run", "--max-length", "10")
    assert result.returncode == 0, result.stderr
    assert "red.png: " in result.stdout and result.stdout.count("\n") >= 4
    assert (folder / "blue.txt").read_text() == "mine, keep\n" and not (folder / "red.txt").exists()
    planned = dict(re.findall(r"^(\S+\.(?:png|jpg)): (.*)$", result.stdout, re.MULTILINE))
    written = engine("caption", str(folder), "--captioner", "blip", "--model", str(tiny_models["blip"]),
                     "--mode", "overwrite", "--max-length", "10", "--prefix", "sks")
    assert written.returncode == 0, written.stderr
    assert (folder / "red.txt").read_text() == f"sks, {planned['red.png']}\n"
    assert (folder / "blue.txt").read_text().startswith("sks, ")


def test_an_option_of_another_captioner_is_refused(tiny_models, tmp_path):
    result = engine("caption", str(image_folder(tmp_path)), "--captioner", "blip", "--model",
                    str(tiny_models["blip"]), "--general-threshold", "0.5")
    assert result.returncode == 2 and "does not apply to blip" in result.stderr


def test_captions_edit_writes_only_changed_files(tmp_path):
    folder = image_folder(tmp_path)
    (folder / "red.txt").write_text("1girl, red, red\n")
    result = engine("captions", "edit", str(folder), "--remove-tag", "keep", "--add-tag", "solo", "--dedupe",
                    "--prefix", "sks")
    assert result.returncode == 0, result.stderr
    assert (folder / "red.txt").read_text() == "sks, 1girl, red, solo\n"
    assert (folder / "blue.txt").read_text() == "sks, mine, solo\n"
    assert "changed: 2" in result.stdout
    json.dumps(result.stdout)  # plain text output


@pytest.mark.slow
def test_git_captions_a_folder_recursively_with_another_extension(tiny_models, tmp_path):
    folder = image_folder(tmp_path)
    (folder / "nested").mkdir()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "nested" / "green.webp")
    result = engine("caption", str(folder), "--captioner", "git", "--model", str(tiny_models["git"]),
                    "--recursive", "--caption-extension", ".caption", "--max-length", "12")
    assert result.returncode == 0, result.stderr
    for name in ("red", "blue", "grey", "nested/green"):
        assert (folder / f"{name}.caption").read_text().strip(), name
    assert (folder / "blue.txt").read_text() == "mine, keep\n"
