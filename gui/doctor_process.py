"""The dataset doctor for Start: in the GUI process for a small dataset, in an engine process for a large one.

The doctor decodes every image to find the corrupt ones. On a large dataset that holds the GUI process (its CPU and
its interpreter lock, so every other page waits) for as long as it takes, so above `LARGE_DATASET_IMAGES` images it
runs as `python -m engine doctor --json` instead. Both give the same report (`DoctorReport.to_dict()`), so what Start
shows and whether it refuses do not depend on where the doctor ran. Kept free of gradio so it is tested directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.config.errors import ConfigError
from engine.config.io import load_dataset_file, resolve_path
from engine.config.schema import RunConfig
from gui.engine_json import JsonCommand, run_json_command

# Up to this many images the doctor runs in the GUI process: a second or two of decoding, which the page can wait
# for, and no engine process to start (about 0.4 s) for a dataset that would not hold the GUI up anyway.
LARGE_DATASET_IMAGES = 200
# A doctor process that has not answered after this long is stopped: decoding runs at hundreds of images a second,
# so ten minutes is a dataset far larger than anyone trains on, or a process that hangs (a stalled network drive).
DOCTOR_TIMEOUT_S = 600.0


class DoctorFailed(Exception):
    """The doctor process did not give a report: it timed out, could not start, or stopped with an error."""


# The doctor exits 0 (no errors) or 2 (errors found, or settings it refused), with its report either way.
DOCTOR_COMMAND = JsonCommand(
    title="the dataset doctor", exit_codes=(0, 2), report_key=lambda report: "findings" in report,
    failure=DoctorFailed, timeout_advice="check that the dataset folders are readable, or run `python -m engine "
                                         "doctor` on the settings to see how far it gets")


def doctor_report(config: RunConfig, base: Path, *, quick: bool = False, large: int = LARGE_DATASET_IMAGES,
                  timeout: float = DOCTOR_TIMEOUT_S) -> dict[str, Any]:
    """The doctor's report (its JSON form) on `config`, relative paths from `base`: run here when the datasets hold
    at most `large` images, in an engine process otherwise.

    Raises:
        DoctorFailed: the engine process gave no report (the message says why).
    """
    if count_images(config, base, stop_above=large) <= large:
        from engine.data.doctor import run_doctor  # image libraries load when the doctor first runs here

        return run_doctor(config, base, quick=quick).to_dict()
    return run_doctor_process(config, base, quick=quick, timeout=timeout)


def count_images(config: RunConfig, base: Path, *, stop_above: int) -> int:
    """The image files in the config's dataset folders and their direct subfolders (the legacy `N_name` ones), by
    name only; counting stops once it passes `stop_above`, so a huge dataset costs no more than a small one."""
    from engine.data.images import is_image_file

    count = 0
    for folder in _dataset_folders(config, base):
        for path in _files_in(folder):
            count += is_image_file(path)
            if count > stop_above:
                return count
    return count


def _dataset_folders(config: RunConfig, base: Path) -> Iterator[Path]:
    """The image folders the config names: legacy folders, inline subsets and those of the dataset TOML."""
    section = config.dataset
    datasets = list(section.datasets)
    if section.config_file:
        with contextlib.suppress(ConfigError, OSError):  # the doctor reports the file's problems
            datasets += load_dataset_file(resolve_path(section.config_file, base)).datasets
    names = [section.train_data_dir, section.reg_data_dir,
             *(subset.image_dir for dataset in datasets for subset in dataset.subsets)]
    yield from (resolve_path(name, base) for name in names if name)


def _files_in(folder: Path) -> Iterator[Path]:
    """The files of `folder` and of its direct subfolders; nothing when it cannot be read."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.is_dir():
            yield from (path for path in _listing(entry) if path.is_file())
        elif entry.is_file():
            yield entry


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def run_doctor_process(config: RunConfig, base: Path, *, quick: bool = False,
                       timeout: float = DOCTOR_TIMEOUT_S) -> dict[str, Any]:
    """Run `python -m engine doctor --json` on `config` (written to a temporary TOML; its relative paths still start
    from `base`) and return the report it prints.

    Raises:
        DoctorFailed: it timed out, could not start, or printed no report.
    """
    def arguments(config_path: Path) -> list[str]:
        return ["doctor", str(config_path), "--json", "--base-dir", str(base), *(["--quick"] if quick else [])]

    return run_json_command(DOCTOR_COMMAND, config, arguments, timeout=timeout)
