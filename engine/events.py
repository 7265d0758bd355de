"""The event stream: how engine commands tell the GUI (and anyone tailing a file) what they are doing.

Events are JSON objects, one per line, appended to `<run dir>/events.jsonl` (or another file a command is given).
Every event has `type` and `time` (seconds since the epoch, float); the other fields depend on the type:

    start       task, plus a summary of what will happen (e.g. total)
    progress    task, done, total, and where known rate (items/s), eta_s, and task-specific values
    warning     message, where (a file or config path), hint
    error       message, hint, and where known `where` and `traceback_file`
    done        task, ok (bool), summary fields; `stopped` when a run was stopped on request
    sample, checkpoint   emitted by training (file paths and step)

Training's fields are listed in docs/events.md.

Lines are flushed as they are written so a reader never waits for a buffer. Readers must ignore unknown fields
and unknown types: new ones are added over time. The one reader, whole or incrementally while a command is still
writing, is engine.rundir.event_reader.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

EVENT_TYPES = ("start", "progress", "warning", "error", "done", "sample", "checkpoint", "validation")


class EventWriter:
    """Writes events as JSON lines to a file and/or a stream; safe to use with neither (it then does nothing)."""

    def __init__(self, path: str | Path | None = None, stream: IO[str] | None = None):
        self._file = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._stream = stream

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}; add it to EVENT_TYPES and document it")
        event = {"type": type_, "time": time.time(), **fields}
        line = json.dumps(event, default=str, ensure_ascii=False)
        for target in (self._file, self._stream):
            if target is not None:
                target.write(line + "\n")
                target.flush()
        return event

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Progress:
    """Progress of one task: a tqdm bar on a terminal, `progress` events otherwise (or both when asked)."""

    def __init__(self, task: str, total: int, events: EventWriter | None = None, *, min_interval: float = 0.5,
                 use_bar: bool | None = None):
        self.task, self.total, self.done = task, total, 0
        self._events = events
        self._started = time.monotonic()
        self._last_emit = 0.0
        self._min_interval = min_interval
        self._bar = None
        if use_bar if use_bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=task, unit="img", dynamic_ncols=True)
        if events is not None:
            events.emit("start", task=task, total=total)

    def update(self, count: int = 1, **fields: Any) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        now = time.monotonic()
        if self._events is not None and (now - self._last_emit >= self._min_interval or self.done >= self.total):
            self._last_emit = now
            elapsed = now - self._started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else None
            self._events.emit("progress", task=self.task, done=self.done, total=self.total, rate=round(rate, 3),
                              eta_s=None if eta is None else round(eta, 1), **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
