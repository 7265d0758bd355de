"""Saving a run's checkpoints and training states, and retiring old ones.

Every save first checks what it is about to write (engine.train.save_checks): values that are not finite stop the
run instead of being saved, and the disk must have room for the whole save. Only the main process writes; the others
learn of its failure so that no process waits at a barrier for ever. Retention removes only files this run wrote
(the list travels in the training state, so a resumed run knows its earlier files too).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.files import clean_stale_temporaries, disk_full_named, ensure_free_space
from engine.rundir import naming
from engine.train.ema import WeightsEMA, save_models
from engine.train.save_checks import refuse_non_finite, save_bytes
from engine.train.setup import Session
from engine.train.state import SavedState, TrainPosition, save_state
from engine.train.validation_hooks import ValidationTracker


class SaveFailedElsewhere(RuntimeError):
    """Raised on the other processes when the main process could not save, so that every process stops."""


class Checkpoints:
    """The files one run saves: model files (and the EMA's), their companions, and training states."""

    def __init__(self, session: Session, ema: WeightsEMA | None, validation: ValidationTracker,
                 set_train_mode: Callable[[bool], None]):
        self.session = session
        self.ema = ema
        self.validation = validation
        self.set_train_mode = set_train_mode  # a save puts the weights in eval mode (dropout, schedule-free)
        self.files: list[str] = []
        self._metadata: dict[str, str] | None = None  # built at the first save; only progress changes after

    def last_model(self) -> str | None:
        """The newest model file (or diffusers folder) this run saved and still has; states are not models."""
        models = [path for path in self.files if not path.endswith("-state")]
        return models[-1] if models else None

    def file_path(self, stem: str) -> Path:
        return self.session.output_dir / naming.file_name(stem, self.session.config.saving.save_model_as)

    # --- saving ----------------------------------------------------------------------------------------------

    def save(self, stem: str, *, kind: str, epoch: int, step: int, position: TrainPosition,
             with_state: bool) -> str | None:
        """Save the trained weights under `stem` (and a training state with `with_state`); the state's folder."""
        session = self.session
        trained = session.method.trained_state()
        optimizer_state = session.optimizer.state_dict() if with_state else None
        # Every process checks (their weights are the same), so all of them stop together without a message.
        refuse_non_finite(step, trained, optimizer_state, session.config.saving.save_precision)
        if self.ema is not None:
            refuse_non_finite(step, self.ema.shadow, None, session.config.saving.save_precision)
        state_folder, failure = None, None
        if session.is_main:
            try:
                state_folder = self._write(stem, kind=kind, epoch=epoch, step=step, trained=trained,
                                           optimizer_state=optimizer_state, position=position)
            except Exception as error:  # noqa: BLE001 - shared with the other processes below, then raised
                failure = error
        self._share_failure(failure)
        session.accelerator.wait_for_everyone()
        return state_folder

    def _write(self, stem: str, *, kind: str, epoch: int, step: int, trained: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any] | None, position: TrainPosition) -> str | None:
        session = self.session
        precision = session.config.saving.save_precision
        needed = save_bytes(session.method, trained, optimizer_state, precision)
        if self.ema is not None and session.config.ema.save == "beside":  # the EMA's file is as large as the model's
            needed += save_bytes(session.method, trained, None, precision)
        ensure_free_space(session.output_dir, needed)
        self._write_models(stem, kind=kind, epoch=epoch, step=step)
        if optimizer_state is None:
            return None
        state_folder = str(self._save_state(stem, epoch, step, position))
        self.files.append(state_folder)
        session.log.event("checkpoint", kind="state", path=state_folder, step=step, epoch=epoch)
        return state_folder

    def _write_models(self, stem: str, *, kind: str, epoch: int, step: int) -> None:
        from engine.networks.metadata import with_progress

        session = self.session
        metadata = with_progress(self._base_metadata(), steps=step, epoch=epoch, finished_at=time.time())
        self.set_train_mode(False)
        try:
            with disk_full_named(session.output_dir):
                saved = save_models(session.method, self.ema, session.config.ema.save, session.output_dir, stem,
                                    metadata)
        finally:
            self.set_train_mode(True)
        for path, fields in saved:  # the trained weights' file, and the EMA's beside it (ema.save = "beside")
            self.files.append(str(path))
            # Files a save writes beside the model (SD3's trained text encoders) are this run's too, for retention.
            self.files.extend(str(companion) for companion in self._companions(path) if companion.exists())
            session.log.event("checkpoint", **{"kind": kind, "path": str(path), "step": step, "epoch": epoch,
                                               **fields})

    def _base_metadata(self) -> dict[str, str]:
        if self._metadata is None:
            from engine.networks.metadata import build_metadata, modelspec_metadata

            session = self.session
            kind = getattr(session.method, "metadata_kind", "lora")
            self._metadata = {**build_metadata(session.config, session.facts),
                              **modelspec_metadata(session.config, session.facts, kind=kind)}
        return self._metadata

    def _share_failure(self, failure: Exception | None) -> None:
        """Raise the main process's save error there, and SaveFailedElsewhere on the others (which would
        otherwise wait at the next barrier forever)."""
        accelerator = self.session.accelerator
        failed = failure is not None
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(failed)], device=accelerator.device)
            failed = bool(accelerator.reduce(flag, reduction="sum").item())
        if failure is not None:
            raise failure
        if failed:
            raise SaveFailedElsewhere("the main process could not save; its events say why")

    def _save_state(self, stem: str, epoch: int, step: int, position: TrainPosition) -> Path:
        # Read again now that train mode is back: a schedule-free optimizer's eval/train round trip may round the
        # weights, and a resume must start from exactly the values training goes on with.
        session = self.session
        scaler = session.precision.scaler
        folder = session.output_dir / naming.state_dir_name(stem)
        state = SavedState(
            trained=session.method.trained_state(), optimizer=session.optimizer.state_dict(),
            scheduler=session.lr_scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
            position=position, ema=self.ema.snapshot() if self.ema is not None else None,
            info={"method": session.config.method, "output_name": session.output_name, "epoch_saved": epoch,
                  "step_saved": step, "session_id": getattr(session.facts, "session_id", None),
                  "validation": self.validation.state_dict(), "files": [*self.files, str(folder)]},
        )
        return save_state(folder, state)

    # --- leftovers and retention -----------------------------------------------------------------------------

    def clean_leftovers(self) -> None:
        """Remove what killed runs left half-written under this run's names (and restore a state folder a crash
        left only under its retired name), before this run writes anything."""
        session = self.session
        save_as = session.config.saving.save_model_as
        names = {session.output_name, session.config.saving.output_name}
        cleaned = clean_stale_temporaries(session.output_dir,
                                          lambda name: any(naming.owns_name(own, save_as, name) for own in names))
        if cleaned:
            session.log.line(f"cleaned {len(cleaned)} leftover(s) of interrupted saves in {session.output_dir}")

    def retire_steps(self, step: int) -> None:
        saving = self.session.config.saving
        self._retire(naming.step_files_to_remove(self.session.output_name, step, every_n=saving.save_every_n_steps,
                                                 keep_last_n_steps=saving.save_last_n_steps))

    def retire_epochs(self, epoch: int) -> None:
        saving = self.session.config.saving
        self._retire(naming.epoch_files_to_remove(self.session.output_name, epoch, every_n=saving.save_every_n_epochs,
                                                  keep_last_n=saving.save_last_n_epochs))

    def _retire(self, due: list[str]) -> None:
        for stem in self.validation.retire(due):  # keep_best spares the best checkpoint
            self.remove(stem)

    def remove(self, stem: str) -> None:
        """Remove one of this run's own older checkpoints and its state, as the retention settings ask.

        Only paths this run wrote (including before a resume: the list travels in the state) are ever removed.
        """
        session = self.session
        if not session.is_main:
            return
        model_file = self.file_path(stem)
        ema_file = self.file_path(naming.ema_stem(stem))
        for path in (model_file, *self._companions(model_file), ema_file, *self._companions(ema_file),
                     session.output_dir / naming.state_dir_name(stem)):
            if str(path) not in self.files:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
            self.files.remove(str(path))

    def _companions(self, saved: Path) -> list[Path]:
        companions = getattr(self.session.method, "companion_files", None)
        return list(companions(saved)) if companions is not None else []
