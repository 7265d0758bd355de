"""The doctor tells when an existing latent cache no longer matches the settings (before any GPU time)."""

from engine.cache.latent_jobs import jobs_from_scan
from engine.cache.latents import build_latent_cache
from engine.config.io import validate_config
from engine.data.doctor import run_doctor
from engine.data.scan import scan_config
from engine.models.vae import load_vae


def config_for(dataset_img, resolution: int):
    return validate_config({
        "model": {"pretrained_model_name_or_path": "unused", "model_family": "sd1"},
        "dataset": {"train_data_dir": str(dataset_img),
                    "general": {"resolution": resolution, "min_bucket_reso": 64, "bucket_no_upscale": False}},
        "training": {"cache_latents": True, "cache_latents_to_disk": True}}, check_packages=False)


def test_doctor_reports_a_cache_made_at_another_resolution(tiny_models, tmp_path):
    import shutil

    images = tmp_path / "img"
    shutil.copytree(tiny_models["dataset_img"], images)
    first = config_for(images, 64)
    report = build_latent_cache(jobs_from_scan(scan_config(first, tmp_path)), load_vae(tiny_models["sd1"]),
                                to_disk=True)
    assert report.encoded > 0 and not report.failed
    assert not [f for f in run_doctor(first, tmp_path, quick=True).findings if f.code == "cache-stale"]

    stale = [f for f in run_doctor(config_for(images, 128), tmp_path, quick=True).findings if f.code == "cache-stale"]
    assert len(stale) == report.encoded
    assert all("bucket" in finding.message for finding in stale), stale[0].message
