"""The text-encoder output cache: one ``.npz`` per image holding what its caption encodes to, keyed and checked.

Files are ``<image stem>_te_outputs_<family>.npz`` beside the image or under a cache folder (the latent cache's
folder rule). They hold ``hidden_states`` (float32 [max_token_length + 2, D]), ``pooled`` (SDXL, float32 [P]) and
``cache_key``, a JSON string with everything the outputs depend on: the text encoders' identity, the exact caption,
clip_skip (SD1/SD2 only), max_token_length (T5's padded length for FLUX), whether T5 saw its padding mask (FLUX),
whether the caption's prompt weights were applied (SD1/SD2/SDXL: ``model.weighted_captions``; an entry from before
that field counts as unweighted), family, dtype and the format version. FLUX entries also hold ``mask`` (T5's
padding mask, bool [L]); FLUX.1's ``pooled`` is CLIP-L's pooled output. sd-scripts names its SDXL cache
``_te_outputs.npz`` with other keys (spec §3.2), so neither tool reads the other's files.

Caching needs captions that are the same every step: the config rules refuse it with shuffling, tag dropout,
wildcards or caption dropout (``CaptionOptions.changes_per_step``), and :func:`jobs_from_scan` refuses it too.
Captions are encoded in batches of distinct captions (many images often share one). A batch's composition changes
the outputs in the last bits (~1e-7 on CPU, from the matrix kernels), so batches are formed in sorted caption order:
the same captions and batch size always give the same bytes.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.cache.entries import Status, all_finite, check_finite
from engine.cache.entries import entry_status as shared_entry_status
from engine.cache.latent_files import cache_folder
from engine.data.captions import CaptionOptions, process_caption
from engine.data.records import ImageRecord, ScanResult
from engine.files import atomic_write_bytes
from engine.models.families import family_info

if TYPE_CHECKING:
    from engine.events import Progress
    from engine.models.text_encoders import LoadedTextEncoders

__all__ = ["FORMAT_VERSION", "CachedText", "TextCacheReport", "TextJob", "TextKey", "build_text_encoder_cache",
           "cache_path", "entry_status", "expected_key", "jobs_from_scan", "key_mismatch", "load_entry",
           "write_entry"]

FORMAT_VERSION = 1
_PRECISION = {"float32": 2, "bfloat16": 1, "float16": 1}


@dataclass(frozen=True)
class TextKey:
    """Everything cached text-encoder outputs depend on. ``None`` in an *expected* key means "not checked"."""

    version: int
    encoder: str | None  # LoadedTextEncoders.identity
    caption: str
    clip_skip: int | None  # None for SDXL and FLUX, which do not use it
    max_token_length: int  # T5's padded length for FLUX
    family: str
    dtype: str | None
    t5_attn_mask: bool | None = None  # FLUX, SD3: apply_t5_attn_mask (T5 encodes differently with it); else None
    lg_attn_mask: bool | None = None  # SD3: apply_lg_attn_mask (the CLIPs encode differently with it); else None
    weighted: bool | None = None  # SD1/SD2/SDXL: weighted_captions (the outputs are scaled by weights); else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> TextKey:
        data = json.loads(text)
        names = {item.name for item in fields(cls)}
        required = {item.name for item in fields(cls) if item.default is MISSING}
        if not isinstance(data, dict) or not required <= set(data):
            raise ValueError(f"the cache key lacks {sorted(required - set(data or {}))}")
        return cls(**{name: data[name] for name in names if name in data})


@dataclass
class CachedText:
    """One entry: float32 hidden states [L, D], the pooled embedding (SDXL, FLUX.1) and T5's mask (FLUX)."""

    hidden_states: np.ndarray
    pooled: np.ndarray | None
    key: TextKey | None = None
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class TextJob:
    """One image and the caption to encode for it (already processed: prefix, suffix, first line)."""

    record: ImageRecord
    caption: str


