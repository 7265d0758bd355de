"""Resumable training states: a folder holding everything needed to continue a run exactly where it was.

    <stem>-state/
        trained.safetensors   the trained tensors in full precision (network, embedding or model weights)
        optimizer.pt          optimizer state
        scheduler.pt          learning-rate scheduler state
        scaler.pt             fp16 loss-scaler state (only with fp16 mixed precision)
        ema.safetensors       the EMA of the trained weights (float32) and its update count (only with ema.enabled;
                              a state without it still loads, and its EMA starts again from the resumed weights)
        rng.safetensors       Python, NumPy and torch (CPU and CUDA) generator states (tensors, the rest as JSON
                              metadata; states before this format had an rng.pt, which is never read)
        train_state.json      position: epoch, batches done in it, optimizer steps; and what the run was

The .pt files are read with `torch.load(weights_only=True)`: only tensors and plain data (numbers, strings, lists,
dicts) load, so a crafted file cannot run code; one holding anything else is refused as not written by Atelier.
Saving checks the same rule first, so a state Atelier writes always loads.

The folder is written under a temporary name and renamed into place, so a crash while saving never leaves a
half-written state where a complete one is expected (and a crash between the renames of a replacement is undone
when the state is loaded: see engine.files.recover_folder). Randomness during training is reseeded from
(seed, step) at every step, so the position alone determines what comes next; the RNG file is kept so a state
stays complete even if that ever changes.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.files import disk_full_named, recover_folder, remove_path, replace_folder

STATE_VERSION = 1
_TRAINED = "trained.safetensors"
_POSITION = "train_state.json"
_RNG = "rng.safetensors"
_EMA = "ema.safetensors"
# What torch.load(weights_only=True) accepts without extra allow-listing: containers and scalars are pickle
# opcodes, the torch types are on its default list.
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.Size, torch.dtype, torch.device)


class StateError(ValueError):
    """A state folder that cannot be resumed from (or written); the message names the file and what to do."""


@dataclass
class TrainPosition:
    """Where a run is: `epoch` counted from 1, `batches_done` micro-batches of that epoch, `global_step` updates."""

    epoch: int = 1
    batches_done: int = 0
    global_step: int = 0


@dataclass
class EmaSnapshot:
    """The EMA of the trained weights (engine.train.ema): float32 tensors by name, and how many updates made it."""

    tensors: dict[str, torch.Tensor]
    updates: int


@dataclass
class SavedState:
    trained: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    position: TrainPosition
    info: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None  # saved: None takes the generators' current states; loaded: None if absent
    ema: EmaSnapshot | None = None  # None: the run keeps no EMA (or, loaded, an older state without one)


# --- generator states ----------------------------------------------------------------------------------------------


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


def write_rng_file(path: Path, states: dict[str, Any]) -> None:
    """Generator states as tensors plus JSON metadata: no pickle, so reading them back can run nothing."""
    version, internal, gauss_next = states["python"]
    name, keys, position, has_gauss, cached = states["numpy"]
    tensors = {"python": torch.tensor(internal, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "torch": states["torch"].clone()}
    for index, state in enumerate(states.get("cuda", [])):
        tensors[f"cuda.{index}"] = state.cpu().clone()
    metadata = {"python": json.dumps([version, gauss_next]),
                "numpy": json.dumps([name, int(position), int(has_gauss), float(cached)]),
                "cuda_devices": str(len(states.get("cuda", [])))}
    save_file(tensors, str(path), metadata=metadata)


def read_rng_file(path: Path) -> dict[str, Any]:
    """What :func:`write_rng_file` wrote, in the forms `set_rng_states` takes."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    version, gauss_next = json.loads(metadata["python"])
    name, position, has_gauss, cached = json.loads(metadata["numpy"])
    states: dict[str, Any] = {
        "python": (version, tuple(int(value) for value in tensors["python"].tolist()), gauss_next),
        "numpy": (name, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached),
        "torch": tensors["torch"],
    }
    devices = int(metadata.get("cuda_devices", "0"))
    if devices:
        states["cuda"] = [tensors[f"cuda.{index}"] for index in range(devices)]
    return states


# --- checks ------------------------------------------------------------------------------------------------------


def plain_data(value: Any, where: str) -> Any:
    """`value` as only tensors and plain data, which weights_only loading accepts (NumPy scalars become numbers).

    Raises:
        StateError: something else is inside (an object of an optimizer Atelier does not ship, usually), naming
            where it is; the state would not load, so it is not written.
    """
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if type(value) in (dict, OrderedDict):
        return type(value)((key, plain_data(item, f"{where}[{key!r}]")) for key, item in value.items())
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(plain_data(item, f"{where}[{index}]") for index, item in enumerate(value))
    raise StateError(f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which a training state "
                     "cannot store safely (only tensors, numbers, strings, lists and dicts); use an optimizer and "
                     "scheduler Atelier lists, or set saving.save_state = false")


# --- saving and loading ----------------------------------------------------------------------------------------


