"""Class images (`python -m engine class-images`): files, captions, numbering, seeds, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.class_images import ClassImageSettings, generate_class_images, image_seed, next_number, sampler_parts
from engine.cli import main
from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK
from engine.rundir.event_reader import read_events

PROMPT = "a photo of a dog"
# diffusers' own numpy deprecations in the schedulers; recording thousands of them only slows the tests down
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def sd1(tiny_models):
    from engine.models.loading import load_model

    return sampler_parts(load_model(tiny_models["sd1"]))


def generate(parts, out_dir: Path, *, count: int, seed: int) -> list[Path]:
    import torch

    settings = ClassImageSettings(prompt=PROMPT, count=count, seed=seed, width=64, height=64, steps=1)
    return generate_class_images(parts, settings, out_dir, device="cpu", dtype=torch.float32)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_images_and_captions_are_written_as_numbered_pairs(sd1, tmp_path):
    out = tmp_path / "reg" / "1_dog"  # created with its parents
    written = generate(sd1, out, count=2, seed=1)
    assert written == [out / "0001.png", out / "0002.png"]
    for image in written:
        assert Image.open(image).size == (64, 64)
        assert image.with_suffix(".txt").read_text(encoding="utf-8") == PROMPT
    assert sorted(entry.name for entry in out.iterdir()) == ["0001.png", "0001.txt", "0002.png", "0002.txt"]


def test_numbering_continues_after_existing_files_and_overwrites_nothing(sd1, tmp_path):
    out = tmp_path / "1_dog"
    out.mkdir()
    mine = {"0005.jpg": b"user image", "0009.txt": b"a caption of mine", "portrait.png": b"x", "12a.png": b"y"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    assert next_number(out) == 10  # the highest number of any entry, image or caption
    written = generate(sd1, out, count=1, seed=1)
    assert written == [out / "0010.png"]
    assert {name: (out / name).read_bytes() for name in mine} == mine


def test_same_seed_same_pixels_and_image_i_uses_seed_plus_i(sd1, tmp_path):
    first = generate(sd1, tmp_path / "a", count=2, seed=41)
    again = generate(sd1, tmp_path / "b", count=1, seed=41)
    second_alone = generate(sd1, tmp_path / "c", count=1, seed=42)
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert np.array_equal(pixels(first[1]), pixels(second_alone[0]))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))
    assert image_seed(2**32 - 1, 1) == 0  # seeds stay in the 32-bit range people see


def test_a_stopped_round_keeps_its_images_and_leaves_no_scratch_files(sd1, tmp_path):
    import torch

    out = tmp_path / "1_dog"
    seen = []

    def stop_after_first(path: Path) -> None:
        seen.append(path)
        raise KeyboardInterrupt

    settings = ClassImageSettings(prompt=PROMPT, count=3, seed=1, width=64, height=64, steps=1)
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(sd1, settings, out, device="cpu", dtype=torch.float32, on_image=stop_after_first)
    assert seen == [out / "0001.png"]
    assert sorted(entry.name for entry in out.iterdir()) == ["0001.png", "0001.txt"]  # no hidden scratch folder


def cli(*args: str) -> int:
    return main(["class-images", *args])


def test_the_command_generates_from_an_sdxl_checkpoint_with_events(tiny_models, tmp_path):
    out, events_file = tmp_path / "dogs", tmp_path / "events.jsonl"
    code = cli("--model", str(tiny_models["sdxl_ckpt"]), "--prompt", PROMPT, "--count", "2", "--out", str(out),
               "--width", "64", "--height", "70", "--steps", "1", "--seed", "7", "--events", str(events_file))
    assert code == EXIT_OK
    events = read_events(events_file)
    by_type = {event["type"]: event for event in events}
    assert by_type["start"]["total"] == 2
    assert [event["done"] for event in events if event["type"] == "progress"][-1] == 2
    assert by_type["done"]["ok"] is True and by_type["done"]["written"] == 2 and by_type["done"]["seed"] == 7
    warnings = " ".join(event["message"] for event in events if event["type"] == "warning")
    assert "70 is not a multiple of 8" in warnings and "'dogs' is not '<repeats>_<class>'" in warnings
    assert by_type["done"]["files"] == [str(out / "0001.png"), str(out / "0002.png")]
    assert all(Image.open(out / name).size == (64, 64) for name in ("0001.png", "0002.png"))
    assert (out / "0002.txt").read_text(encoding="utf-8") == PROMPT


@pytest.mark.parametrize("case", ["missing model", "out is a file", "count 0", "too small"])
def test_bad_input_exits_2_and_names_what_to_fix(case, tiny_models, tmp_path, capsys):
    model, out, count, extra = str(tiny_models["sd1"]), tmp_path / "1_dog", "1", []
    if case == "missing model":
        model = str(tmp_path / "no-such-model.safetensors")
    elif case == "out is a file":
        out.write_text("not a folder")
    elif case == "count 0":
        count = "0"
    else:
        extra = ["--width", "32"]
    events_file = tmp_path / "events.jsonl"
    code = cli("--model", model, "--prompt", PROMPT, "--count", count, "--out", str(out), "--events", str(events_file),
               *extra)
    assert code == EXIT_BAD_INPUT
    expected = {"missing model": model, "out is a file": str(out), "count 0": "--count 0", "too small": "--width 32"}
    error = next(event for event in read_events(events_file) if event["type"] == "error")
    assert expected[case] in error["message"] and error["hint"]
    assert expected[case] in capsys.readouterr().err
    assert json.loads(events_file.read_text().splitlines()[-1]) | {"time": 0} == \
        {"type": "done", "time": 0, "task": "class-images", "ok": False, "written": 0}
    assert not out.is_dir() or not any(out.iterdir())  # nothing written
