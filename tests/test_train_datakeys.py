"""Dataset keys that act inside training (issue 14): each runs the real trainer in-process on the tiny SD1 model.

network_multiplier per dataset, custom_attributes.diff_output_preservation, face_crop_aug_range and
training.persistent_data_loader_workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import write_config

IMAGES = "10_sks dog"


def _inline(tiny_models: dict[str, Path], *datasets: dict[str, Any]) -> dict[str, Any]:
    """Inline datasets over the tiny dataset's training folder, one repeat each (a few batches per epoch)."""
    folder = str(tiny_models["dataset_img"] / IMAGES)
    entries = [{**dataset, "subsets": [{"image_dir": folder, "num_repeats": 1, **dataset.pop("subset", {})}]}
               for dataset in (dict(each) for each in datasets)]
    return {"train_data_dir": "", "datasets": entries}


def _session(tmp_path: Path, tiny_models: dict[str, Path], **sections: Any) -> tuple[Any, Any]:
    from engine.config.io import load_config
    from engine.train.build import build_session
    from engine.train.reporting import RunLog

    path = write_config(tmp_path / "config.toml", tiny_models, **sections)
    config = load_config(path, check_packages=False)
    log = RunLog(tmp_path / "out")
    return build_session(config, path.parent, tmp_path / "out", log), log


def _train(session: Any, run_dir: Path) -> Any:
    from engine.train.control import ControlChannel
    from engine.train.trainer import Trainer

    trainer = Trainer(session, ControlChannel(run_dir))
    return trainer, trainer.run()


# --- persistent data-loader workers -----------------------------------------------------------------------------


class _PidRecordingDataset(torch.utils.data.Dataset):
    """The training dataset, noting which process loaded each item (a worker, with workers > 0)."""

    def __init__(self, inner: Any, record: Path):
        self.inner = inner
        self.record = record

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: Any) -> Any:
        with self.record.open("a", encoding="utf-8") as handle:
            handle.write(f"{key.epoch} {os.getpid()}\n")
        return self.inner[key]


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_serve_every_epoch(persistent, tiny_models, tmp_path):
    session, log = _session(tmp_path, tiny_models, dataset=_inline(tiny_models, {}),
                            training={"max_train_steps": 0, "max_train_epochs": 3, "max_data_loader_n_workers": 1,
                                      "persistent_data_loader_workers": persistent})
    record = tmp_path / "pids.txt"
    try:
        session.dataset = _PidRecordingDataset(session.dataset, record)
        _, outcome = _train(session, tmp_path / "out")
    finally:
        log.close()
    assert outcome.status == "finished"
    pids: dict[int, set[str]] = {}
    for line in record.read_text(encoding="utf-8").splitlines():
        epoch, pid = line.split()
        pids.setdefault(int(epoch), set()).add(pid)
    assert sorted(pids) == [1, 2, 3] and all(len(each) == 1 for each in pids.values())
    assert str(os.getpid()) not in set.union(*pids.values())  # loaded in a worker, not here
    workers = set.union(*pids.values())
    assert len(workers) == (1 if persistent else 3), pids
