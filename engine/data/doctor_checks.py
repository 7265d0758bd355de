"""The doctor's checks over scanned records: sizes, duplicates, caption lengths, regularization supply.

Each check takes the scan and returns findings; `CHECKS` lists them in the order they run.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from engine.data.captions import approximate_token_count
from engine.data.records import Finding, ImageRecord, ScanResult

LARGE_SIDE = 3000  # px; bigger images slow loading and caching for no gain at SD resolutions
EXAMPLES = 3


def _examples(records: list[ImageRecord]) -> str:
    names = ", ".join(record.path.name for record in records[:EXAMPLES])
    return names + (", ..." if len(records) > EXAMPLES else "")


def _all_records(scan: ScanResult) -> list[ImageRecord]:
    return [record for dataset in scan.datasets for subset in dataset.subsets for record in subset.records]


def check_sizes(scan: ScanResult, max_token_length: int) -> list[Finding]:
    findings = []
    for dataset in scan.datasets:
        width, height = dataset.params["resolution"]
        no_upscale = dataset.params["bucket_no_upscale"]
        for subset in dataset.subsets:
            small = [r for r in subset.records if r.size[0] * r.size[1] < width * height]
            large = [r for r in subset.records if max(r.size) > LARGE_SIDE]
            if small and not no_upscale:
                findings.append(Finding(
                    "warning", "image-small", subset.path,
                    f"{len(small)} image(s) are smaller than {width}x{height} and will be upscaled, which makes "
                    f"training blurry: {_examples(small)}",
                    "use larger images, or set dataset.general.bucket_no_upscale = true to train them at their "
                    "own size"))
            elif small:
                findings.append(Finding(
                    "info", "image-small", subset.path,
                    f"{len(small)} image(s) are smaller than {width}x{height}; they train at their own size in "
                    f"smaller buckets: {_examples(small)}"))
            if large:
                findings.append(Finding(
                    "warning", "image-large", subset.path,
                    f"{len(large)} image(s) are over {LARGE_SIDE} px on a side, which slows loading and caching: "
                    f"{_examples(large)}", "downscale them to about twice the training resolution"))
    return findings


def check_caption_lengths(scan: ScanResult, max_token_length: int) -> list[Finding]:
    findings = []
    for dataset in scan.datasets:
        for subset in dataset.subsets:
            long = [r for r in subset.records if approximate_token_count(r.caption) > max_token_length]
            if long:
                findings.append(Finding(
                    "warning", "caption-long", subset.path,
                    f"{len(long)} caption(s) look longer than {max_token_length} tokens and would be cut: "
                    f"{_examples(long)}",
                    "shorten them, or raise model.max_token_length to 150 or 225"))
    return findings


def _content_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_duplicates(scan: ScanResult, max_token_length: int) -> list[Finding]:
    """Identical files: only files of equal size are hashed, so unique datasets cost one stat per image."""
    by_size: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in _all_records(scan):
        by_size[record.path.stat().st_size].append(record)
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for group in (g for g in by_size.values() if len(g) > 1):
        for record in group:
            by_hash[_content_hash(record.path)].append(record)
    findings = []
    for group in (g for g in by_hash.values() if len({r.path for r in g}) > 1):
        train = [record for record in group if not record.is_reg]
        reg = [record for record in group if record.is_reg]
        for copies in (train, reg):
            if len({record.path for record in copies}) > 1:
                findings.append(Finding(
                    "warning", "duplicate-image", str(copies[0].path),
                    f"{len(copies)} identical files: {_examples(copies)}",
                    "keep one; duplicates silently multiply that image's weight"))
        if train and reg:
            findings.append(Finding(
                "warning", "duplicate-train-reg", str(reg[0].path),
                f"a training image is also a regularization image: {_examples(train + reg)}",
                "remove it from the regularization folder"))
    return findings


def check_regularization_supply(scan: ScanResult, max_token_length: int) -> list[Finding]:
    findings = []
    for dataset in scan.datasets:
        reg_images = [r for s in dataset.subsets if s.is_reg for r in s.records]
        if not reg_images:
            continue
        train_samples = sum(r.num_repeats for s in dataset.subsets if not s.is_reg for r in s.records)
        used = [r for r in reg_images if r.num_repeats > 0]
        per_image = train_samples / len(used) if used else 0
        if per_image > 10:
            findings.append(Finding(
                "warning", "reg-too-few", dataset.path,
                f"{len(reg_images)} regularization image(s) balance {train_samples} training samples per epoch, "
                f"so each is repeated about {per_image:.0f} times",
                f"add regularization images (about {train_samples // 5} would keep repeats near 5)"))
    return findings


Check = Callable[[ScanResult, int], list[Finding]]
CHECKS: dict[str, Check] = {
    "sizes": check_sizes,
    "caption_lengths": check_caption_lengths,
    "duplicates": check_duplicates,
    "regularization": check_regularization_supply,
}
