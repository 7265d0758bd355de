"""Scan benchmark: scanning 10,000 small generated images (legacy folders with captions).

Prints seconds and microseconds per image for `scan_config` (header sizes, caption files, buckets, reg balancing),
and the ratio over a floor measured in the same run: listing the same folders and stat-ing every file.
Run: .venv/bin/python bench/scan.py [--images 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from PIL import Image
from timing import timed

from engine.config.io import validate_config
from engine.data.scan import scan_config


def make_dataset(root: Path, count: int, folders: int = 10) -> None:
    for index in range(count):
        folder = root / "img" / f"{1 + index % 5}_concept{index % folders}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (64 + (index % 7) * 8, 64 + (index % 5) * 8)
        suffix, fmt = (".png", "PNG") if index % 2 else (".jpg", "JPEG")
        Image.new("RGB", size, ((index * 37) % 256, (index * 91) % 256, 90)).save(folder / f"{index}{suffix}", fmt)
        (folder / f"{index}.txt").write_text(f"concept{index % folders}, tag{index % 13}, tag{index % 29}")


def listing_floor(root: Path) -> int:
    """What any scan must at least do: list each folder and stat each file."""
    count = 0
    for folder in (root / "img").iterdir():
        with os.scandir(folder) as entries:
            for entry in entries:
                entry.stat()
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        started = time.perf_counter()
        make_dataset(root, args.images)
        print(f"generated {args.images} images in {time.perf_counter() - started:.1f} s")
        config = validate_config({"dataset": {"train_data_dir": str(root / "img"),
                                              "general": {"resolution": 64, "min_bucket_reso": 64}}})
        result = scan_config(config, root)
        found = sum(len(s.records) for d in result.datasets for s in d.subsets)
        assert found == args.images, f"scanned {found} of {args.images} images"
        scan_seconds = timed(lambda: scan_config(config, root), args.repeats)
        floor_seconds = timed(lambda: listing_floor(root), args.repeats)
    print(f"scan: {scan_seconds:.3f} s for {args.images} images = {scan_seconds / args.images * 1e6:.0f} us/image "
          f"(median of {args.repeats})")
    print(f"floor (list + stat): {floor_seconds:.3f} s; scan / floor = {scan_seconds / floor_seconds:.1f}")


if __name__ == "__main__":
    main()
