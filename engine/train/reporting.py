"""How a training run reports: JSON-lines events for the GUI, a human log for people, and progress figures.

Every event also becomes one readable line on stdout and in `<run dir>/train.log`, so a user who never opens the
browser sees the same story. Only the main process reports; the others get a `RunLog` that stays silent.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from engine.events import EventWriter
from engine.rundir.layout import events_path, train_log_path

_LINE_FORMATS = {
    "start": "start: {total_steps} steps, {num_epochs} epochs, {num_train_images} images ({family}, {method})",
    "sample": "samples at step {step}: {count} image(s) in {folder}",
    "checkpoint": "saved {kind} at step {step}: {path}",
    "validation": "validation loss at step {step}: {loss:.6f} ({images} held-out images)",
    "warning": "warning: {message}",
    "error": "error: {message}",
    "done": "done: {summary}",
}


# sd-scripts' tracker project names per script (train_network.py, train_db.py, fine_tune.py, train_textual_inversion.py)
TRACKER_NAMES = {"lora": "network_train", "dreambooth": "dreambooth", "finetune": "finetuning",
                 "textual_inversion": "textual_inversion"}


def tracker_name(method: str, log_tracker_name: str) -> str:
    """The tracker's project name: logging.log_tracker_name, else the name sd-scripts' script for the method uses."""
    return log_tracker_name or TRACKER_NAMES.get(method, "atelier")


def run_log_folder(logging_dir: Path, log_prefix: str, *, reserve: bool, now: float | None = None) -> Path:
    """This run's own log folder, `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>` as in sd-scripts, so that runs
    sharing a logging_dir never write into one folder.

    Args:
        reserve: create the folder, adding '-2', '-3', ... when another run took that second's name (the main
            process does this; the others only need the name, and never write logs).
        now: the time to name it after (default: now).
    """
    stem = f"{log_prefix}{time.strftime('%Y%m%d%H%M%S', time.localtime(now))}"
    folder = logging_dir / stem
    if not reserve:
        return folder
    logging_dir.mkdir(parents=True, exist_ok=True)
    for number in range(2, 10_000):
        try:
            folder.mkdir()  # atomic: two runs starting in the same second get different folders
            return folder
        except FileExistsError:
            folder = logging_dir / f"{stem}-{number}"
    raise OSError(f"{logging_dir}: too many log folders named {stem}-N; clean up old logs")


def is_main_launch_process() -> bool:
    """Whether this process is the main one (rank 0) of its launch, as torchrun / accelerate tell it before the
    Accelerator exists (a plain one-process run has no RANK)."""
    return os.environ.get("RANK", "0") == "0"


class RunLog:
    """Events to `<run dir>/events.jsonl`, lines to stdout and `<run dir>/train.log`."""

    def __init__(self, run_dir: Path | None, *, stream: IO[str] | None = None, active: bool = True):
        self.active = active and run_dir is not None
        self._events = EventWriter(events_path(run_dir)) if self.active else EventWriter()
        self._log = open(train_log_path(run_dir), "a", encoding="utf-8") if self.active else None  # noqa: SIM115
        self._stream = stream if stream is not None else sys.stdout

    def line(self, text: str) -> None:
        if not self.active:
            return
        stamped = f"{time.strftime('%H:%M:%S')} {text}"
        for target in (self._stream, self._log):
            if target is not None:
                target.write(stamped + "\n")
                target.flush()

    def event(self, type_: str, **fields: Any) -> dict[str, Any] | None:
        if not self.active:
            return None
        event = self._events.emit(type_, **fields)
        template = _LINE_FORMATS.get(type_)
        if template is not None:
            try:
                self.line(template.format(**fields))
            except (KeyError, IndexError):
                self.line(f"{type_}: {fields}")
        if type_ == "error" and fields.get("hint"):
            self.line(f"  what to do: {fields['hint']}")
        return event

    def close(self) -> None:
        self._events.close()
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class ProgressMeter:
    """Loss average, speed and ETA for progress events.

    The moving average is over the last `window` steps (sd-scripts shows a similar `avr_loss`); speed is measured
    over the same window so a slow first step (compilation, caching) does not distort the ETA for long.
    """

    total_steps: int
    window: int = 50
    start_step: int = 0
    _losses: deque = field(default_factory=deque)
    _times: deque = field(default_factory=deque)

    def update(self, step: int, loss: float) -> dict[str, Any]:
        now = time.perf_counter()
        self._losses.append(loss)
        self._times.append((step, now))
        while len(self._losses) > self.window:
            self._losses.popleft()
        while len(self._times) > self.window + 1:
            self._times.popleft()
        average = sum(self._losses) / len(self._losses)
        rate = None
        if len(self._times) >= 2:
            (first_step, first_time), (last_step, last_time) = self._times[0], self._times[-1]
            if last_time > first_time:
                rate = (last_step - first_step) / (last_time - first_time)
        eta = (self.total_steps - step) / rate if rate else None
        return {"loss": loss, "loss_avg": average, "it_per_s": rate, "eta_s": eta}


def memory_figures() -> dict[str, float]:
    """Peak GPU memory when training on CUDA; the process's peak resident memory otherwise (in MiB)."""
    import torch

    if torch.cuda.is_available():
        return {"gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                "gpu_reserved_mib": torch.cuda.memory_reserved() / 2**20}
    import resource

    return {"rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def progress_line(step: int, total: int, epoch: int, figures: dict[str, Any], lrs: list[float]) -> str:
    parts = [f"step {step}/{total}", f"epoch {epoch}", f"loss {figures['loss']:.4f}",
             f"avg {figures['loss_avg']:.4f}", "lr " + ",".join(f"{lr:.2e}" for lr in lrs)]
    if figures.get("it_per_s"):
        parts.append(f"{figures['it_per_s']:.2f} it/s")
    if figures.get("eta_s") is not None:
        parts.append(f"eta {format_seconds(figures['eta_s'])}")
    return " | ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