@dataclass
class TextCacheReport:
    """What a caching run did: ``encoded`` images, ``rebuilt_stale`` among them (with the reason), ``outputs`` by
    image path in memory mode only."""

    total: int = 0
    encoded: int = 0
    reused: int = 0
    rebuilt_stale: list[tuple[Path, str]] = field(default_factory=list)  # (cache file, reason)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (image, message)
    outputs: dict[Path, CachedText] | None = None

    def summary(self) -> str:
        return (f"{self.total} image(s): encoded {self.encoded} (rebuilt stale {len(self.rebuilt_stale)}), "
                f"reused {self.reused}, failed {len(self.failed)}")


# --- keys and files --------------------------------------------------------------------------------------------


def cache_path(image: Path, family: str, cache_dir: Path | None = None) -> Path:
    """The cache file of ``image``: beside it, or in the same sub-folder of ``cache_dir`` as its latents."""
    return cache_folder(Path(image), cache_dir) / f"{Path(image).stem}_te_outputs_{family}.npz"


def expected_key(caption: str, *, encoder_identity: str | None, clip_skip: int, max_token_length: int,
                 family: str, dtype: str | None, t5xxl_max_token_length: int = 512,
                 apply_t5_attn_mask: bool = False, apply_lg_attn_mask: bool = False,
                 weighted: bool = False) -> TextKey:
    """The key an entry for ``caption`` must carry under these settings (identity/dtype None: not checked)."""
    kind = family_info(family).text_encoding
    if kind == "flux":
        return TextKey(FORMAT_VERSION, encoder_identity, caption, None, t5xxl_max_token_length, family, dtype,
                       apply_t5_attn_mask)
    if kind == "sd3":
        return TextKey(FORMAT_VERSION, encoder_identity, caption, None, t5xxl_max_token_length, family, dtype,
                       apply_t5_attn_mask, apply_lg_attn_mask)
    return TextKey(FORMAT_VERSION, encoder_identity, caption, clip_skip if kind == "sd" else None,
                   max_token_length, family, dtype, weighted=weighted)


# The arrays an entry must hold, by the family's text encoding.
_REQUIRED_ARRAYS = {"sd": ["hidden_states"], "sdxl": ["hidden_states", "pooled"], "flux": ["hidden_states", "mask"],
                    "sd3": ["hidden_states", "pooled"]}


# Field → the reason when the stored value differs from the wanted one; the most fundamental first.
_REASONS: dict[str, Callable[[Any, Any], str]] = {
    "version": lambda s, w: f"the cache format changed (version {s} → {w})",
    "family": lambda s, w: f"the model family changed from {s} to {w}",
    "encoder": lambda s, w: "the text encoder changed",
    "caption": lambda s, w: "the caption changed",
    "clip_skip": lambda s, w: f"clip_skip changed from {s} to {w}",
    "max_token_length": lambda s, w: f"max_token_length changed from {s} to {w}",
    "dtype": lambda s, w: f"the encoding precision changed from {s} to {w}",
    "t5_attn_mask": lambda s, w: f"apply_t5_attn_mask changed from {s} to {w}",
    "lg_attn_mask": lambda s, w: f"apply_lg_attn_mask changed from {s} to {w}",
    "weighted": lambda s, w: f"weighted_captions changed from {s} to {w}",
}


def key_mismatch(stored: TextKey, expected: TextKey) -> str:
    """Why ``stored`` cannot stand in for ``expected``, or "" when it can. Expected ``None`` values are skipped."""
    for name, reason in _REASONS.items():
        have, wanted = getattr(stored, name), getattr(expected, name)
        if name == "weighted":
            have = bool(have)  # entries written before the field existed were never weighted
        # Outputs kept at a higher precision than asked for are as good (float32 satisfies fp16 and bf16).
        more_precise = name == "dtype" and _PRECISION.get(have, 0) > _PRECISION.get(wanted, 0)
        if wanted is not None and have != wanted and not more_precise:
            return reason(have, wanted)
    return ""


