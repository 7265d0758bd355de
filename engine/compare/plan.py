"""What a comparison grid shows: the run it comes from, its checkpoints (with their validation losses), strengths
and seeds. Plain file reading, no torch: the GUI's Compare tab lists a run's checkpoints with it.

A grid's columns are checkpoints; its rows are (strength, seed) pairs; one grid per prompt. Strength 0 is the base
model, the same picture in every column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.rundir.event_reader import read_events
from engine.rundir.layout import config_path, events_path

__all__ = ["Checkpoint", "CheckpointError", "RunSource", "given_checkpoints", "list_checkpoints", "mark_best",
           "parse_seeds", "parse_strengths", "resolve_source", "validation_losses"]

# The checkpoints a grid shows by default: every saved epoch and the final model (the last epoch's weights) ...
DEFAULT_KINDS = ("epoch", "last")
# ... and, for a run without epoch saves (saving every N steps), its step saves and the final model.
FALLBACK_KINDS = ("step", "last")
_NETWORK_SUFFIXES = (".safetensors", ".ckpt", ".pt")
_EPOCH_STEM = re.compile(r"-(\d{6,})$")
_STEP_STEM = re.compile(r"-step(\d{8,})$")


@dataclass(frozen=True)
class RunSource:
    """Where a comparison's settings come from: a run directory (config.toml and events.jsonl) or a config file."""

    config: Path
    run_dir: Path | None  # None for a bare config file: no events, so no validation losses

    @property
    def events(self) -> Path | None:
        return events_path(self.run_dir) if self.run_dir is not None else None

    @property
    def folder(self) -> Path:
        """Where the comparison is written by default: the run directory, else the config's folder."""
        return self.run_dir if self.run_dir is not None else self.config.parent


def resolve_source(path: str | Path) -> RunSource:
    """A run directory (holding config.toml) or a config file.

    Raises:
        FileNotFoundError: neither (the message says which was expected).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        config = config_path(path)
        if not config.is_file():
            raise FileNotFoundError(f"{path} is a folder without {config.name}: give a run folder or a config file")
        return RunSource(config.resolve(), path.resolve())
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run folder or a config file")
    return RunSource(path.resolve(), None)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run's network (another network type, rank or set of layers)."""


@dataclass(frozen=True)
class Checkpoint:
    """One column of the grid: a saved network file, and what the run says about it."""

    path: Path
    epoch: int | None = None
    step: int | None = None
    validation_loss: float | None = None
    best: bool = False

    @property
    def label(self) -> str:
        """The file's name without its extension, e.g. ``lora-000002``."""
        return self.path.name.removesuffix(self.path.suffix)


# --- validation losses ---------------------------------------------------------------------------------------------

# The `validation` events a run writes when it measures the validation loss at a save (docs/events.md). These names
# are the one place the reader depends on them.
VALIDATION_EVENT = "validation"
VALIDATION_LOSS_FIELD = "loss"
VALIDATION_CHECKPOINT_FIELDS = ("checkpoint", "path")  # the saved file the loss belongs to; the first one present


def validation_losses(events: Iterable[Mapping[str, Any]]) -> dict[Path, float]:
    """The validation loss of each checkpoint a run measured one for, by the checkpoint's resolved path; the newest
    event wins (a resumed run measures its saves again). Events without a checkpoint or a finite loss are skipped."""
    losses: dict[Path, float] = {}
    for event in events:
        if event.get("type") != VALIDATION_EVENT:
            continue
        checkpoint = next((event[key] for key in VALIDATION_CHECKPOINT_FIELDS if event.get(key)), None)
        loss = event.get(VALIDATION_LOSS_FIELD)
        if checkpoint and isinstance(loss, int | float) and math.isfinite(loss):
            losses[Path(checkpoint).resolve()] = float(loss)
    return losses


def mark_best(checkpoints: Sequence[Checkpoint], losses: Mapping[Path, float]) -> list[Checkpoint]:
    """The checkpoints with their validation losses, and the one with the lowest marked best (none without losses)."""
    measured = [replace(checkpoint, validation_loss=losses.get(checkpoint.path.resolve()))
                for checkpoint in checkpoints]
    known = [checkpoint for checkpoint in measured if checkpoint.validation_loss is not None]
    if not known:
        return measured
    best = min(known, key=lambda checkpoint: checkpoint.validation_loss)
    return [replace(checkpoint, best=checkpoint is best) for checkpoint in measured]


