"""Masked loss without a model: masks follow their image through every transform, the scan and the doctor find
missing and odd-size masks, the latent cache stores the mask and its key covers it, and the dataset TOML keeps the
mask keys in sd-scripts' schema."""

from __future__ import annotations

import json
import os
import random
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cache.latent_files import CachedLatents, entry_status, load_entry, write_entry
from engine.cache.latent_jobs import jobs_from_scan
from engine.cache.latent_key import CacheOptions, LatentKey, MaskStamp, expected_key, key_mismatch
from engine.config.dataset import DatasetSection
from engine.config.dataset_export import dataset_toml
from engine.config.importers.sd_scripts_dataset import import_sd_scripts_dataset
from engine.config.io import validate_config
from engine.data.buckets import BucketAssignment, BucketManager, fixed_bucket
from engine.data.doctor import run_doctor
from engine.data.images import UnreadableImage
from engine.data.records import DatasetPlan, ImageRecord, MaskSource, ScanResult, SubsetPlan
from engine.data.transforms import prepare
from engine.train.dataset import collate


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Values that differ from pixel to pixel (smooth enough that resizing keeps them apart)."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 7 + y * 3 + seed * 11) % 256).astype(np.uint8)


def save_rgb_with_red(path: Path, red: np.ndarray) -> Path:
    """An RGB image whose red channel is `red` (the other two hold other patterns)."""
    height, width = red.shape
    rgb = np.stack([red, pattern(width, height, 1), pattern(width, height, 2)], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def save_mask(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values, mode="L").save(path)
    return path


# --- the mask goes through the image's own transforms --------------------------------------------------------------


@pytest.mark.parametrize(("size", "assignment", "options"), [
    ((640, 480), BucketManager((512, 512)).assign((640, 480)), {}),  # shrink (area), centre crop
    ((100, 80), BucketManager((512, 512)).assign((100, 80)), {}),  # enlarge (Lanczos)
    ((640, 480), BucketManager((512, 512)).assign((640, 480)), {"flip": True}),
    ((300, 700), BucketManager((256, 256)).assign((300, 700)), {"random_crop": True, "rng": random.Random(5)}),
    ((300, 700), BucketManager((256, 256)).assign((300, 700)), {"interpolation": "bicubic", "flip": True}),
    ((1024, 768), fixed_bucket((512, 512)).assign((1024, 768)), {}),  # buckets off
    ((640, 480), BucketAssignment((576, 448), (597, 448), 0.0), {"interpolation": "lanczos"}),
])
def test_a_mask_file_is_resized_cropped_and_flipped_exactly_like_its_image(tmp_path, size, assignment, options):
    # The image's red channel and the mask hold the same values, so after the transforms they must still agree.
    red = pattern(*size)
    image = save_rgb_with_red(tmp_path / "img" / "a.png", red)
    mask = save_mask(tmp_path / "masks" / "a.png", red)
    prepared = prepare(image, assignment, mask=MaskSource("file", mask), **options)
    assert prepared.mask is not None and prepared.mask.shape == prepared.pixels.shape[:2]
    np.testing.assert_array_equal(prepared.mask, prepared.pixels[..., 0])


def test_an_alpha_mask_equals_the_same_values_given_as_a_mask_file(tmp_path):
    alpha = pattern(640, 480, 3)
    rgba = np.dstack([pattern(640, 480, 4)] * 3 + [alpha])
    image = tmp_path / "cut-out.png"
    Image.fromarray(rgba, mode="RGBA").save(image)
    mask = save_mask(tmp_path / "mask.png", alpha)
    assignment = BucketManager((512, 512)).assign((640, 480))
    from_alpha = prepare(image, assignment, flip=True, mask=MaskSource("alpha", image))
    from_file = prepare(image, assignment, flip=True, mask=MaskSource("file", mask))
    np.testing.assert_array_equal(from_alpha.mask, from_file.mask)
    assert from_alpha.mask.min() < 50 and from_alpha.mask.max() > 200  # the values survived


def test_face_crop_cuts_the_mask_with_the_face(tmp_path):
    red = pattern(600, 400)
    image = save_rgb_with_red(tmp_path / "portrait_300_150_40_40.png", red)
    mask = save_mask(tmp_path / "mask.png", red)
    prepared = prepare(image, fixed_bucket((128, 96)).assign((600, 400)), face_crop_range=(1.5, 3.0),
                       rng=random.Random(2), mask=MaskSource("file", mask))
    np.testing.assert_array_equal(prepared.mask, prepared.pixels[..., 0])


def test_a_mask_of_another_size_is_refused_naming_the_mask(tmp_path):
    image = save_rgb_with_red(tmp_path / "a.png", pattern(96, 64))
    mask = save_mask(tmp_path / "masks" / "a.png", pattern(64, 64))
    with pytest.raises(UnreadableImage, match="64x64 but its image is 96x64") as raised:
        prepare(image, fixed_bucket((64, 64)).assign((96, 64)), mask=MaskSource("file", mask))
    assert raised.value.path == mask


# --- scan and doctor --------------------------------------------------------------------------------------------------


def masked_config(*subsets: dict, masked_loss: bool = True) -> object:
    return validate_config({
        "training": {"masked_loss": masked_loss},
        "dataset": {"general": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 256},
                    "datasets": [{"subsets": list(subsets)}]},
    }, check_packages=False)