def write_entry(path: Path, entry: CachedText, key: TextKey) -> None:
    """Write an entry atomically: a reader never sees a half-written file."""
    arrays = {"hidden_states": np.ascontiguousarray(entry.hidden_states, dtype=np.float32),
              "cache_key": np.asarray(key.to_json())}
    if entry.pooled is not None:
        arrays["pooled"] = np.ascontiguousarray(entry.pooled, dtype=np.float32)
    if entry.mask is not None:
        arrays["mask"] = np.ascontiguousarray(entry.mask, dtype=bool)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_entry(path: Path) -> CachedText:
    """Read a cache entry.

    Raises:
        OSError, ValueError: the file is missing, damaged or lacks the hidden states; NonFiniteEntry (a
            ValueError naming the file) when the outputs hold NaN or infinity.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            key = TextKey.from_json(str(npz["cache_key"])) if "cache_key" in files else None
            entry = CachedText(npz["hidden_states"], npz["pooled"] if "pooled" in files else None, key,
                               npz["mask"] if "mask" in files else None)
    except (KeyError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path}: not a complete text-encoder cache file ({error})") from error
    check_finite(path, {"hidden_states": entry.hidden_states, "pooled": entry.pooled}, "text-encoder outputs",
                 "build the text-encoder cache again without reusing entries")
    return entry


def entry_status(path: Path, key: TextKey) -> tuple[Status, str]:
    """Whether the file at ``path`` holds outputs valid for ``key``.

    Returns:
        ("ok", ""), ("missing", why), ("stale", what changed) or ("unreadable", what is wrong).
    """
    required = _REQUIRED_ARRAYS[family_info(key.family).text_encoding]
    return shared_entry_status(path, key, parse_key=TextKey.from_json, mismatch=key_mismatch, required=required)


# --- jobs ------------------------------------------------------------------------------------------------------


def jobs_from_scan(scan: ScanResult) -> list[TextJob]:
    """Every trained image of a scan with its processed caption (prefix/suffix applied, first line).

    Raises:
        ValueError: a subset whose captions change per step (shuffle, tag dropout, wildcards, caption dropout).
    """
    jobs = []
    for dataset in scan.datasets:
        for subset in dataset.subsets:
            options = CaptionOptions.from_params(subset.params)
            if options.changes_per_step:
                raise ValueError(f"{subset.path}: its captions change during training, so text-encoder outputs "
                                 "cannot be cached; turn training.cache_text_encoder_outputs off")
            # With fixed captions process_caption draws no random numbers; the generator only fills the argument.
            jobs.extend(TextJob(record, process_caption(record.caption, options, rng=random.Random(0)))
                        for record in subset.every_record if record.num_repeats > 0)  # validation's too
    return jobs


# --- building --------------------------------------------------------------------------------------------------


@dataclass
class _Todo:
    job: TextJob
    key: TextKey
    path: Path | None  # None in memory mode
    stale_reason: str | None = None


def build_text_encoder_cache(records: Iterable[ImageRecord | TextJob], loaded: LoadedTextEncoders, *,
                             clip_skip: int, max_token_length: int, t5xxl_max_token_length: int = 512,
                             apply_t5_attn_mask: bool = False, apply_lg_attn_mask: bool = False,
                             weighted: bool = False, to_disk: bool = True,
                             cache_dir: Path | None = None, batch_size: int = 8, skip_existing: bool = True,
                             progress: Progress | None = None) -> TextCacheReport:
    """Encode the captions of ``records`` with ``loaded``, to disk or into memory.

    Args:
        records: images with their captions: :class:`TextJob` (from :func:`jobs_from_scan`), or ``ImageRecord``
            whose ``caption`` is used as it is.
        loaded: from ``engine.models.text_encoders.load_text_encoders``; its dtype is the encoding dtype.
        clip_skip, max_token_length, t5xxl_max_token_length, apply_t5_attn_mask, apply_lg_attn_mask, weighted: as
            for ``engine.models.text_encoding.encode_captions``.
        to_disk: write ``.npz`` entries (reusing valid ones); False encodes everything into ``report.outputs``.
        cache_dir: a cache folder instead of beside the images.
        batch_size: distinct captions per encoder call.
        skip_existing: reuse entries whose key matches; False re-encodes them. Stale entries are always rebuilt.
        progress: advanced once per image, whatever happened to it.

    Returns:
        Counts, stale reasons, failures (a write error never stops the run) and, in memory, the outputs.
    """
    unique = {}  # an image listed twice with the same caption (two subsets) is cached once
    for item in records:
        job = item if isinstance(item, TextJob) else TextJob(item, item.caption)
        unique.setdefault((job.record.path, job.caption), job)
    jobs = list(unique.values())
    dtype = str(next(loaded.encoders[0].parameters()).dtype).removeprefix("torch.")
    options = {"clip_skip": clip_skip, "max_token_length": max_token_length,
               "t5xxl_max_token_length": t5xxl_max_token_length, "apply_t5_attn_mask": apply_t5_attn_mask,
               "apply_lg_attn_mask": apply_lg_attn_mask, "weighted": weighted}
    key_of = partial(expected_key, encoder_identity=loaded.identity, family=loaded.family, dtype=dtype, **options)
    path_of = partial(cache_path, family=loaded.family, cache_dir=cache_dir) if to_disk else None
    report = TextCacheReport(total=len(jobs), outputs=None if to_disk else {})
    by_caption: dict[str, list[_Todo]] = {}
    for item in _plan(jobs, key_of, path_of, skip_existing, report, progress):
        by_caption.setdefault(item.job.caption, []).append(item)
    captions = sorted(by_caption)
    for start in range(0, len(captions), max(1, batch_size)):
        batch = captions[start:start + max(1, batch_size)]
        for caption, entry in zip(batch, _encode(loaded, batch, options), strict=True):
            for item in by_caption[caption]:
                _store(item, entry, report, progress)
    return report


def _plan(jobs: list[TextJob], key_of: Callable[[str], TextKey], path_of: Callable[[Path], Path] | None,
          skip_existing: bool, report: TextCacheReport, progress: Progress | None) -> list[_Todo]:
    """The entries to encode; valid ones are counted as reused, clashing ones as failed."""
    owners: dict[Path, Path] = {}
    todo = []
    for job in jobs:
        image, key = job.record.path, key_of(job.caption)
        path = path_of(image) if path_of else None
        slot = path or image
        if slot in owners:  # a.png + a.jpg (one cache name), or one image with two different captions
            _fail(report, progress, image, f"{image}: shares its text-encoder cache {slot.name} with {owners[slot]} "
                                           "but has another caption; rename one or give them the same caption")
            continue
        owners[slot] = image
        status, reason = entry_status(path, key) if path else ("missing", "")
        if status == "ok" and skip_existing:
            report.reused += 1
            _advance(progress)
            continue
        todo.append(_Todo(job, key, path, reason if status in ("stale", "unreadable") else None))
    return todo


def _encode(loaded: LoadedTextEncoders, captions: list[str], options: dict[str, Any]) -> list[CachedText]:
    import torch

    from engine.models.text_encoding import encode_captions

    with torch.no_grad():
        encoded = encode_captions(loaded, captions, **options)
    hidden = encoded.hidden_states.float().cpu().numpy()
    pooled = None if encoded.pooled is None else encoded.pooled.float().cpu().numpy()
    mask = None if encoded.mask is None else encoded.mask.bool().cpu().numpy()
    return [CachedText(hidden[i], None if pooled is None else pooled[i], None, None if mask is None else mask[i])
            for i in range(len(captions))]


def _store(item: _Todo, entry: CachedText, report: TextCacheReport, progress: Progress | None) -> None:
    if not all_finite(entry.hidden_states, entry.pooled):
        _fail(report, progress, item.job.record.path,
              f"{item.job.record.path}: the text encoder produced NaN/inf outputs for its caption (fp16 overflow? "
              "train in float32 or bf16: training.mixed_precision)")
        return
    entry = CachedText(entry.hidden_states, entry.pooled, item.key, entry.mask)
    if item.path is None:
        report.outputs[item.job.record.path] = entry  # type: ignore[index]
    else:
        try:
            write_entry(item.path, entry, item.key)
        except OSError as error:
            _fail(report, progress, item.job.record.path, f"{item.path}: cannot be written ({error})")
            return
        if item.stale_reason is not None:
            report.rebuilt_stale.append((item.path, item.stale_reason))
    report.encoded += 1
    _advance(progress)


def _advance(progress: Progress | None) -> None:
    if progress is not None:
        progress.update(1)


def _fail(report: TextCacheReport, progress: Progress | None, image: Path, message: str) -> None:
    report.failed.append((image, message))
    _advance(progress)
