"""Cache files holding NaN or infinity are refused when loaded, naming the file and how to rebuild it: a real cache
built on the tiny model, then damaged. Training on such an entry would make the loss, then the weights, NaN."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from train_helpers import engine_here, events_of, run_engine, write_config

from engine.cache.entries import NonFiniteEntry
from engine.cache.latent_files import load_entry as load_latents
from engine.cache.text_encoder import build_text_encoder_cache, cache_path, jobs_from_scan
from engine.cache.text_encoder import load_entry as load_text
from engine.config.io import validate_config
from engine.data.scan import scan_config


def poison(path: Path, member: str, value: float = np.nan) -> None:
    """Rewrite one array of an .npz with a non-finite value in it, keeping its key: the file still "matches"."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays[member] = arrays[member].copy()
    arrays[member].flat[3] = value
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


@pytest.mark.slow
def test_a_nan_latent_cache_file_stops_training_with_its_name_and_cache_latents_rebuilds_it(tiny_models, tmp_path):
    images = tmp_path / "img"
    shutil.copytree(tiny_models["dataset_img"], images)
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", training={"max_train_steps": 2},
                          dataset={"train_data_dir": str(images)})
    overrides = ["--set", "training.cache_latents=true", "--set", "training.cache_latents_to_disk=true"]
    assert engine_here("cache-latents", str(config), *overrides) == 0  # in this process: the cache is the subject
    entries = sorted(images.rglob("*.npz"))
    assert entries
    damaged = entries[0]
    load_latents(damaged)  # finite as written
    poison(damaged, "latents")
    with pytest.raises(NonFiniteEntry) as refused:
        load_latents(damaged)
    assert str(damaged) in str(refused.value) and "cache-latents CONFIG --force" in str(refused.value)

    result = run_engine("train", str(config), *overrides, "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    events = events_of(tmp_path / "run")
    error = next(event for event in events if event["type"] == "error")
    assert str(damaged) in error["message"] and "NaN" in error["message"]
    assert "cache-latents" in error["hint"] and error["where"] == str(damaged)
    assert events[-1]["type"] == "done" and not events[-1]["ok"]
    assert not list((tmp_path / "out").glob("*.safetensors"))  # nothing was trained on it

    assert engine_here("cache-latents", str(config), *overrides, "--force") == 0  # what the message says to do
    assert np.isfinite(load_latents(damaged).latents).all()
    assert engine_here("train", str(config), *overrides, "--run-dir", str(tmp_path / "run2")) == 0


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_text_encoder_cache_file_is_refused_with_its_name(tiny_models, tmp_path, value):
    from engine.models.text_encoders import load_text_encoders

    images = tmp_path / "img"
    shutil.copytree(tiny_models["dataset_img"], images)
    config = validate_config({"dataset": {"train_data_dir": str(images),
                                          "general": {"resolution": 64, "min_bucket_reso": 64}}},
                             check_packages=False)
    jobs = jobs_from_scan(scan_config(config, tmp_path))
    report = build_text_encoder_cache(jobs, load_text_encoders(tiny_models["sd1"]), clip_skip=1,
                                      max_token_length=75)
    assert report.encoded == len(jobs) and not report.failed
    damaged = cache_path(jobs[0].record.path, "sd1")
    assert np.isfinite(load_text(damaged).hidden_states).all()
    poison(damaged, "hidden_states", value)
    with pytest.raises(NonFiniteEntry) as refused:
        load_text(damaged)
    assert str(damaged) in str(refused.value) and "delete it" in str(refused.value)
