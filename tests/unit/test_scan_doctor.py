"""Scanning and the dataset doctor on real folders: odd names, every kind of defect, metadata keys, totals."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from engine.config.io import validate_config
from engine.data.doctor import run_doctor
from engine.data.scan import scan_config

REPO = Path(__file__).resolve().parents[2]


def image(path: Path, size=(96, 64), color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def caption(path: Path, text: str | bytes) -> None:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)


def legacy_config(root: Path, **general) -> object:
    data = {"dataset": {"train_data_dir": str(root / "img"), "general": {"resolution": 64, "min_bucket_reso": 64,
                                                                         "max_bucket_reso": 256, **general}}}
    if (root / "reg").exists():
        data["dataset"]["reg_data_dir"] = str(root / "reg")
    return validate_config(data, check_packages=False)


def codes(findings) -> list[tuple[str, str]]:
    return sorted((finding.code, Path(finding.where).name) for finding in findings)


def test_legacy_folder_names_parse_like_sd_scripts_and_bad_ones_say_what_to_rename(tmp_path):
    for folder in ("10_sks dog", "5_my_chara girl", "sks dog", "0_x"):
        image(tmp_path / "img" / folder / "a.png")
    image(tmp_path / "img" / "loose.png")
    scan = scan_config(legacy_config(tmp_path), tmp_path)
    subsets = [(s.params["num_repeats"], s.params["class_tokens"]) for s in scan.datasets[0].subsets]
    assert subsets == [(10, "sks dog"), (5, "my_chara girl")]
    by_folder = {Path(f.where).name: f for f in scan.findings}
    assert "rename it to '10_sks dog'" in by_folder["sks dog"].hint
    assert "rename it to '1_x'" in by_folder["0_x"].hint and by_folder["0_x"].severity == "error"
    assert by_folder["img"].code == "images-outside-subfolder"


def test_class_tokens_caption_images_without_caption_files(tmp_path):
    folder = tmp_path / "img" / "3_sks dog"
    image(folder / "a.png")
    image(folder / "b.png")
    caption(folder / "a.txt", "sks dog, red ball\nsecond line ignored")
    scan = scan_config(legacy_config(tmp_path), tmp_path)
    records = {r.path.name: r for r in scan.datasets[0].subsets[0].records}
    assert (records["a.png"].caption, records["a.png"].caption_source) == ("sks dog, red ball", "file")
    assert (records["b.png"].caption, records["b.png"].caption_source) == ("sks dog", "class_tokens")
    assert records["a.png"].num_repeats == 3 and records["a.png"].bucket is not None
    missing = [f for f in scan.findings if f.code == "caption-missing"]
    assert len(missing) == 1 and missing[0].severity == "info" and "'sks dog'" in missing[0].message


def build_broken_dataset(root: Path) -> None:
    good = root / "img" / "10_sks dog"
    for index in range(4):
        image(good / f"ok{index}.png", color=(index * 40, 100, 100))
        caption(good / f"ok{index}.txt", f"sks dog, pose {index}")
    image(root / "img" / "sks cat" / "c.png")  # no repeat count
    (root / "img" / "3_empty").mkdir(parents=True)  # no images
    image(good / "tiny.png", size=(32, 32), color=(1, 2, 3))
    caption(good / "tiny.txt", "sks dog")
    image(good / "wide.png", size=(3100, 64), color=(9, 9, 9))
    caption(good / "wide.txt", "sks dog")
    (good / "fake.png").write_text("not an image")
    jpeg = image(good / "cut.jpg", size=(256, 256), color=(5, 80, 200), fmt="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:400])  # header intact, data truncated
    caption(good / "cut.txt", "sks dog")
    image(good / "anim.gif", fmt="GIF")
    caption(good / "ok0.txt", b"caf\xe9 in latin-1")
    caption(good / "ok1.txt", "")
    caption(good / "ok2.txt", ", ".join(f"tag{n} word{n}" for n in range(80)))
    (good / "copy.png").write_bytes((good / "ok3.png").read_bytes())
    caption(good / "copy.txt", "sks dog")
    reg = root / "reg" / "1_dog"
    image(reg / "r0.png", color=(0, 0, 0))
    (reg / "same.png").write_bytes((good / "ok3.png").read_bytes())


def test_doctor_reports_one_finding_per_defect_and_never_crashes(tmp_path):
    build_broken_dataset(tmp_path)
    report = run_doctor(legacy_config(tmp_path, bucket_no_upscale=False), tmp_path)
    found = codes(report.findings)
    expected = [
        ("caption-empty", "ok1.txt"),
        ("caption-long", "10_sks dog"),
        ("caption-unreadable", "ok0.txt"),
        ("duplicate-image", "copy.png"),
        ("duplicate-train-reg", "same.png"),
        ("folder-empty", "3_empty"),
        ("folder-name", "sks cat"),
        ("image-large", "10_sks dog"),
        ("image-small", "10_sks dog"),
        ("image-unreadable", "cut.jpg"),
        ("image-unreadable", "fake.png"),
        ("reg-too-few", "dataset.general"),
        ("unsupported-file", "10_sks dog"),
    ]
    assert found == expected
    assert not report.ok
    paths = {record.path.name for d in report.scan.datasets for s in d.subsets for record in s.records}
    assert "cut.jpg" not in paths and "fake.png" not in paths  # skipped, not trained on


def test_totals_follow_repeats_balancing_buckets_and_accumulation(tmp_path):
    for index in range(3):
        image(tmp_path / "img" / "4_sks dog" / f"{index}.png", size=(64, 64))
    image(tmp_path / "img" / "4_sks dog" / "wide.png", size=(128, 64))
    for index in range(20):
        image(tmp_path / "reg" / "1_dog" / f"{index}.png", size=(64, 64))
    config = validate_config({
        "dataset": {"train_data_dir": str(tmp_path / "img"), "reg_data_dir": str(tmp_path / "reg"),
                    "general": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 256, "batch_size": 2,
                                "bucket_no_upscale": True}},
        "training": {"max_train_epochs": 3, "gradient_accumulation_steps": 2}}, check_packages=False)
    totals = run_doctor(config, tmp_path, quick=True).to_dict()["totals"]
    assert totals["train_samples_per_epoch"] == 16 and totals["reg_samples_per_epoch"] == 16
    # 64x64 bucket: 12 train + 16 reg samples -> 14 batches; the wide image's 128x64 bucket: 4 samples -> 2 batches
    assert totals["batches_per_epoch"] == 16
    assert totals["steps_per_epoch"] == 8 and totals["total_steps"] == 24


def test_finetune_metadata_keys_as_full_paths_relative_paths_and_stems(tmp_path):
    folder = tmp_path / "ft"
    for name in ("a.png", "b.jpg", "sub/c.webp"):
        image(folder / name, fmt="WEBP" if name.endswith("webp") else None)
    metadata = {str(folder / "a.png"): {"caption": "full path", "tags": "t1, t2"},
                "sub/c.webp": {"caption": "relative"},
                "b": {"tags": "only tags"},
                "gone": {"caption": "missing image"}}
    (tmp_path / "meta.json").write_text(json.dumps(metadata))
    (tmp_path / "meta.jsonl").write_text(json.dumps({"image_path": "a.png", "caption": "from jsonl"}) + "\n")
    config = validate_config({"dataset": {"general": {"resolution": 64, "min_bucket_reso": 64},
                                          "datasets": [{"subsets": [
                                              {"metadata_file": "meta.json", "image_dir": "ft"},
                                              {"metadata_file": "meta.jsonl", "image_dir": "ft"}]}]}},
                             check_packages=False)
    scan = scan_config(config, tmp_path)
    first, second = ({r.path.name: r.caption for r in s.records} for s in scan.datasets[0].subsets)
    assert first == {"a.png": "full path,t1, t2", "c.webp": "relative", "b.jpg": "only tags"}
    assert second == {"a.png": "from jsonl"}
    assert [f.code for f in scan.findings] == ["metadata-image-missing"]


def test_missing_folders_and_no_dataset_are_errors(tmp_path):
    scan = scan_config(validate_config({}), tmp_path)
    assert [f.code for f in scan.findings] == ["no-dataset"]
    config = validate_config({"dataset": {"train_data_dir": "nope"}})
    report = run_doctor(config, tmp_path)
    assert {f.code for f in report.findings} >= {"folder-missing"} and not report.ok


def doctor_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", "doctor", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_doctor_command_exit_codes_and_json(tmp_path):
    good = tmp_path / "img" / "2_sks dog"
    for index in range(2):
        image(good / f"{index}.png", size=(64, 64), color=(index * 90, 0, 0))
        caption(good / f"{index}.txt", "sks dog")
    (tmp_path / "run.toml").write_text('[dataset]\ntrain_data_dir = "img"\n[dataset.general]\nresolution = 64\n'
                                       'min_bucket_reso = 64\n')
    result = doctor_cli(str(tmp_path / "run.toml"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == 1 and report["ok"] is True
    assert report["totals"]["train_samples_per_epoch"] == 4
    assert [image["bucket"] for image in report["images"]] == [[64, 64], [64, 64]]
    assert set(report) == {"version", "ok", "counts", "findings", "datasets", "totals", "images"}
    (good.parent / "bad name").mkdir()
    text = doctor_cli(str(tmp_path / "run.toml"))
    assert text.returncode == 2
    assert "error:" in text.stdout and "rename it to '10_bad name'" in text.stdout and "NOT READY" in text.stdout
