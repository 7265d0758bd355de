"""Short engine jobs started from the GUI (captioning, latent caching, class images, LoRA tools).

Each job runs `python -m engine ...` in its own process with `--events FILE`; the GUI never imports torch. A
handler iterates `EngineJob.follow()` and shows each `JobUpdate` (the progress line, the events so far, the
output) in the page; the job's stdout and stderr are kept in a log file next to the events. `FolderJobs` keeps
the jobs a tab runs by folder: one job at a time per folder, and the tab's Stop button finds it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.rundir.event_reader import EventTail
from engine.rundir.launch import engine_command, engine_environment
from engine.rundir.layout import EVENTS_FILE


@dataclass
class JobUpdate:
    """What a job has said so far. `returncode` is None while it runs."""

    events: list[dict[str, Any]] = field(default_factory=list)
    returncode: int | None = None
    output: str = ""  # stdout and stderr so far

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last(self, type_: str) -> dict[str, Any] | None:
        return next((event for event in reversed(self.events) if event.get("type") == type_), None)

    def progress_text(self) -> str:
        """'caption: 12/40 (3.1/s, about 9 s left)' from the newest progress event, or ''."""
        event = self.last("progress")
        if event is None:
            return ""
        text = f"{event.get('task', 'working')}: {event.get('done', '?')}/{event.get('total', '?')}"
        extras = []
        if event.get("rate"):
            extras.append(f"{event['rate']:.1f}/s")
        if event.get("eta_s") is not None:
            extras.append(f"about {event['eta_s']:.0f} s left")
        return text + (f" ({', '.join(extras)})" if extras else "")

    def error_text(self) -> str:
        """The error event's message and hint, else the last lines of the output when the job failed."""
        event = self.last("error")
        if event is not None:
            hint = f" {event['hint']}" if event.get("hint") else ""
            return f"{event.get('message', 'failed')}.{hint}"
        if self.finished and not self.ok:
            return "\n".join(self.output.strip().splitlines()[-5:]) or f"exit code {self.returncode}"
        return ""


class EngineJob:
    """One `python -m engine <args> --events FILE` process."""

    def __init__(self, args: Sequence[str], *, work_dir: str | Path | None = None, python: str = sys.executable):
        self._temporary = work_dir is None  # removed once the job has ended and its output was read
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="atelier-job-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.events_path = self.work_dir / EVENTS_FILE
        self.log_path = self.work_dir / "output.log"
        self.argv = engine_command([*args, "--events", str(self.events_path)], python=python)
        self._process: subprocess.Popen | None = None
        self._events: list[dict[str, Any]] = []
        self._tail = EventTail(self.events_path)

    def start(self) -> EngineJob:
        with open(self.log_path, "w", encoding="utf-8") as log:
            # Its own session: a closed browser tab or a reloaded GUI does not kill it half-way through a folder.
            self._process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                             env=engine_environment(), start_new_session=True)
        return self

    def snapshot(self) -> JobUpdate:
        # Only the lines added since the last look are read and parsed (a caption job writes one per image).
        self._events += self._tail.read()
        output = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        code = self._process.poll() if self._process is not None else None
        return JobUpdate(list(self._events), code, output)

    def follow(self, interval: float = 0.5) -> Iterator[JobUpdate]:
        """Yield an update every `interval` seconds while the job runs, and a final one when it has ended."""
        if self._process is None:
            self.start()
        while self._process.poll() is None:
            yield self.snapshot()
            time.sleep(interval)
        final = self.snapshot()
        if self._temporary:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        yield final

    def cancel(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()

    def run(self) -> JobUpdate:
        """Run to the end and return the final update."""
        updates = list(self.follow())
        return updates[-1]


class FolderJobs:
    """The running jobs of one kind by folder (or any key): at most one job per folder, and the Stop button finds
    it. A handler claims the folder for the length of its job; a second claim while it runs gets None."""

    def __init__(self) -> None:
        self._jobs: dict[str, EngineJob] = {}
        self._lock = threading.Lock()  # two clicks at once must not start two jobs on one folder

    @contextmanager
    def claim(self, key: str, args: Sequence[str]) -> Iterator[EngineJob | None]:
        """A new (not yet started) job for `key`, kept while the `with` block runs; None when one runs already."""
        with self._lock:
            if key in self._jobs:
                job = None
            else:
                job = self._jobs[key] = EngineJob(args)
        if job is None:
            yield None
            return
        try:
            yield job
        finally:
            with self._lock:
                self._jobs.pop(key, None)

    def stop(self, key: str) -> bool:
        """Cancel the job running for `key`; False when there is none."""
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            return False
        job.cancel()
        return True
