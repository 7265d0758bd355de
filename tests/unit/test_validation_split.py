"""The validation split (engine.data.validation_split): sd-scripts' per-subset rule, deterministic and disjoint; the
scan holds the images out of training and caches, the doctor counts them and refuses a subset left empty."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from PIL import Image

from engine.config.io import deep_merge, default_config_dict, validate_config
from engine.data.doctor import format_report, run_doctor
from engine.data.scan import scan_config
from engine.data.validation_split import split_order
from gui.doctor_view import steps_markdown


def sd_scripts_split(items: list, split: float, seed: int) -> tuple[list, list]:
    """sd-scripts' split_train_val as its spec states it (§1.7): the list shuffled with the global `random` seeded
    with validation_seed (its state restored after), training the first ceil(n·(1 − split)), validation the last
    round(n·split)."""
    items = list(items)
    state = random.getstate()
    random.seed(seed)
    random.shuffle(items)
    random.setstate(state)
    train = items[: math.ceil(len(items) * (1 - split))]
    validate = items[len(items) - round(len(items) * split):] if round(len(items) * split) else []
    return train, validate


@pytest.mark.parametrize(("count", "split", "seed"), [(10, 0.2, 1), (6, 0.34, 7), (37, 0.1, 123), (3, 0.5, 0),
                                                     (5, 0.3, 42), (100, 0.25, 9)])
def test_the_held_out_images_are_sd_scripts_and_training_keeps_the_rest(count, split, seed):
    names = [f"img{index:03d}.png" for index in range(count)]
    train, validate = split_order(count, split, seed)
    expected_train, expected_validate = sd_scripts_split(names, split, seed)
    assert [names[index] for index in validate] == expected_validate
    assert set(train).isdisjoint(validate) and sorted([*train, *validate]) == list(range(count))
    # Training is sd-scripts' training part, less any image that part shares with validation (it does when
    # round() rounds up: 3 images at 0.5 put the middle one in both).
    assert {names[index] for index in train} == set(expected_train) - set(expected_validate)
    assert split_order(count, split, seed) == (train, validate)  # deterministic


def test_another_seed_holds_out_other_images():
    assert split_order(50, 0.2, 1)[1] != split_order(50, 0.2, 2)[1]


def _dataset(root: Path, counts: dict[str, int]) -> Path:
    for folder, count in counts.items():
        path = root / folder
        path.mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (64, 64), (index * 20 % 255, 80, 160)).save(path / f"{index:02d}.png")
            (path / f"{index:02d}.txt").write_text(f"image {index}", encoding="utf-8")
    return root


def _config(tmp_path: Path, general: dict, **dataset) -> object:
    data = deep_merge(default_config_dict(), {
        "model": {"pretrained_model_name_or_path": "model.safetensors"},
        "training": {"cache_latents": False, "seed": 11},
        "dataset": {"general": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, **general},
                    **dataset}})
    return validate_config(data, check_packages=False)


def test_the_scan_holds_images_out_of_training_with_one_repeat(tmp_path):
    root = _dataset(tmp_path / "data", {"img/5_sks dog": 10, "reg/1_dog": 4})
    config = _config(tmp_path, {"validation_split": 0.3, "validation_seed": 4},
                     train_data_dir=str(root / "img"), reg_data_dir=str(root / "reg"))
    scan = scan_config(config, tmp_path)
    train_subset, reg_subset = scan.datasets[0].subsets
    assert len(train_subset.records) == 7 and len(train_subset.validation) == 3
    assert {r.path for r in train_subset.records}.isdisjoint({r.path for r in train_subset.validation})
    assert all(record.num_repeats == 1 and record.bucket is not None for record in train_subset.validation)
    assert all(record.num_repeats == 5 for record in train_subset.records)
    assert not reg_subset.validation and len(reg_subset.records) == 4  # regularization is never split
    names = sorted(path.name for path in (root / "img/5_sks dog").glob("*.png"))
    assert sorted(r.path.name for r in train_subset.validation) == sorted(sd_scripts_split(names, 0.3, 4)[1])
    # Without validation_seed, training.seed decides: the same images every time.
    unseeded = _config(tmp_path, {"validation_split": 0.3}, train_data_dir=str(root / "img"))
    first, second = (scan_config(unseeded, tmp_path).datasets[0].subsets[0] for _ in range(2))
    assert [r.path for r in first.validation] == [r.path for r in second.validation]
    assert sorted(r.path.name for r in first.validation) == sorted(sd_scripts_split(names, 0.3, 11)[1])


def test_validation_only_subsets_train_nothing_and_the_doctor_counts_them(tmp_path):
    root = _dataset(tmp_path / "data", {"train": 4, "held": 3})
    config = _config(tmp_path, {}, datasets=[{"subsets": [{"image_dir": str(root / "train")},
                                                          {"image_dir": str(root / "held"), "validation_only": True}]}])
    report = run_doctor(config, tmp_path, quick=True)
    assert report.ok, format_report(report)
    data = report.to_dict()
    subsets = data["datasets"][0]["subsets"]
    assert [(s["images"], s["validation_images"]) for s in subsets] == [(4, 0), (0, 3)]
    assert data["totals"]["train_images"] == 4 and data["totals"]["validation_images"] == 3
    assert all("held" not in image["path"] for image in data["images"])
    assert "3 held-out image(s)" in format_report(report)
    assert "3 images held out for the validation loss" in steps_markdown(data)  # the Dataset tab's summary


def test_a_split_that_leaves_a_subset_no_training_image_is_refused_by_the_doctor(tmp_path):
    root = _dataset(tmp_path / "data", {"a": 1, "b": 4})
    config = _config(tmp_path, {"validation_split": 0.6},
                     datasets=[{"subsets": [{"image_dir": str(root / "a")}, {"image_dir": str(root / "b")}]}])
    report = run_doctor(config, tmp_path, quick=True)
    assert not report.ok
    refused = [finding for finding in report.findings if finding.code == "validation-split-empty"]
    assert [finding.where for finding in refused] == ["dataset.datasets[0].subsets[0]"]
    assert "lower" in refused[0].hint and "validation_split" in refused[0].hint


def test_held_out_images_are_cached_with_the_trained_ones(tmp_path):
    from engine.cache.latent_jobs import jobs_from_scan

    root = _dataset(tmp_path / "data", {"img/1_sks": 6})
    config = _config(tmp_path, {"validation_split": 0.5}, train_data_dir=str(root / "img"))
    scan = scan_config(config, tmp_path)
    assert len({job.record.path for job in jobs_from_scan(scan)}) == 6


def test_the_sd_scripts_export_leaves_validation_only_subsets_out(tmp_path):
    from engine.config.dataset_export import export_document

    config = _config(tmp_path, {"validation_split": 0.2},
                     datasets=[{"subsets": [{"image_dir": "train"}, {"image_dir": "held", "validation_only": True}]},
                               {"subsets": [{"image_dir": "only-held", "validation_only": True}]}])
    document = export_document(config.dataset, tmp_path)
    assert [[subset["image_dir"] for subset in entry["subsets"]] for entry in document["datasets"]] == [
        [str(tmp_path / "train")]]  # sd-scripts would train on them: left out (its split is still written)
    assert document["general"]["validation_split"] == 0.2