def save_state(folder: Path, state: SavedState) -> Path:
    """Write `state` to `folder` atomically (a previous state of the same name is replaced only once complete).

    Raises:
        StateError: the optimizer, scheduler or scaler state holds something other than tensors and plain data.
        engine.files.DiskFullError: the disk filled up while writing (the partial folder is removed).
    """
    folder = Path(folder)
    pickled = {"optimizer.pt": plain_data(state.optimizer, "the optimizer state"),
               "scheduler.pt": plain_data(state.scheduler, "the learning-rate scheduler state")}
    if state.scaler is not None:
        pickled["scaler.pt"] = plain_data(state.scaler, "the loss-scaler state")
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    remove_path(temporary)
    with disk_full_named(folder.parent):
        try:
            temporary.mkdir(parents=True)
            save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in state.trained.items()},
                      str(temporary / _TRAINED))
            for name, value in pickled.items():
                torch.save(value, temporary / name)
            write_rng_file(temporary / _RNG, state.rng if state.rng is not None else rng_states())
            if state.ema is not None:
                save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in state.ema.tensors.items()},
                          str(temporary / _EMA), metadata={"updates": str(state.ema.updates)})
            document = {"version": STATE_VERSION, **asdict(state.position), "info": state.info}
            (temporary / _POSITION).write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
            replace_folder(temporary, folder)
        except Exception:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return folder


def load_state(folder: Path) -> SavedState:
    """Read a state folder written by :func:`save_state`.

    A folder missing because a save crashed between the renames of its replacement is restored first.

    Raises:
        StateError: the folder is missing, incomplete, damaged, from a newer version, or holds files Atelier did
            not write (anything but tensors and plain data in its .pt files).
    """
    folder = Path(folder)
    recover_folder(folder)
    position_file = folder / _POSITION
    if not position_file.is_file():
        raise StateError(f"{folder}: not a training state folder (no {_POSITION}); saving.resume must name a "
                         "folder ending in -state that a run with save_state wrote")
    try:
        document = json.loads(position_file.read_text(encoding="utf-8"))
        version = int(document.get("version", 0))
    except (ValueError, TypeError, AttributeError) as error:
        raise _damaged(position_file, error) from None
    # The version first: a newer state may describe its position differently.
    if version > STATE_VERSION:
        raise StateError(f"{folder}: written by a newer Atelier (state version {version}); update Atelier to "
                         "resume it")
    try:
        position = TrainPosition(int(document["epoch"]), int(document["batches_done"]), int(document["global_step"]))
    except (ValueError, KeyError, TypeError) as error:
        raise _damaged(position_file, error) from None
    missing = [name for name in (_TRAINED, "optimizer.pt", "scheduler.pt") if not (folder / name).is_file()]
    if missing:
        raise StateError(f"{folder}: incomplete state, {', '.join(missing)} missing; resume from another state")
    scaler_file = folder / "scaler.pt"
    rng_file = folder / _RNG
    ema_file = folder / _EMA
    return SavedState(
        trained=_read(load_file, folder / _TRAINED),
        optimizer=load_plain(folder / "optimizer.pt"),
        scheduler=load_plain(folder / "scheduler.pt"),
        scaler=load_plain(scaler_file) if scaler_file.is_file() else None,
        position=position,
        info=document.get("info", {}),
        rng=_read(read_rng_file, rng_file) if rng_file.is_file() else None,
        ema=_read(read_ema_file, ema_file) if ema_file.is_file() else None,
    )


def read_ema_file(path: str) -> EmaSnapshot:
    """The EMA tensors and update count :func:`save_state` wrote."""
    with safe_open(path, framework="pt") as handle:
        updates = int((handle.metadata() or {})["updates"])
    return EmaSnapshot(load_file(path), updates)


def load_plain(path: Path) -> Any:
    """A .pt file of tensors and plain data; anything else is refused before any of it is built.

    Raises:
        StateError: the file holds other Python objects (loading them could run code), or cannot be read.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = next((line.strip() for line in str(error).splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), "it holds Python objects")
        raise StateError(f"{path}: refused, not a state Atelier wrote: it holds more than tensors and plain data "
                         f"({detail}); loading such a file could run code, so it is not read. Resume from a state "
                         "folder a training run saved, and do not load files from unknown sources") from None
    except Exception as error:  # noqa: BLE001 - torch reports a damaged file as KeyError, EOFError, RuntimeError...
        raise StateError(f"{path}: damaged or not a torch file ({type(error).__name__}: {error}); resume from "
                         "another state") from None


def _read(reader: Callable[[Any], Any], path: Path) -> Any:
    """`reader(path)`, a file of tensors; any error means a damaged file (safetensors raises its own type)."""
    try:
        return reader(str(path))
    except Exception as error:  # noqa: BLE001 - a damaged file of any kind
        raise _damaged(path, error) from None


def _damaged(path: Path, error: Exception) -> StateError:
    return StateError(f"{path}: damaged ({error}); resume from another state")
