"""Building the latent cache: which entries to (re)encode, and encoding them with images prepared in threads.

Images are decoded and resized in a thread pool (PIL releases the GIL) while the main thread runs the VAE on the
previous batch, so with a few workers caching costs little more than the encoding itself. Batches never mix
buckets; jobs are sorted by bucket so batches are full.

Encoding takes the mean of the VAE's latent distribution (``latent_dist.mode()``), so an entry equals the VAE's
output for the same input exactly and re-encoding is reproducible. sd-scripts samples (``latent_dist.sample()``)
instead; the difference is the posterior's standard deviation, which for SD VAEs is tiny next to the training noise.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cache.latent_files import (
    CachedLatents,
    EntryState,
    cache_path,
    entry_status,
    inspect_entry,
    load_entry,
    remove_superseded,
    write_entry,
)
from engine.cache.latent_jobs import CacheJob, MemoryKey, jobs_from_scan, stale_cache_findings
from engine.cache.latent_key import CacheOptions, LatentKey, expected_key

if TYPE_CHECKING:
    from engine.events import Progress
    from engine.models.vae import LoadedVae

__all__ = ["CacheJob", "CacheOptions", "CacheReport", "CachedLatents", "LatentKey", "build_latent_cache",
           "cache_path", "entry_status", "expected_key", "jobs_from_scan", "load_entry", "stale_cache_findings"]

@dataclass
class CacheReport:
    """What a caching run did. ``encoded`` counts every image encoded, ``rebuilt_stale`` those among them that
    replaced a stale or unreadable entry (with the reason); ``latents`` is filled in memory mode only."""

    total: int = 0
    encoded: int = 0
    reused: int = 0
    rebuilt_stale: list[tuple[Path, str]] = field(default_factory=list)  # (cache file, reason)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (image, message)
    latents: dict[MemoryKey, CachedLatents] | None = None

    def summary(self) -> str:
        return (f"{self.total} image(s): encoded {self.encoded} (rebuilt stale {len(self.rebuilt_stale)}), "
                f"reused {self.reused}, failed {len(self.failed)}")


@dataclass
class _Todo:
    job: CacheJob
    key: LatentKey
    state: EntryState | None  # None in memory mode


def build_latent_cache(jobs: Iterable[CacheJob], loaded_vae: LoadedVae, *, to_disk: bool = True,
                       cache_dir: Path | None = None, batch_size: int = 1, workers: int = 2,
                       skip_existing: bool = True, progress: Progress | None = None) -> CacheReport:
    """Encode the latents of ``jobs`` with ``loaded_vae``, to disk or into memory.

    Args:
        jobs: from :func:`jobs_from_scan` (or built by hand).
        loaded_vae: from ``engine.models.vae.load_vae``; its dtype is the encoding dtype.
        to_disk: write ``.npz`` entries (reusing valid ones); False encodes everything into ``report.latents``.
        cache_dir: a cache folder instead of beside the images.
        batch_size: images per VAE call (``training.vae_batch_size``).
        workers: threads decoding and resizing images.
        skip_existing: reuse entries whose key matches; False re-encodes every entry. Stale entries are always
            rebuilt and reported.
        progress: advanced once per image, whatever happened to it.

    Returns:
        Counts, stale reasons, failures (an unreadable image never stops the run) and, in memory, the latents.
    """
    vae = loaded_vae.vae
    parameter = next(vae.parameters())
    dtype_name = str(parameter.dtype).removeprefix("torch.")
    jobs = list(jobs)
    report = CacheReport(total=len(jobs), latents=None if to_disk else {})
    todo = _plan(jobs, loaded_vae, dtype_name, report, to_disk=to_disk, cache_dir=cache_dir,
                 skip_existing=skip_existing, progress=progress)
    todo.sort(key=lambda item: (item.job.record.bucket, str(item.job.record.path)))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="latents") as pool:
        writes: deque[tuple[_Todo, Future]] = deque()  # written in the pool too, in the shadow of the next batch
        for batch in _batches(_prepared(todo, pool, max(1, workers), batch_size, report, progress), batch_size):
            for item, entry in _encode(batch, vae, parameter, report, progress):
                if to_disk:
                    writes.append((item, pool.submit(_write, item, entry)))
                else:
                    report.latents[(item.job.record.path, item.job.record.bucket)] = entry  # type: ignore[index]
            while writes and writes[0][1].done():
                _finish_write(*writes.popleft(), report, progress)
        while writes:
            _finish_write(*writes.popleft(), report, progress)
    return report


# --- planning --------------------------------------------------------------------------------------------------


def _plan(jobs: list[CacheJob], loaded_vae: LoadedVae, dtype_name: str, report: CacheReport, *, to_disk: bool,
          cache_dir: Path | None, skip_existing: bool, progress: Progress | None) -> list[_Todo]:
    paths = {id(job): cache_path(job.record.path, job.record.bucket, loaded_vae.family, cache_dir) for job in jobs}
    in_use = set(paths.values())
    owners: dict[Path, Path] = {}
    todo: list[_Todo] = []
    for job in jobs:
        record, path = job.record, paths[id(job)]
        try:
            key = expected_key(record, job.options, vae_identity=loaded_vae.identity, dtype=dtype_name)
        except OSError as error:
            _fail(report, progress, record.path, f"{record.path}: cannot be read ({error.strerror or error})")
            continue
        if not to_disk:
            todo.append(_Todo(job, key, None))
            continue
        if path in owners:  # e.g. a.png and a.jpg in one folder: cache names drop the extension
            _fail(report, progress, record.path, f"{record.path}: shares its cache file {path.name} with "
                                                 f"{owners[path]}; rename one of them")
            continue
        owners[path] = record.path
        state = inspect_entry(path, key, in_use)
        if state.status == "ok" and skip_existing:
            report.reused += 1
            _advance(progress)
            continue
        todo.append(_Todo(job, key, state))
    return todo


def _advance(progress: Progress | None) -> None:
    if progress is not None:
        progress.update(1)


def _fail(report: CacheReport, progress: Progress | None, image: Path, message: str) -> None:
    report.failed.append((image, message))
    _advance(progress)


# --- preparing and encoding ------------------------------------------------------------------------------------


def _prepare(item: _Todo) -> tuple[Any, Any]:
    from engine.data.buckets import BucketAssignment
    from engine.data.transforms import prepare, to_model_tensor

    record, options = item.job.record, item.job.options
    assignment = BucketAssignment(record.bucket, record.resized, 0.0)  # type: ignore[arg-type]
    prepared = prepare(record.path, assignment, flip=False, random_crop=False,
                       interpolation=options.resize_interpolation, mask=record.mask)
    return prepared, to_model_tensor(prepared.pixels)


def _prepared(todo: list[_Todo], pool: ThreadPoolExecutor, workers: int, batch_size: int, report: CacheReport,
              progress: Progress | None) -> Iterator[tuple[_Todo, Any, Any]]:
    """Prepared images in ``todo`` order, with a bounded number in flight (memory stays flat on big datasets)."""
    from engine.data.images import UnreadableImage

    window = batch_size * 2 + workers  # the next batch is ready when the current one finishes encoding
    pending: deque[tuple[_Todo, Future]] = deque()
    queue = iter(todo)
    for item in queue:
        pending.append((item, pool.submit(_prepare, item)))
        if len(pending) >= window:
            break
    while pending:
        item, future = pending.popleft()
        next_item = next(queue, None)
        if next_item is not None:
            pending.append((next_item, pool.submit(_prepare, next_item)))
        try:
            prepared, tensor = future.result()
        except (UnreadableImage, OSError) as error:
            _fail(report, progress, item.job.record.path, str(error))
            continue
        yield item, prepared, tensor


def _batches(items: Iterator[tuple[_Todo, Any, Any]], batch_size: int) -> Iterator[list[tuple[_Todo, Any, Any]]]:
    batch: list[tuple[_Todo, Any, Any]] = []
    for entry in items:
        if batch and (len(batch) >= batch_size or batch[0][0].job.record.bucket != entry[0].job.record.bucket):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


def _encode(batch: list[tuple[_Todo, Any, Any]], vae: Any, parameter: Any, report: CacheReport,
            progress: Progress | None) -> Iterator[tuple[_Todo, CachedLatents]]:
    import torch

    pixels = torch.stack([tensor for _, _, tensor in batch]).to(device=parameter.device, dtype=parameter.dtype)
    to_flip = [index for index, (item, _, _) in enumerate(batch) if item.key.flip]
    mirrors: dict[int, Any] = {}
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode().float().cpu()
        if to_flip:
            # The mirror image of the crop the model sees, which is what a flipped training step shows.
            flipped = vae.encode(torch.flip(pixels[to_flip], dims=[3])).latent_dist.mode().float().cpu()
            mirrors = dict(zip(to_flip, flipped, strict=True))
    for index, (item, prepared, _) in enumerate(batch):
        sample, mirror = latents[index], mirrors.get(index)
        if not torch.isfinite(sample).all() or (mirror is not None and not torch.isfinite(mirror).all()):
            _fail(report, progress, item.job.record.path,
                  f"{item.job.record.path}: the VAE produced NaN/inf latents (fp16 overflow? set "
                  "model.no_half_vae = true)")
            continue
        report.encoded += 1
        mask = None if prepared.mask is None else prepared.mask.astype("float32") / 255.0
        entry = CachedLatents(sample.numpy(), None if mirror is None else mirror.numpy(),
                              tuple(prepared.original_size), tuple(int(v) for v in prepared.crop_ltrb),
                              dataclasses.replace(item.key, crop_ltrb=tuple(int(v) for v in prepared.crop_ltrb)),
                              mask)
        if item.state is None:  # memory mode: nothing to write
            _advance(progress)
        yield item, entry


# --- writing ---------------------------------------------------------------------------------------------------


def _write(item: _Todo, entry: CachedLatents) -> None:
    assert item.state is not None and entry.key is not None
    write_entry(item.state.path, entry, entry.key)
    remove_superseded(item.state)


def _finish_write(item: _Todo, future: Future, report: CacheReport, progress: Progress | None) -> None:
    state = item.state
    assert state is not None
    try:
        future.result()
    except OSError as error:
        report.encoded -= 1
        _fail(report, progress, item.job.record.path, f"{state.path}: cannot be written ({error})")
        return
    if state.status in ("stale", "unreadable"):
        report.rebuilt_stale.append((state.path, state.reason))
    _advance(progress)
