"""The VAE loader and the latent cache: exact latents, reuse, every invalidation, failures, and the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cache.latent_files import FAMILY_SUFFIX, read_key
from engine.cache.latents import (
    build_latent_cache,
    cache_path,
    entry_status,
    expected_key,
    jobs_from_scan,
    load_entry,
    stale_cache_findings,
)
from engine.config.io import load_preset, save_config, validate_config
from engine.data.buckets import BucketAssignment
from engine.data.scan import scan_config
from engine.data.transforms import prepare, to_model_tensor
from engine.models import vae_to_ldm
from engine.models.ldm_checkpoint import save_ldm_checkpoint
from engine.models.vae import VaeLoadError, load_vae, weights_identity

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd1_vae(tiny_models):
    return load_vae(tiny_models["sd1"])


@pytest.fixture
def dataset(tiny_models, tmp_path):
    """A private copy of the tiny dataset: caches are written beside the images."""
    return Path(shutil.copytree(tiny_models["dataset"], tmp_path / "dataset"))


def scan_jobs(root: Path, reg: bool = True, **general):
    settings = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_no_upscale": False, **general}
    folders = {"train_data_dir": str(root / "img"), **({"reg_data_dir": str(root / "reg")} if reg else {})}
    config = validate_config({"dataset": {**folders, "general": settings}}, check_packages=False)
    return jobs_from_scan(scan_config(config, root))


def encode(vae, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return vae.vae.encode(to_model_tensor(pixels)[None]).latent_dist.mode()[0].numpy()


def entry_of(job, family="sd1", cache_dir=None):
    return load_entry(cache_path(job.record.path, job.record.bucket, family, cache_dir))


# --- loading the VAE ---------------------------------------------------------------------------------------------


def test_single_files_give_the_same_weights_as_the_folders(tiny_models, sd1_vae):
    from_file = load_vae(tiny_models["sd1_ckpt"])
    assert (from_file.family, from_file.scaling_factor, sd1_vae.family) == ("sd1", 0.18215, "sd1")
    assert from_file.identity == sd1_vae.identity
    assert all(torch.equal(a, b) for a, b in zip(from_file.vae.state_dict().values(),
                                                 sd1_vae.vae.state_dict().values(), strict=True))
    sdxl_file, sdxl_folder = load_vae(tiny_models["sdxl_ckpt"]), load_vae(tiny_models["sdxl"])
    assert (sdxl_file.family, sdxl_file.scaling_factor) == ("sdxl", 0.13025)
    assert sdxl_file.identity == sdxl_folder.identity != sd1_vae.identity


def test_standalone_vae_files_need_a_family_unless_the_model_tells_it(tiny_models, sd1_vae, tmp_path):
    ldm = {key.removeprefix("first_stage_model."): t for key, t in vae_to_ldm(sd1_vae.vae.state_dict()).items()}
    standalone = save_ldm_checkpoint(ldm, tmp_path / "vae-ft-mse.safetensors")
    with pytest.raises(VaeLoadError, match="does not say which model family.*set model.model_family"):
        load_vae("", standalone)
    assert load_vae("", standalone, family="sd1").identity == sd1_vae.identity
    with_model = load_vae(tiny_models["sdxl_ckpt"], standalone)  # the family comes from the base model
    assert (with_model.family, with_model.scaling_factor) == ("sdxl", 0.13025)
    diffusers_keys = save_ldm_checkpoint(sd1_vae.vae.state_dict(), tmp_path / "diffusers-vae.safetensors")
    assert load_vae("", diffusers_keys, family="sd2").identity == sd1_vae.identity


def test_missing_files_and_offline_hub_ids_say_what_to_do(tmp_path):
    with pytest.raises(VaeLoadError, match=r"model not found: .*nope\.safetensors"):
        load_vae(tmp_path / "nope.safetensors")
    with pytest.raises(VaeLoadError, match="offline.*huggingface-cli download some-org/some-model"):
        load_vae("some-org/some-model")


def test_identity_changes_with_one_weight(sd1_vae):
    state = {key: tensor.clone() for key, tensor in sd1_vae.vae.state_dict().items()}
    assert weights_identity(state) == sd1_vae.identity
    state["encoder.conv_in.bias"][0] += 1e-3
    assert weights_identity(state) != sd1_vae.identity


# --- the cache -----------------------------------------------------------------------------------------------------


def test_cached_latents_equal_the_vae_output_for_the_same_tensors(dataset, sd1_vae):
    jobs = scan_jobs(dataset, reg=False, flip_aug=True)
    report = build_latent_cache(jobs, sd1_vae, batch_size=1, workers=2)
    assert (report.encoded, report.failed, len(jobs)) == (6, [], 6)
    for job in jobs:
        record, entry = job.record, entry_of(job)
        assignment = BucketAssignment(record.bucket, record.resized, 0.0)
        plain, mirrored = prepare(record.path, assignment), prepare(record.path, assignment, flip=True)
        assert np.array_equal(entry.latents, encode(sd1_vae, plain.pixels))  # bit-exact in float32
        assert np.array_equal(entry.latents_flipped, encode(sd1_vae, mirrored.pixels))
        assert entry.latents.dtype == np.float32 and entry.latents.shape == (4, 8, 8)
        assert (entry.original_size, entry.crop_ltrb) == (record.size, plain.crop_ltrb)
        assert entry.key.crop_ltrb == plain.crop_ltrb and entry.key.vae == sd1_vae.identity
    # Batches of 4 go through other kernels: the same latents up to float rounding.
    memory = build_latent_cache(jobs, sd1_vae, to_disk=False, batch_size=4, workers=2).latents
    for job in jobs:
        cached = memory[(job.record.path, job.record.bucket)]
        np.testing.assert_allclose(cached.latents, entry_of(job).latents, atol=1e-5)


def test_second_run_reuses_and_skip_existing_decides_about_valid_entries(dataset, sd1_vae):
    jobs = scan_jobs(dataset)
    build_latent_cache(jobs, sd1_vae, batch_size=4)
    again = build_latent_cache(jobs, sd1_vae, batch_size=4, skip_existing=True)
    assert (again.encoded, again.reused, again.rebuilt_stale) == (0, 14, [])
    forced = build_latent_cache(jobs, sd1_vae, batch_size=4, skip_existing=False)
    assert (forced.encoded, forced.reused, forced.rebuilt_stale) == (14, 0, [])
    assert all(entry_of(job).latents_flipped is None for job in jobs)
    flipped = build_latent_cache(scan_jobs(dataset, flip_aug=True), sd1_vae, batch_size=4)
    assert flipped.encoded == 14 and {r for _, r in flipped.rebuilt_stale} == {
        "flip_aug was turned on and no flipped latents are stored"}


def test_a_changed_vae_bucket_policy_or_image_rebuilds_with_the_reason(dataset, sd1_vae, tiny_models):
    jobs = scan_jobs(dataset)
    build_latent_cache(jobs, sd1_vae, batch_size=4)
    other_vae = load_vae(tiny_models["sd2"])  # SD2 shares the "_sd" file suffix, so the same files are checked
    report = build_latent_cache(jobs, other_vae, batch_size=4)
    assert report.encoded == 14 and {reason for _, reason in report.rebuilt_stale} == {"the VAE changed"}

    build_latent_cache(jobs, sd1_vae, batch_size=4)
    old_files = {cache_path(j.record.path, j.record.bucket, "sd1") for j in jobs}
    bigger = scan_jobs(dataset, resolution=128, max_bucket_reso=256)
    report = build_latent_cache(bigger, sd1_vae, batch_size=4)
    reasons = dict(report.rebuilt_stale)
    assert len(reasons) == 14 and "the bucket changed from 64x64 to 128x128" in reasons.values()
    assert not any(path.exists() for path in old_files)  # superseded entries are removed once replaced

    # At 64 px the 64x64 images keep their bucket either way; only the policy recorded with them changes.
    build_latent_cache(scan_jobs(dataset, bucket_reso_steps=32), sd1_vae, batch_size=4)
    no_upscale = scan_jobs(dataset, bucket_no_upscale=True, bucket_reso_steps=32)
    report = build_latent_cache(no_upscale, sd1_vae, batch_size=4)
    reasons = {reason for _, reason in report.rebuilt_stale}
    assert len(report.rebuilt_stale) == 14
    assert "bucket_no_upscale changed from false to true" in reasons  # the 64x64 images
    assert any(reason.startswith("the bucket changed from 64x64 to ") for reason in reasons)  # the others

    image = next(j.record.path for j in no_upscale if j.record.path.name == "01_red_square.png")
    before = os.stat(image).st_mtime_ns
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 10)).save(image)  # edited in place: same name, same size
    if os.stat(image).st_mtime_ns == before:  # a coarse filesystem clock; an edit by hand comes later anyway
        os.utime(image, ns=(before, before + 1_000_000))
    assert stale_cache_findings(no_upscale, family="sd1")[0].message == "the image file changed since it was cached"
    report = build_latent_cache(no_upscale, sd1_vae, batch_size=4)
    assert (report.encoded, report.reused) == (1, 13)
    assert report.rebuilt_stale == [(cache_path(image, (64, 64), "sd1"), "the image file changed since it was cached")]


def test_doctor_findings_name_stale_files(dataset, sd1_vae):
    jobs = scan_jobs(dataset)
    assert stale_cache_findings(jobs, family="sd1") == []  # nothing cached: nothing stale
    build_latent_cache(jobs, sd1_vae)
    assert stale_cache_findings(jobs, family="sd1", vae_identity=sd1_vae.identity) == []
    findings = stale_cache_findings(jobs, family="sd1", vae_identity="another")
    assert len(findings) == 14 and findings[0].code == "cache-stale" and findings[0].severity == "warning"
    assert findings[0].where.endswith(f"_64x64_{FAMILY_SUFFIX['sd1']}.npz") and findings[0].message == "the VAE changed"
    assert findings[0].hint == "it will be rebuilt; run cache-latents to rebuild it now"
    moved = scan_jobs(dataset, resolution=128, max_bucket_reso=256)
    assert {f.message for f in stale_cache_findings(moved)} >= {"the bucket changed from 64x64 to 128x128"}


def test_an_unreadable_image_is_reported_and_the_rest_cached(dataset, sd1_vae, tmp_path):
    good = dataset / "img" / "10_sks dog" / "01_red_square.png"
    broken = good.with_name("07_broken.png")
    broken.write_bytes(good.read_bytes()[:120])  # a valid header (the scan sizes it), truncated pixel data
    jobs = scan_jobs(dataset)
    cache_dir = tmp_path / "cache"
    report = build_latent_cache(jobs, sd1_vae, cache_dir=cache_dir, batch_size=4)
    assert (report.encoded, len(report.failed)) == (14, 1)
    assert report.failed[0][0] == broken and str(broken) in report.failed[0][1]
    entry = cache_path(good, (64, 64), "sd1", cache_dir)
    assert entry.is_file() and entry.parent.parent == cache_dir and entry.parent.name.startswith("10_sks dog-")
    assert not any(dataset.rglob("*.npz"))
    key = expected_key(jobs[0].record, jobs[0].options, vae_identity=sd1_vae.identity, dtype="float32")
    assert entry_status(cache_path(jobs[0].record.path, (64, 64), "sd1", cache_dir), key) == ("ok", "")


# --- the command ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cache_latents_command_on_the_demo_preset(tiny_models, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "demo").mkdir(parents=True)
    shutil.copyfile(tiny_models["sd1_ckpt"], run_dir / "demo" / "sd1.safetensors")
    shutil.copytree(tiny_models["dataset"], run_dir / "demo" / "dataset")
    save_config(load_preset(REPO / "presets" / "demo.json"), run_dir / "config.toml")
    events = tmp_path / "events.jsonl"
    args = [sys.executable, "-m", "engine", "cache-latents", str(run_dir / "config.toml"), "--events", str(events),
            "--device", "cpu", "--set", "training.vae_batch_size=4"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "14 image(s): encoded 14 (rebuilt stale 0), reused 0, failed 0"
    assert len(list((run_dir / "demo" / "dataset").rglob("*_64x64_sd.npz"))) == 14
    written = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["type"] for e in written][0] == "start" and written[0]["total"] == 14
    assert written[-1]["type"] == "done" and written[-1]["ok"] and written[-1]["encoded"] == 14
    assert any(e["type"] == "progress" and e["done"] == 14 for e in written)
    npz = next((run_dir / "demo" / "dataset").rglob("*.npz"))
    assert read_key(npz).dtype == "float32"

    # Again in this process (diffusers is imported already): stale entries are listed once per reason.
    from engine.cli import main

    assert main([*args[3:], "--skip-existing", "--set", "dataset.general.bucket_no_upscale=false"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "14 image(s): encoded 14 (rebuilt stale 14), reused 0, failed 0"
    assert "rebuilt: bucket_no_upscale changed from true to false: " in err and err.count("rebuilt:") == 1
    assert "and 13 more" in err
