"""`python -m engine cache-latents`: matching entries are kept by default (--force re-encodes, --skip-existing is
still accepted), and a caption problem does not stop latent caching, in the command and in the trainer's own step."""

import json
import shutil

import pytest

from engine.cli import main
from engine.config.io import load_preset, save_config
from tests.train_helpers import REPO, events_of, run_engine, write_config

BAD_CAPTION = "caf\xe9 dog\n".encode("latin-1")  # "café" in Latin-1: not UTF-8


@pytest.fixture
def demo_run(tiny_models, tmp_path):
    """The demo preset on a private copy of the tiny model and dataset (caches are written beside the images)."""
    (tmp_path / "demo").mkdir()
    shutil.copyfile(tiny_models["sd1_ckpt"], tmp_path / "demo" / "sd1.safetensors")
    shutil.copytree(tiny_models["dataset"], tmp_path / "demo" / "dataset")
    save_config(load_preset(REPO / "presets" / "demo.json"), tmp_path / "config.toml")
    return tmp_path


def cache(run, capsys, *flags):
    code = main(["cache-latents", str(run / "config.toml"), "--device", "cpu", "--events", str(run / "events.jsonl"),
                 *flags])
    out, err = capsys.readouterr()
    return code, out.strip(), err


def test_matching_entries_are_kept_by_default_and_force_re_encodes_them(demo_run, capsys):
    assert cache(demo_run, capsys)[:2] == (0, "14 image(s): encoded 14 (rebuilt stale 0), reused 0, failed 0")
    assert cache(demo_run, capsys)[:2] == (0, "14 image(s): encoded 0 (rebuilt stale 0), reused 14, failed 0")
    assert cache(demo_run, capsys, "--skip-existing")[:2] == (
        0, "14 image(s): encoded 0 (rebuilt stale 0), reused 14, failed 0")
    assert cache(demo_run, capsys, "--force")[:2] == (
        0, "14 image(s): encoded 14 (rebuilt stale 0), reused 0, failed 0")
    with pytest.raises(SystemExit) as exit_info:
        cache(demo_run, capsys, "--force", "--skip-existing")
    assert exit_info.value.code == 2
    assert "not allowed with argument --force" in capsys.readouterr().err


def test_a_caption_that_is_not_utf8_does_not_stop_latent_caching(demo_run, capsys):
    caption = demo_run / "demo" / "dataset" / "img" / "10_sks dog" / "01_red_square.txt"
    caption.write_bytes(BAD_CAPTION)
    code, out, err = cache(demo_run, capsys)
    assert (code, out) == (0, "14 image(s): encoded 14 (rebuilt stale 0), reused 0, failed 0")
    assert f"warning: {caption}: " in err and "not UTF-8" in err and "training stops on it" in err
    events = [json.loads(line) for line in (demo_run / "events.jsonl").read_text().splitlines()]
    warning = next(event for event in events if event["type"] == "warning")
    assert warning["where"] == str(caption) and "not UTF-8" in warning["message"]
    assert events[-1]["type"] == "done" and events[-1]["ok"]
    assert len(list(caption.parent.glob("*_64x64_sd.npz"))) == 6  # every image of the folder, the bad caption's too
    assert (caption.parent / "01_red_square_64x64_sd.npz").is_file()


def test_what_affects_latents_still_stops_the_command(demo_run, capsys):
    shutil.rmtree(demo_run / "demo" / "dataset" / "reg")
    code, _, err = cache(demo_run, capsys)
    assert code == 2 and "the regularization folder does not exist" in err


@pytest.mark.slow
def test_training_caches_latents_to_disk_before_refusing_a_bad_caption(tiny_models, tmp_path):
    """The run stops on the caption before training, but after its latents are on disk: fixing the caption costs no
    re-encoding."""
    images = shutil.copytree(tiny_models["dataset_img"], tmp_path / "img")
    caption = images / "10_sks dog" / "01_red_square.txt"
    caption.write_bytes(BAD_CAPTION)
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", dataset={"train_data_dir": str(images)},
                          training={"cache_latents": True, "cache_latents_to_disk": True, "max_train_steps": 2})
    result = run_engine("train", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    error = next(event for event in events_of(tmp_path / "out") if event["type"] == "error")
    assert str(caption) in error["message"] and "not UTF-8" in error["message"]
    assert len(list(images.rglob("*_64x64_sd.npz"))) == 6
    caption.write_text("sks dog, red square\n", encoding="utf-8")
    result = run_engine("train", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reused 6" in (tmp_path / "out" / "train.log").read_text()


def test_the_tools_page_passes_force_when_up_to_date_entries_are_not_kept():
    from gui.tools_commands import cache_args

    assert cache_args("run.toml", skip_existing=True) == ["cache-latents", "run.toml", "--skip-existing"]
    assert cache_args("run.toml", skip_existing=False) == ["cache-latents", "run.toml", "--force"]