def findings_by_code(report) -> dict[str, list]:
    found: dict[str, list] = {}
    for finding in report.findings:
        found.setdefault(finding.code, []).append(finding)
    return found


def test_the_doctor_names_missing_odd_size_and_unmatched_mask_files(tmp_path):
    for name in ("a", "b", "c"):
        save_rgb_with_red(tmp_path / "img" / f"{name}.png", pattern(96, 64))
    save_mask(tmp_path / "masks" / "a.png", pattern(96, 64))
    save_mask(tmp_path / "masks" / "b.png", pattern(64, 64))  # not the image's size
    save_mask(tmp_path / "masks" / "stray.png", pattern(96, 64))  # no image of that name
    report = run_doctor(masked_config({"image_dir": "img", "conditioning_data_dir": "masks"}), tmp_path, quick=True)
    found = findings_by_code(report)
    assert not report.ok
    size = found["mask-size"][0]
    assert (size.severity, Path(size.where).name) == ("error", "b.png") and "64x64" in size.message
    assert "its image's size" in size.hint
    missing = found["mask-missing"][0]
    assert (missing.severity, Path(missing.where).name) == ("error", "c.png") and "c.png" in missing.message
    assert "add a mask image with the same name" in missing.hint
    assert found["mask-unmatched"][0].severity == "warning" and "stray.png" in found["mask-unmatched"][0].message
    records = {record.path.name: record for record in report.scan.datasets[0].subsets[0].records}
    assert records["a.png"].mask == MaskSource("file", tmp_path / "masks" / "a.png")
    assert records["b.png"].mask is None and records["c.png"].mask is None


def test_the_doctor_names_images_without_alpha_in_an_alpha_mask_subset(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGBA", (64, 64), (10, 20, 30, 0)).save(folder / "cut.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "flat.jpg")
    report = run_doctor(masked_config({"image_dir": "img", "alpha_mask": True}, masked_loss=False), tmp_path,
                        quick=True)
    no_alpha = findings_by_code(report)["mask-no-alpha"]
    assert len(no_alpha) == 1 and no_alpha[0].severity == "error" and Path(no_alpha[0].where).name == "flat.jpg"
    assert "transparency" in no_alpha[0].hint
    records = {record.path.name: record for record in report.scan.datasets[0].subsets[0].records}
    assert records["cut.png"].mask == MaskSource("alpha", folder / "cut.png")


