"""Which images to cache with which options, and the doctor's check of existing cache files.

Neither needs torch or a decoded image, so the doctor can call :func:`stale_cache_findings` on a large dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.cache.latent_files import FAMILY_SUFFIX, cache_path, inspect_entry, stale_findings
from engine.cache.latent_key import CacheOptions, expected_key, options_from_params
from engine.data.records import Finding, ImageRecord, ScanResult

__all__ = ["CAPTION_ONLY_FINDINGS", "CacheJob", "jobs_from_scan", "latent_errors", "stale_cache_findings"]

MemoryKey = tuple[Path, tuple[int, int]]  # (image path, bucket)

# Scan findings (codes of engine.data.scan) about captions alone: they change what the text encoder reads, never which
# image is encoded or how, so they do not stop latent caching (the trainer still refuses them before training).
CAPTION_ONLY_FINDINGS = frozenset({"caption-unreadable"})


def latent_errors(findings: Iterable[Finding]) -> list[Finding]:
    """The error findings of a scan that latent caching must stop on: all but the caption-only ones."""
    return [finding for finding in findings
            if finding.severity == "error" and finding.code not in CAPTION_ONLY_FINDINGS]


@dataclass(frozen=True)
class CacheJob:
    """One image to cache, with the options of its subset."""

    record: ImageRecord
    options: CacheOptions


def jobs_from_scan(scan: ScanResult) -> list[CacheJob]:
    """Every image of a scan that is trained on, once per (image, bucket), with its subset's cache options.

    Regularization images that balancing left unused (0 repeats) are skipped. An image in two subsets with the
    same bucket is cached once, with flipped latents if either subset flips (and the loss mask of either).

    Raises:
        ValueError: a subset uses random_crop, which cannot be cached, or an image has two different masks.
    """
    merged: dict[MemoryKey, CacheJob] = {}
    for dataset in scan.datasets:
        for subset in dataset.subsets:
            options = options_from_params(dataset.params, subset.params)
            for record in subset.every_record:  # held-out images too: validation reuses the cache
                if record.num_repeats <= 0 or record.bucket is None:
                    continue
                key = (record.path, tuple(record.bucket))
                first = merged.get(key)
                merged[key] = CacheJob(record, options) if first is None else _merged(first, record, options)
    return list(merged.values())


def _merged(first: CacheJob, record: ImageRecord, options: CacheOptions) -> CacheJob:
    """One job for an image two subsets train in the same bucket: flipped latents if either flips, the mask of
    the one that has a mask (one entry holds one mask)."""
    if first.record.mask is not None and record.mask is not None and first.record.mask != record.mask:
        raise ValueError(f"{record.path} is in two subsets with different loss masks ({first.record.mask.path} and "
                         f"{record.mask.path}), and its cached latents can hold one; use one mask for it")
    chosen = first.record if first.record.mask is not None or record.mask is None else record
    flip = first.options.flip_aug or options.flip_aug
    return CacheJob(chosen, dataclasses.replace(first.options, flip_aug=flip))


def stale_cache_findings(jobs: Iterable[CacheJob], *, family: str | None = None, cache_dir: Path | None = None,
                         vae_identity: str | None = None, dtype: str | None = None) -> list[Finding]:
    """Existing cache files that do not match the current settings (for the doctor; no torch, no decoding).

    Args:
        jobs: from :func:`jobs_from_scan` (which refuses random_crop subsets: call this only when latents are
            cached, where the config rules already forbid random_crop).
        family: a model family (which file suffix to look at), or None to look at every suffix.
        cache_dir: the cache folder, if the cache is not beside the images.
        vae_identity, dtype: checked only when given (the doctor does not load the VAE).

    Returns:
        One "cache-stale" warning per stale or unreadable file; missing entries are not findings.
    """
    jobs = list(jobs)
    # One family per cache-file suffix: families that share an AE share their files.
    families = [family] if family else list({suffix: name for name, suffix in FAMILY_SUFFIX.items()}.values())
    findings: list[Finding] = []
    for fam in families:
        paths = [(job, cache_path(job.record.path, job.record.bucket, fam, cache_dir)) for job in jobs]
        in_use = {path for _, path in paths}
        states = []
        for job, path in paths:
            try:
                key = expected_key(job.record, job.options, vae_identity=vae_identity, dtype=dtype)
            except OSError:
                continue  # the image itself is gone; the scan reports that
            states.append(inspect_entry(path, key, in_use))
        findings.extend(stale_findings(states))
    return findings