# --- checkpoints ---------------------------------------------------------------------------------------------------


def _saved_by_events(events: Sequence[Mapping[str, Any]], kinds: Sequence[str]) -> list[Checkpoint]:
    """The network files the run's `checkpoint` events name, of the given kinds, that still exist (retention may
    have removed old ones), in the order they were saved, each once."""
    found: dict[Path, Checkpoint] = {}
    for event in events:
        if event.get("type") != "checkpoint" or event.get("kind") not in kinds or not event.get("path"):
            continue
        path = Path(event["path"])
        if path.suffix.lower() in _NETWORK_SUFFIXES and path.is_file():
            found[path.resolve()] = Checkpoint(path.resolve(), event.get("epoch"), event.get("step"))
    return list(found.values())


def _saved_in_folder(output_dir: Path, output_name: str) -> list[Checkpoint]:
    """A config without a run: the files named as a run called `output_name` names them (engine.rundir.naming),
    epochs first in order, then steps, then the final model."""
    if not output_dir.is_dir():
        return []
    epochs, steps, last = [], [], []
    for path in sorted(output_dir.iterdir()):
        stem = path.name.removesuffix(path.suffix)
        if path.suffix.lower() not in _NETWORK_SUFFIXES or not path.is_file() or not stem.startswith(output_name):
            continue
        rest = stem[len(output_name):]
        if rest == "":
            last.append(Checkpoint(path.resolve()))
        elif match := _EPOCH_STEM.fullmatch(rest):
            epochs.append(Checkpoint(path.resolve(), epoch=int(match.group(1))))
        elif match := _STEP_STEM.fullmatch(rest):
            steps.append(Checkpoint(path.resolve(), step=int(match.group(1))))
    return [*sorted(epochs, key=lambda c: c.epoch), *sorted(steps, key=lambda c: c.step), *last]


def list_checkpoints(source: RunSource, output_dir: Path | None = None, output_name: str = "") -> list[Checkpoint]:
    """The checkpoints a grid shows by default, with validation losses and the best one marked where the run
    measured them: every saved epoch and the final model (a run saving by steps only: its step saves and the final
    model). A bare config (no events) lists the files named after `output_name` in `output_dir`."""
    events = read_events(source.events) if source.events is not None and source.events.is_file() else []
    by_epoch = any(event.get("type") == "checkpoint" and event.get("kind") == "epoch" for event in events)
    checkpoints = _saved_by_events(events, DEFAULT_KINDS if by_epoch else FALLBACK_KINDS)
    if not checkpoints and output_dir is not None:
        checkpoints = _saved_in_folder(output_dir, output_name)
    return mark_best(checkpoints, validation_losses(events))


def given_checkpoints(paths: Iterable[str | Path], source: RunSource) -> list[Checkpoint]:
    """Checkpoints named on the command line, with what the run's events say about them (epoch, step, losses).

    Raises:
        FileNotFoundError: a path that is not a file (the message names it).
    """
    events = read_events(source.events) if source.events is not None and source.events.is_file() else []
    known = {checkpoint.path: checkpoint for checkpoint in _saved_by_events(events, ("epoch", "step", "last"))}
    chosen = []
    for given in paths:
        path = Path(given).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {given}")
        chosen.append(known.get(path, Checkpoint(path)))
    return mark_best(chosen, validation_losses(events))


# --- strengths and seeds -------------------------------------------------------------------------------------------


def _numbers(text: str, kind: type, what: str) -> list[Any]:
    values = []
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        try:
            value = kind(part)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a number") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{what}: {part!r} is not a finite number")
        if value not in values:
            values.append(value)
    return values


def parse_strengths(text: str) -> list[float]:
    """'0,0.5,0.8,1' -> [0.0, 0.5, 0.8, 1.0], duplicates dropped; strength 0 is the base model.

    Raises:
        ValueError: an entry that is no finite number, or none at all.
    """
    values = _numbers(text, float, "--strengths")
    if not values:
        raise ValueError("--strengths: give at least one strength, e.g. 0,0.5,1")
    return values


def parse_seeds(text: str) -> list[int]:
    """'1,2' -> [1, 2]; empty -> [] (each prompt's own seed, or one drawn for it).

    Raises:
        ValueError: an entry that is not a whole number, or a negative one.
    """
    values = _numbers(text, int, "--seeds")
    negative = [value for value in values if value < 0]
    if negative:
        raise ValueError(f"--seeds: {negative[0]} is negative; seeds are 0 or more")
    return values