def test_a_missing_mask_folder_is_an_error(tmp_path):
    save_rgb_with_red(tmp_path / "img" / "a.png", pattern(64, 64))
    report = run_doctor(masked_config({"image_dir": "img", "conditioning_data_dir": "nowhere"}), tmp_path, quick=True)
    assert findings_by_code(report)["mask-folder-missing"][0].severity == "error"


# --- the latent cache ---------------------------------------------------------------------------------------------


def masked_record(tmp_path: Path, source: str | None) -> ImageRecord:
    image = save_rgb_with_red(tmp_path / "img" / "a.png", pattern(64, 64))
    mask = None
    if source == "file":
        mask = MaskSource("file", save_mask(tmp_path / "masks" / "a.png", pattern(64, 64, 5)))
    elif source == "alpha":
        mask = MaskSource("alpha", image)
    return ImageRecord(image, (64, 64), "", "none", 1, False, 0, 0, bucket=(64, 64), resized=(64, 64), mask=mask)


def test_the_cache_key_changes_when_the_mask_file_changes(tmp_path):
    record = masked_record(tmp_path, "file")
    stored = expected_key(record, CacheOptions(), vae_identity="vae", dtype="float32")
    assert LatentKey.from_json(stored.to_json()) == stored
    assert key_mismatch(stored, stored) == ""
    save_mask(record.mask.path, pattern(64, 64, 6))  # an edited mask (same size)
    stamp = record.mask.path.stat()
    os.utime(record.mask.path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    edited = expected_key(record, CacheOptions(), vae_identity="vae", dtype="float32")
    assert key_mismatch(stored, edited) == "the mask file changed since it was cached"


def test_the_cache_key_tells_mask_sources_apart(tmp_path):
    record = masked_record(tmp_path, None)
    plain = expected_key(record, CacheOptions(), vae_identity="v", dtype="float32")
    alpha = expected_key(replace(record, mask=MaskSource("alpha", record.path)), CacheOptions(), vae_identity="v",
                         dtype="float32")
    assert key_mismatch(plain, alpha) == "the loss mask changed from no mask to the alpha channel"
    assert key_mismatch(alpha, plain) == ""  # a stored mask nobody asks for does no harm
    # Keys written before masks existed hold no mask.
    old = {key: value for key, value in json.loads(plain.to_json()).items() if key != "mask"}
    assert LatentKey.from_json(json.dumps(old)).mask == MaskStamp()


def test_an_entry_stores_the_mask_as_sd_scripts_alpha_mask(tmp_path):
    record = masked_record(tmp_path, "file")
    key = expected_key(record, CacheOptions(), vae_identity="v", dtype="float32")
    mask = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    path = tmp_path / "a_64x64_sd.npz"
    write_entry(path, CachedLatents(np.zeros((4, 8, 8), np.float32), None, (64, 64), (0, 0, 64, 64), key, mask), key)
    with np.load(path) as npz:
        assert npz["alpha_mask"].dtype == np.float32 and npz["alpha_mask"].shape == (64, 64)  # [bucket_h, bucket_w]
    np.testing.assert_array_equal(load_entry(path).alpha_mask, mask)
    assert entry_status(path, key) == ("ok", "")
    write_entry(path, CachedLatents(np.zeros((4, 8, 8), np.float32), None, (64, 64), (0, 0, 64, 64), key), key)
    assert entry_status(path, key) == ("unreadable", "the cache file lacks alpha_mask")


def test_one_image_with_two_different_masks_cannot_share_a_cache_entry(tmp_path):
    first = masked_record(tmp_path, "file")
    second = masked_record(tmp_path, "alpha")
    params = {"enable_bucket": True}
    scan = ScanResult(datasets=[DatasetPlan("d", params, [SubsetPlan("s0", {}, [first]),
                                                          SubsetPlan("s1", {}, [second])])])
    with pytest.raises(ValueError, match="two subsets with different loss masks"):
        jobs_from_scan(scan)
    unmasked = ImageRecord(first.path, (64, 64), "", "none", 1, False, 0, 1, bucket=(64, 64), resized=(64, 64))
    scan.datasets[0].subsets[1].records = [unmasked]
    (job,) = jobs_from_scan(scan)
    assert job.record.mask == first.mask  # the entry keeps the mask the masked subset needs


# --- batches ----------------------------------------------------------------------------------------------------------


def test_a_batch_mixing_masked_and_unmasked_images_gives_the_others_a_full_mask():
    def plain() -> dict:
        return {"loss_weight": 1.0, "noise_seed": 2, "latents": torch.zeros(4, 8, 8)}

    masked = {**plain(), "loss_mask": torch.zeros(64, 64)}
    batch = collate([plain(), masked])
    assert batch["loss_mask"].shape == (2, 64, 64)
    assert torch.equal(batch["loss_mask"][0], torch.ones(64, 64)) and torch.equal(batch["loss_mask"][1],
                                                                                  torch.zeros(64, 64))
    assert "loss_mask" not in collate([plain(), plain()])


# --- the dataset TOML -----------------------------------------------------------------------------------------------


def test_exported_dataset_toml_keeps_the_mask_keys_in_sd_scripts_schema_and_imports_back(tmp_path):
    section = DatasetSection.model_validate({"datasets": [
        {"subsets": [{"image_dir": "/data/cutouts", "alpha_mask": True}, {"image_dir": "/data/plain"}]},
        {"subsets": [{"image_dir": "/data/photos", "conditioning_data_dir": "masks"}]},
    ]})
    text = dataset_toml(section, base_dir=tmp_path)
    data = tomllib.loads(text)
    alpha_dataset, mask_dataset = data["datasets"]
    assert alpha_dataset["subsets"][0]["alpha_mask"] is True and "alpha_mask" not in alpha_dataset["subsets"][1]
    assert mask_dataset["subsets"][0]["conditioning_data_dir"] == str(tmp_path / "masks")
    imported = import_sd_scripts_dataset(data)
    subsets = [subset for dataset in imported.overlay["dataset"]["datasets"] for subset in dataset["subsets"]]
    assert subsets[0]["alpha_mask"] is True
    assert subsets[2]["conditioning_data_dir"] == str(tmp_path / "masks")


def test_a_dataset_mixing_mask_folder_subsets_with_others_says_to_split_it():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="conditioning_data_dir .mask folders. and subsets without"):
        DatasetSection.model_validate({"datasets": [{"subsets": [
            {"image_dir": "/data/a", "conditioning_data_dir": "/data/masks"}, {"image_dir": "/data/b"}]}]})


