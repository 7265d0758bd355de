"""Class images from FLUX.1 dev and Chroma base files (`python -m engine class-images` with --clip-l/--t5xxl/--ae):
numbered images and captions, one seed gives the same pixels, the events, and a missing component named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flux_tiny import tiny_flux_files
from PIL import Image

from engine.class_images import ClassImageSettings, sample_request
from engine.cli import main
from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK
from engine.rundir.event_reader import read_events

PROMPT = "a photo of a dog"


def cli(files: dict[str, Path], out: Path, *extra: str, seed: str = "5", components=("clip_l", "t5xxl", "ae")) -> int:
    flags = {"clip_l": "--clip-l", "t5xxl": "--t5xxl", "ae": "--ae"}
    parts = [part for name in components for part in (flags[name], str(files[name]))]
    return main(["class-images", "--model", str(files["model"]), *parts, "--tokenizer-cache-dir",
                 str(files["t5_tokenizer"]), "--prompt", PROMPT, "--count", "2", "--out", str(out), "--width", "64",
                 "--height", "64", "--steps", "2", "--seed", seed, "--device", "cpu", *extra])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def dev() -> dict[str, Path]:
    return tiny_flux_files("dev")


def test_flux_dev_class_images_are_written_with_captions_events_and_seeded_pixels(dev, tmp_path):
    out, events_file = tmp_path / "reg" / "1_dog", tmp_path / "events.jsonl"
    assert cli(dev, out, "--events", str(events_file)) == EXIT_OK
    assert sorted(entry.name for entry in out.iterdir()) == ["0001.png", "0001.txt", "0002.png", "0002.txt"]
    assert all(Image.open(out / name).size == (64, 64) for name in ("0001.png", "0002.png"))
    assert (out / "0002.txt").read_text(encoding="utf-8") == PROMPT
    events = read_events(events_file)
    by_type = {event["type"]: event for event in events}
    assert by_type["start"]["total"] == 2
    assert [event["done"] for event in events if event["type"] == "progress"][-1] == 2
    assert by_type["done"] | {"time": 0} == {"type": "done", "time": 0, "task": "class-images", "ok": True,
                                             "written": 2, "seed": 5, "folder": str(out),
                                             "files": [str(out / "0001.png"), str(out / "0002.png")]}
    assert "error" not in by_type

    again = tmp_path / "again"
    assert cli(dev, again, seed="6") == EXIT_OK  # image 1 of seed 5 is image 0 of seed 6
    assert np.array_equal(pixels(out / "0002.png"), pixels(again / "0001.png"))
    assert not np.array_equal(pixels(out / "0001.png"), pixels(out / "0002.png"))
    assert pixels(out / "0001.png").std() > 0  # decoded from latents, not a blank image

    guided = tmp_path / "guided"  # --guidance is FLUX's embedded guidance, which dev's transformer reads
    assert cli(dev, guided, "--guidance", "9") == EXIT_OK
    assert not np.array_equal(pixels(out / "0001.png"), pixels(guided / "0001.png"))


def test_flux_defaults_come_from_the_sampler_and_sd_guidance_stays_the_cfg_scale():
    settings = ClassImageSettings(prompt=PROMPT, count=1, seed=0)
    flux = sample_request(settings, "flux1", v_prediction=False, index=0)
    assert (flux.width, flux.height, flux.steps, flux.scale, flux.guidance) == (1024, 1024, 20, 1.0, 3.5)
    sd = sample_request(settings, "sd1", v_prediction=False, index=0)
    assert (sd.width, sd.steps, sd.scale) == (512, 30, 7.5)


def test_chroma_class_images_need_no_clip_l(tmp_path):
    chroma = tiny_flux_files("chroma")
    out = tmp_path / "1_dog"
    assert cli(chroma, out, "--apply-t5-attn-mask", "--width", "72", "--events", str(tmp_path / "e.jsonl"),
               components=("t5xxl", "ae")) == EXIT_OK
    assert sorted(entry.name for entry in out.iterdir()) == ["0001.png", "0001.txt", "0002.png", "0002.txt"]
    assert Image.open(out / "0001.png").size == (64, 64)  # FLUX sizes are multiples of 16 (2x2 latent patches)
    events = read_events(tmp_path / "e.jsonl")
    assert events[-1]["written"] == 2
    assert any(event["message"] == "--width 72 is not a multiple of 16; using 64" for event in events
               if event["type"] == "warning")


def test_a_missing_ae_is_named_with_its_flag(dev, tmp_path, capsys):
    out, events_file = tmp_path / "1_dog", tmp_path / "events.jsonl"
    code = cli(dev, out, "--events", str(events_file), components=("clip_l", "t5xxl"))
    assert code == EXIT_BAD_INPUT
    error = next(event for event in read_events(events_file) if event["type"] == "error")
    assert "--ae" in error["message"] and "ae.safetensors" in error["message"]
    assert "model.ae" not in error["message"]  # the user typed flags, not config keys
    assert "--ae" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_the_regularization_tabs_command_carries_the_configured_flux_files(dev, tmp_path):
    from engine.config.io import default_config_dict
    from engine.config.paths import set_path
    from gui.views import regularization as view

    config = default_config_dict()
    for path, value in ((view.MODEL_PATH, str(dev["model"])), ("model.model_family", "flux1"),
                        ("model.clip_l", str(dev["clip_l"])), ("model.t5xxl", str(dev["t5xxl"])),
                        ("model.ae", str(dev["ae"])), ("model.tokenizer_cache_dir", str(dev["t5_tokenizer"])),
                        (view.T5_LENGTH, 32), (view.T5_MASK, True)):
        set_path(config, path, value)
    out = tmp_path / "1_dog"
    request = view.GenerateRequest(model=str(dev["model"]), out=str(out), prompt=PROMPT, count=1, steps=2, width=64,
                                   height=64, seed=3)
    args = view.class_images_args(request, config)
    assert args[args.index("--ae") + 1] == str(dev["ae"]) and "--apply-t5-attn-mask" in args
    assert args[args.index("--t5xxl-max-token-length") + 1] == "32"
    assert main([*args, "--device", "cpu"]) == EXIT_OK
    assert sorted(entry.name for entry in out.iterdir()) == ["0001.png", "0001.txt"]
    assert set(view.generate_paths(request, config).values()) >= {str(dev[name]) for name in ("clip_l", "t5xxl", "ae")}

    set_path(config, "model.model_family", "sdxl")  # an SD family loads no component files: none are passed
    assert not {"--ae", "--clip-l", "--apply-t5-attn-mask"} & set(view.class_images_args(request, config))
