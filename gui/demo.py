"""'Try the demo': the tiny offline model, the sample dataset and the demo preset, as a run a newcomer can start
with one click and watch every part of the Train tab work (log, progress, chart, samples, checkpoints).

The model and images are built by tools/make_tiny_model.py in a subprocess (it imports torch, which the GUI
never does) into `<runs_dir>/_demo/demo/`, which is where the preset's relative paths point when the run config
is resolved against `<runs_dir>/_demo`. The folder has no run.json, so run discovery never lists it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.config.io import load_preset
from engine.config.schema import RunConfig
from gui.runner import DEFAULT_OUTPUT_DIR, RunManager
from gui.runs import RunHandle

REPO = Path(__file__).resolve().parents[1]
DEMO_PRESET = REPO / "presets" / "demo.json"
BUILDER = REPO / "tools" / "make_tiny_model.py"
DEMO_FOLDER = "_demo"
# Tests (and impatient people) may shorten the demo: the number of epochs it trains (the preset says 4).
EPOCHS_ENV = "ATELIER_DEMO_EPOCHS"


class DemoError(RuntimeError):
    """The demo's model or images could not be built; the message carries the builder's last output."""


def demo_base(runs_dir: Path) -> Path:
    """The folder the demo config's relative paths are resolved against."""
    return Path(runs_dir) / DEMO_FOLDER


def prepare_demo_assets(runs_dir: Path, timeout: float = 600) -> Path:
    """Build the tiny model and dataset (skipped by the builder when already current); returns the base folder.

    Raises:
        DemoError: the builder failed or ran past `timeout` seconds.
    """
    base = demo_base(runs_dir)
    base.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(BUILDER), str(base / "demo"), "--only", "sd1,dataset"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise DemoError(f"building the demo model took longer than {timeout:.0f} s") from error
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise DemoError(f"building the demo model failed (exit {done.returncode}):\n{tail}")
    return base


def demo_config(epochs: int | None = None) -> RunConfig:
    """The demo preset, with its models saved inside the run directory (the runner's default) and, when given
    or set in ATELIER_DEMO_EPOCHS, a shorter length."""
    config = load_preset(DEMO_PRESET)
    epochs = epochs or int(os.environ.get(EPOCHS_ENV, "0") or 0)
    saving = config.saving.model_copy(update={"output_dir": DEFAULT_OUTPUT_DIR})
    updates: dict = {"saving": saving}
    if epochs:
        updates["training"] = config.training.model_copy(update={"max_train_epochs": epochs})
    return config.model_copy(update=updates)


def start_demo(manager: RunManager) -> RunHandle:
    """Prepare the assets, create a run from the demo preset and start it.

    Raises:
        DemoError: a run is going (the demo would share its GPU; Start asks, the demo button does not start beside
            it), or the assets could not be built.
    """
    running = [handle.name for handle in manager.running()]
    if running:
        listed = ", ".join(f"`{name}`" for name in running)
        raise DemoError(f"{listed} {'is' if len(running) == 1 else 'are'} running, and the demo would share the GPU "
                        "with it; try the demo when it has ended, or stop it first.")
    base = prepare_demo_assets(manager.runs_dir)
    handle = manager.create_run(demo_config(), "demo", base_dir=base)
    return manager.start(handle)
