"""cache_info (engine.data.info_cache through the scanner the trainer uses): written, reused, refreshed."""

from __future__ import annotations

import json
import os

from PIL import Image

from engine.config.io import validate_config
from engine.data.scan import scan_config


def _scan(folder, cache_info=True):
    config = validate_config({"model": {"pretrained_model_name_or_path": "m.safetensors"}, "dataset": {"datasets": [
        {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "subsets": [
            {"image_dir": str(folder), "cache_info": cache_info, "class_tokens": "sks"}]}]}}, check_packages=False)
    scan = scan_config(config, folder.parent)
    return {record.path.name: record for record in scan.datasets[0].subsets[0].records}


def test_cache_info_is_written_reused_and_refreshed(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (64, 96)).save(folder / "a.png")
    Image.new("RGB", (128, 64)).save(folder / "b.png")
    (folder / "a.txt").write_text("a cat", encoding="utf-8")
    cache = folder / "metadata_cache.json"

    records = _scan(folder, cache_info=False)
    assert not cache.exists()  # off by default
    records = _scan(folder)
    written = json.loads(cache.read_text(encoding="utf-8"))
    assert written[str(folder / "a.png")]["caption"] == "a cat"  # sd-scripts' layout: path -> caption, resolution
    assert written[str(folder / "a.png")]["resolution"] == [64, 96]
    assert written[str(folder / "b.png")]["caption"] == "sks" and records["b.png"].size == (128, 64)

    # Reused: a size only the file knows (the image itself is unchanged) is what the scan reports.
    written[str(folder / "b.png")]["resolution"] = [256, 128]
    cache.write_text(json.dumps(written), encoding="utf-8")
    assert _scan(folder)["b.png"].size == (256, 128)

    # Refreshed: a replaced image is measured again, a new one added, a removed one dropped.
    Image.new("RGB", (96, 64)).save(folder / "b.png")
    os.utime(folder / "b.png", ns=(1, 1))  # a different signature even within the file system's time resolution
    Image.new("RGB", (64, 64)).save(folder / "c.png")
    (folder / "a.png").unlink()
    records = _scan(folder)
    assert records["b.png"].size == (96, 64) and records["c.png"].size == (64, 64) and "a.png" not in records
    again = json.loads(cache.read_text(encoding="utf-8"))
    assert sorted(again) == [str(folder / "b.png"), str(folder / "c.png")]
    assert again[str(folder / "b.png")]["resolution"] == [96, 64]