def test_sd_scripts_args_import_masked_loss(tmp_path):
    from engine.config.importers.registry import import_file

    args = tmp_path / "args.toml"
    args.write_text('pretrained_model_name_or_path = "/m/sd15.safetensors"\noutput_dir = "/out"\n'
                    'dataset_config = "/data/dataset.toml"\nmasked_loss = true\n', encoding="utf-8")
    result = import_file(args)
    assert result.overlay["training"]["masked_loss"] is True
    assert "masked_loss" in result.mapped and "masked_loss" not in {item.key for item in result.skipped}


def test_an_alpha_mask_is_turned_upright_with_its_image(tmp_path):
    from engine.data.images import load_mask, load_rgb_and_alpha, load_rgb_image, read_image_size

    alpha = pattern(96, 64, 7)
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    Image.fromarray(np.dstack([pattern(96, 64, 8)] * 3 + [alpha]), mode="RGBA").save(path, exif=exif)
    rgb, mask = load_rgb_and_alpha(path)
    assert rgb.size == mask.size == read_image_size(path) == (64, 96)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(load_mask(path, alpha=True)))
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(load_rgb_image(path)))
    np.testing.assert_array_equal(np.asarray(mask), np.rot90(alpha, k=-1))  # ROTATE_270 = 90 degrees clockwise
