"""Resumable training states: a folder holding everything needed to continue a run exactly where it was.

    <stem>-state/
        trained.safetensors   the trained tensors in full precision (network, embedding or model weights)
        optimizer.pt          optimizer state
        scheduler.pt          learning-rate scheduler state
        scaler.pt             fp16 loss-scaler state (only with fp16 mixed precision)
        rng.pt                Python, NumPy and torch (CPU and CUDA) generator states
        train_state.json      position: epoch, batches done in it, optimizer steps; and what the run was

The folder is written under a temporary name and renamed into place, so a crash while saving never leaves a
half-written state where a complete one is expected. Randomness during training is reseeded from
(seed, step) at every step, so the position alone determines what comes next; the RNG file is kept so a state
stays complete even if that ever changes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.files import replace_folder

STATE_VERSION = 1
_TRAINED = "trained.safetensors"
_POSITION = "train_state.json"


class StateError(ValueError):
    """A state folder that cannot be resumed from; the message names the folder and what to do."""


@dataclass
class TrainPosition:
    """Where a run is: `epoch` counted from 1, `batches_done` micro-batches of that epoch, `global_step` updates."""

    epoch: int = 1
    batches_done: int = 0
    global_step: int = 0


@dataclass
class SavedState:
    trained: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    position: TrainPosition
    info: dict[str, Any] = field(default_factory=dict)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(folder: Path, state: SavedState) -> Path:
    """Write `state` to `folder` atomically (a previous state of the same name is replaced only once complete)."""
    folder = Path(folder)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in state.trained.items()},
              str(temporary / _TRAINED))
    torch.save(state.optimizer, temporary / "optimizer.pt")
    torch.save(state.scheduler, temporary / "scheduler.pt")
    if state.scaler is not None:
        torch.save(state.scaler, temporary / "scaler.pt")
    torch.save(rng_states(), temporary / "rng.pt")
    document = {"version": STATE_VERSION, **asdict(state.position), "info": state.info}
    (temporary / _POSITION).write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
    replace_folder(temporary, folder)
    return folder


def load_state(folder: Path) -> SavedState:
    """Read a state folder written by :func:`save_state`.

    Raises:
        StateError: the folder is missing, incomplete or from a newer version.
    """
    folder = Path(folder)
    position_file = folder / _POSITION
    if not position_file.is_file():
        raise StateError(f"{folder}: not a training state folder (no {_POSITION}); saving.resume must name a "
                         "folder ending in -state that a run with save_state wrote")
    document = json.loads(position_file.read_text(encoding="utf-8"))
    if document.get("version", 0) > STATE_VERSION:
        raise StateError(f"{folder}: written by a newer Atelier (state version {document['version']}); update "
                         "Atelier to resume it")
    missing = [name for name in (_TRAINED, "optimizer.pt", "scheduler.pt") if not (folder / name).is_file()]
    if missing:
        raise StateError(f"{folder}: incomplete state, {', '.join(missing)} missing; resume from another state")
    scaler_file = folder / "scaler.pt"
    position = TrainPosition(int(document["epoch"]), int(document["batches_done"]), int(document["global_step"]))
    return SavedState(
        trained=load_file(str(folder / _TRAINED)),
        optimizer=torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False),
        scheduler=torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=False),
        scaler=torch.load(scaler_file, map_location="cpu", weights_only=False) if scaler_file.is_file() else None,
        position=position,
        info=document.get("info", {}),
    )
