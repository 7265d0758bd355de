"""The files of a run directory, by name: the one place the names are written. Standard library only."""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.toml"  # the run's config, every local path absolute (it runs again from anywhere)
EVENTS_FILE = "events.jsonl"  # JSON-lines events (docs/events.md); engine jobs outside a run use the name too
TRAIN_LOG = "train.log"  # the events as lines for people
CONTROL_FILE = "control"  # stop/save/sample requests, one a line (engine.rundir.control)
TRACEBACK_FILE = "error-traceback.txt"  # written when a run fails unexpectedly; its `error` event names it


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVENTS_FILE


def train_log_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / TRAIN_LOG
