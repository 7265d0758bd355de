"""A run's status and chart rows, folded from its events.jsonl: `read_status` for one look, and `RunReader`, which the
Train tab keeps per run and which reads only what was appended since its last look.

The run directory's files and records are in gui/runs.py; this module only folds the events into what the GUI shows.
No torch here: the GUI imports this module.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.rundir.event_reader import parse_event_lines
from engine.rundir.layout import events_path, train_log_path
from gui.runs import (
    PROCESS_LOG,
    RunHandle,
    RunStatus,
    read_record,
    record_alive,
    tail_lines,
)

# --- status --------------------------------------------------------------------------------------------------


MEMORY_KEYS = ("gpu_peak_mib", "gpu_reserved_mib", "rss_peak_mib")  # a progress event's memory figures


def _on_start(status: RunStatus, event: dict[str, Any]) -> None:
    status.total_steps = event.get("total_steps", status.total_steps)
    status.num_epochs = event.get("num_epochs", status.num_epochs)
    plan = event.get("memory_plan")
    status.memory_plan = dict(plan) if isinstance(plan, dict) else None
    status.validation_images = int(event.get("num_validation_images") or 0)


def _memory_figures(event: dict[str, Any]) -> dict[str, float]:
    return {key: event[key] for key in MEMORY_KEYS
            if isinstance(event.get(key), int | float) and not isinstance(event.get(key), bool)}


def _on_progress(status: RunStatus, event: dict[str, Any]) -> None:
    status.step, status.epoch = event.get("step", status.step), event.get("epoch", status.epoch)
    status.total_steps = event.get("total_steps", status.total_steps)
    status.num_epochs = event.get("num_epochs", status.num_epochs)
    status.loss, status.loss_avg = event.get("loss"), event.get("loss_avg")
    status.it_per_s, status.eta_s = event.get("it_per_s"), event.get("eta_s")
    status.memory = _memory_figures(event) or status.memory  # an event without figures keeps the last ones


def _on_checkpoint(status: RunStatus, event: dict[str, Any]) -> None:
    status.checkpoints.append({key: event.get(key) for key in ("kind", "path", "step", "epoch")})
    if event.get("kind") == "state":
        status.resume_state = event.get("path", "")


SAMPLE_PROMPT_CHARS = 80  # a gallery caption shows the start of a long prompt


def sample_label(step: Any, prompt: str) -> str:
    """'step 40 · a photo of sks dog': what a sample image shows under it, so samples of a run can be told apart."""
    prompt = " ".join(str(prompt or "").split())
    if len(prompt) > SAMPLE_PROMPT_CHARS:
        prompt = prompt[: SAMPLE_PROMPT_CHARS - 1] + "…"
    return f"step {step} · {prompt}" if prompt else f"step {step}"


def _on_sample(status: RunStatus, event: dict[str, Any]) -> None:
    images = event.get("images", [])
    status.samples.extend(image["path"] for image in images)
    status.sample_labels.extend(sample_label(event.get("step", "?"), image.get("prompt", "")) for image in images)


def _on_validation(status: RunStatus, event: dict[str, Any]) -> None:
    status.validation_loss = _finite(event.get("loss"))
    status.best_checkpoint = event.get("best") or status.best_checkpoint


def _finite(value: Any) -> float | None:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    return float(number) if number is not None and math.isfinite(number) else None


def validation_row(event: dict[str, Any]) -> dict[str, Any] | None:
    """A chart row (step, val_loss) for a validation event with a finite loss."""
    loss = _finite(event.get("loss")) if event.get("type") == "validation" else None
    return None if loss is None or event.get("step") is None else {"step": event["step"], "val_loss": loss}


def _on_error(status: RunStatus, event: dict[str, Any]) -> None:
    status.error, status.hint = event.get("message", ""), event.get("hint", "")


def _on_warning(status: RunStatus, event: dict[str, Any]) -> None:
    status.warnings.append(event.get("message", ""))


def _on_done(status: RunStatus, event: dict[str, Any]) -> None:
    status.state = "stopped" if event.get("stopped") else "finished" if event.get("ok") else "failed"
    status.summary = event.get("summary", "")
    status.step = event.get("global_step", status.step)
    status.resume_state = event.get("state") or status.resume_state


_FOLD: dict[str, Callable[[RunStatus, dict[str, Any]], None]] = {
    "start": _on_start, "progress": _on_progress, "checkpoint": _on_checkpoint, "sample": _on_sample,
    "error": _on_error, "warning": _on_warning, "done": _on_done, "validation": _on_validation,
}
# Events of earlier processes on the same run dir (before a resume) only add files; their state is history.
_HISTORY = ("checkpoint", "sample")


def read_status(handle: RunHandle, *, queued: bool = False, log_lines: int = 30) -> RunStatus:
    """The run's state and progress, from its files and whether its recorded process is alive (reads the whole
    event file; the GUI keeps a RunReader per run instead, which reads only what was appended)."""
    return RunReader(handle.run_dir).status(queued=queued, log_lines=log_lines)


def _status_from_record(status: RunStatus, record: dict[str, Any], run_dir: Path) -> None:
    """What the record adds to the events: the exit code, and the state of a run that wrote no `done`."""
    status.returncode = record.get("returncode")
    if record.get("pid") and status.state in ("created", "queued"):
        _settle_without_done(status, record, run_dir)
    elif record.get("start_error"):
        status.state, status.error = "failed", record["start_error"]


def _settle_without_done(status: RunStatus, record: dict[str, Any], run_dir: Path) -> None:
    """No `done` yet: running while the process lives; afterwards failed (it exited with an error code) or lost
    (killed by a signal, or ended while no manager was there to learn its exit code)."""
    if record_alive(record):
        status.state = "running"
    elif status.returncode is not None and status.returncode > 0:
        status.state = "failed"
        if not status.error:
            status.error = f"the engine exited with code {status.returncode} before reporting an error"
            status.hint = "; ".join(tail_lines(run_dir / PROCESS_LOG, 3)) or f"see {run_dir / PROCESS_LOG}"
    else:
        status.state = "lost"
        status.error = status.error or "the training process ended without finishing its event stream"
        status.hint = status.hint or (f"it was killed or crashed hard; see {run_dir / PROCESS_LOG}. "
                                      "Resume from the last saved state, if there is one.")


# --- incremental reading (the Train tab's tick) -------------------------------------------------------

# A long file is parsed in small pieces: a first read then never holds many events at once, and the few rows it
# keeps do not pin the memory of the many it parsed (with 4 MiB pieces a 100k-event read left RSS 38 MiB higher).
_CHUNK_BYTES = 256 * 1024
CHART_BUCKETS = 500  # at most this many buckets per chart (about one per pixel): 500 points a series, 1000 raw loss
CHART_REFRESH_S = 5.0  # a decimated chart is redrawn at most this often (a short run's at every new row)
_RECHECK_S = 30.0  # checkpoint paths are re-checked at least this often, even if their folder's mtime did not move
_VERSIONS = itertools.count(1)  # chart versions, unique in the process: a recreated reader never repeats one


def progress_row(event: dict[str, Any]) -> dict[str, Any] | None:
    """A chart row (step, loss, loss_avg, the first parameter group's learning rate) for a progress event."""
    if event.get("type") != "progress" or event.get("step") is None:
        return None
    rates = event.get("lr") or [None]
    return {"step": event["step"], "loss": event.get("loss"), "loss_avg": event.get("loss_avg"),
            "lr": rates[0] if isinstance(rates, list) else rates}


@dataclass
class _Bucket:
    """Consecutive chart rows folded into the few that draw the same shape: the lowest and the highest raw loss
    (so the noise band keeps its width) and the newest row (smoothed loss and learning rate are smooth)."""

    count: int
    low: dict[str, Any] | None
    high: dict[str, Any] | None
    last: dict[str, Any]

    @classmethod
    def of(cls, row: dict[str, Any]) -> _Bucket:
        raw = row if row.get("loss") is not None else None
        return cls(1, raw, raw, row)

    def merge(self, other: _Bucket) -> None:
        """Fold `other`, which holds the rows after this bucket's."""
        self.count += other.count
        self.low = _extreme(self.low, other.low, min)
        self.high = _extreme(self.high, other.high, max)
        self.last = other.last

    def rows(self, *, final: bool) -> list[dict[str, Any]]:
        if self.count == 1:
            return [self.last]
        raw = {id(row): row for row in sorted(filter(None, (self.low, self.high)), key=lambda row: row["step"])}
        points = [{"step": row["step"], "loss": row["loss"]} for row in raw.values()]
        # The newest raw loss is always drawn, so the line ends where the run is.
        last_raw = self.last["loss"] if final and id(self.last) not in raw else None
        return [*points, {**self.last, "loss": last_raw}]


def _extreme(first: dict | None, second: dict | None, pick: Callable) -> dict | None:
    if first is None or second is None:
        return first or second
    return pick(first, second, key=lambda row: row["loss"])


class ProgressSeries:
    """The charts' rows, bounded: every row while there are at most `buckets`, then buckets of 2, 4, 8... rows
    (a pair of neighbours merges whenever there would be more), so a 100k-step run still draws ~2000 points in all."""

    def __init__(self, buckets: int = CHART_BUCKETS):
        self.max_buckets = buckets
        self.stride = 1  # rows per full bucket
        self.count = 0  # rows added
        self._buckets: list[_Bucket] = []

    def add(self, row: dict[str, Any]) -> None:
        self.count += 1
        if self._buckets and self._buckets[-1].count < self.stride:
            self._buckets[-1].merge(_Bucket.of(row))
        else:
            self._buckets.append(_Bucket.of(row))
        if len(self._buckets) > self.max_buckets:
            self._halve()

    def _halve(self) -> None:
        merged = self._buckets[::2]
        for first, second in zip(merged, self._buckets[1::2], strict=False):
            first.merge(second)
        self._buckets = merged
        self.stride *= 2

    def rows(self) -> list[dict[str, Any]]:
        last = len(self._buckets) - 1
        return [row for index, bucket in enumerate(self._buckets) for row in bucket.rows(final=index == last)]


@dataclass(frozen=True)
class ChartData:
    """The charts' rows at one moment; `version` changes whenever they do, so a viewer redraws only then."""

    version: int
    rows: list[dict[str, Any]]


class _ExistenceCache:
    """Which checkpoint paths still exist. A path is re-checked only when its folder's mtime moved (adding or
    removing an entry moves it; the engine removes old checkpoints with keep-last-N) or every _RECHECK_S, so a run
    with thousands of checkpoints does not stat them all at every tick."""

    def __init__(self) -> None:
        self._folders: dict[str, int | None] = {}
        self._exists: dict[str, bool] = {}
        self._checked_at = 0.0

    def existing(self, paths: list[str]) -> set[str]:
        now = time.monotonic()
        if now - self._checked_at > _RECHECK_S:
            self._folders, self._exists, self._checked_at = {}, {}, now
        for folder in {os.path.dirname(path) for path in paths}:
            mtime = _mtime_ns(folder)
            if self._folders.get(folder, -1) != mtime:
                self._folders[folder] = mtime
                self._exists = {path: found for path, found in self._exists.items()
                                if os.path.dirname(path) != folder}
        for path in paths:
            if path not in self._exists:
                self._exists[path] = os.path.exists(path)
        return {path for path in paths if self._exists[path]}


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class RunReader:
    """One run directory's status and chart rows, kept up to date by reading only what was appended to
    events.jsonl since the last look. Shared by every viewer of the run (the RunManager keeps one per run), so
    it is thread-safe: Gradio runs handlers in threads.

    Follows read_status's rules: events before the record's `events_offset` (earlier processes, before a resume)
    only add checkpoints and samples; the events after it give the state. A replaced or truncated file, or an
    offset that moved backwards, starts the fold over from the beginning."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._log_cache: tuple[tuple[int, int, int], list[str]] | None = None
        self._reset()

    def _reset(self) -> None:
        self._pos = 0  # bytes folded so far
        self._file_id: tuple[int, int] | None = None
        self._last_byte = b""  # the byte before _pos, checked to notice a file rewritten in place
        self._split = 0  # the events_offset the fold follows
        self._fold = RunStatus(state="")  # "" until a `done` event
        self._last_state = ""  # the newest state checkpoint: the resume state once these events are history
        self._series = ProgressSeries()
        # Validation points, few (one per pass) and kept whole: the loss chart's third series.
        self._validation: list[dict[str, Any]] = []
        self._rows: ChartData | None = None  # what chart() gives, until newer rows are published
        self._rows_at = 0.0  # when _rows was made (time.monotonic)
        self._unpublished = False  # rows came after _rows was made
        self._exists = _ExistenceCache()

    # --- reading -----------------------------------------------------------------------------------------------

    def status(self, *, queued: bool = False, log_lines: int = 30) -> RunStatus:
        """The run's state and progress, like read_status, at the cost of the bytes appended since the last call."""
        record = read_record(self.run_dir)
        with self._lock:
            self._refresh(record)
            fold = self._fold
            existing = self._exists.existing([entry["path"] for entry in fold.checkpoints if entry["path"]])
            status = replace(fold, checkpoints=[dict(entry) for entry in fold.checkpoints
                                                if entry["path"] in existing],
                             samples=list(fold.samples), sample_labels=list(fold.sample_labels),
                             warnings=list(fold.warnings))
        status.state = status.state or ("queued" if queued else "created")
        _status_from_record(status, record, self.run_dir)
        status.log_tail = self._log_tail(log_lines)
        return status

    def chart(self) -> ChartData:
        """The charts' rows (bounded, see ProgressSeries): the same object until new progress arrives, and for a
        long run (more rows than buckets) until CHART_REFRESH_S have passed too, since one more step does not
        move a decimated line visibly and every viewer would get thousands of values again each second."""
        record = read_record(self.run_dir)
        with self._lock:
            self._refresh(record)
            now = time.monotonic()
            due = self._series.stride == 1 or now - self._rows_at >= CHART_REFRESH_S
            if self._rows is None or (self._unpublished and due):
                # Versions come from one counter for the process: a restarted fold never repeats a drawn one.
                self._rows = ChartData(next(_VERSIONS), [*self._series.rows(), *self._validation_rows()])
                self._rows_at, self._unpublished = now, False
            return self._rows

    def _validation_rows(self) -> list[dict[str, Any]]:
        """The validation points; before the first pass of a run that holds images out, one empty (NaN) point, so
        the loss chart is first drawn knowing the validation series: its plot keeps the colour domain of its first
        data, and would not draw a series that appears later."""
        if self._validation or not self._fold.validation_images:
            return list(self._validation)
        return [{"step": 0, "val_loss": math.nan}]

    def _log_tail(self, count: int) -> list[str]:
        """train.log's last lines, read again only when the file changed (every viewer asks at every tick)."""
        if count <= 0:  # a caller that wants no lines (the gallery's redraw) must not evict the tick's cached tail
            return []
        path = train_log_path(self.run_dir)
        try:
            stat = path.stat()
        except OSError:
            return []
        key = (stat.st_size, stat.st_mtime_ns, count)
        cached = self._log_cache
        if cached is None or cached[0] != key:
            cached = self._log_cache = (key, tail_lines(path, count))
        return list(cached[1])

    # --- folding -----------------------------------------------------------------------------------------------

    def _refresh(self, record: dict[str, Any]) -> None:
        path = events_path(self.run_dir)
        try:
            stream = path.open("rb")
        except OSError:
            if self._file_id is not None:
                self._reset()
            return
        with stream:
            stat = os.fstat(stream.fileno())
            split = int(record.get("events_offset") or 0)
            split = split if split <= stat.st_size else 0  # a file shorter than the offset was replaced
            if self._replaced(stream, stat) or split < self._split or self._split < split < self._pos:
                self._reset()
            elif split > self._split:
                self._to_history()
            self._file_id, self._split = (stat.st_dev, stat.st_ino), split
            self._read(stream, stat.st_size)

    def _replaced(self, stream: Any, stat: os.stat_result) -> bool:
        if self._file_id is None:
            return False
        if self._file_id != (stat.st_dev, stat.st_ino) or stat.st_size < self._pos:
            return True
        if self._pos:
            stream.seek(self._pos - 1)
            return stream.read(1) != self._last_byte
        return False

    def _to_history(self) -> None:
        """A new process started on the run dir (a resume): what was read so far only keeps its files."""
        self._fold = RunStatus(state="", checkpoints=self._fold.checkpoints, samples=self._fold.samples,
                               sample_labels=self._fold.sample_labels, resume_state=self._last_state)

    def _read(self, stream: Any, size: int) -> None:
        added = False
        while self._pos < size:
            history = self._pos < self._split
            end = self._split if history else size
            stream.seek(self._pos)
            data = stream.read(min(end - self._pos, _CHUNK_BYTES))
            if self._pos + len(data) < end and not data.endswith(b"\n"):
                data += stream.readline(end - self._pos - len(data))  # a chunk ends at a line's end
            # Up to the offset everything counts (read_status reads it so); after it, a line still being written
            # waits for the next look.
            complete = data if history and self._pos + len(data) == end else data[: data.rfind(b"\n") + 1]
            if not complete:
                break
            for event in parse_event_lines(complete):
                added = self._apply(event, history) or added
            self._pos += len(complete)
            self._last_byte = complete[-1:]
        if added:
            self._unpublished = True

    def _apply(self, event: dict[str, Any], history: bool) -> bool:
        """Fold one event; True when it added a chart row."""
        kind = event.get("type", "")
        row = progress_row(event)
        if row is not None:
            self._series.add(row)
        validation = validation_row(event)
        if validation is not None:
            self._validation.append(validation)
            row = validation
        if kind == "checkpoint" and event.get("kind") == "state":
            self._last_state = event.get("path", "")
        if not history or kind in _HISTORY:
            _FOLD.get(kind, lambda *_: None)(self._fold, event)
        return row is not None
