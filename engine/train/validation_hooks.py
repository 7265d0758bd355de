"""When the trainer computes the validation loss, what it reports, and which checkpoint is the best.

The trainer asks :class:`ValidationTracker` whether a pass is due (every N steps, every N epochs, and at every save
when ``saving.keep_best`` is on) and hands it a function that evaluates the current trained weights. The tracker
writes the `validation` event, the TensorBoard scalars, and ``<output_name>-validation.json`` beside the
checkpoints (format in docs/events.md), and remembers the best checkpoint so retention can spare it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.files import atomic_write_text
from engine.rundir import naming
from engine.train.validation import ValidationResult, Validator, result_fields

if TYPE_CHECKING:
    from engine.train.loop import StepRunner
    from engine.train.setup import Session

RECORD_VERSION = 1


class ValidationTracker:
    """The validation schedule and record of one run (main and other processes alike; only the main one writes)."""

    def __init__(self, session: Session, runner: StepRunner):
        self.session = session
        self.settings = session.config.validation
        self.keep_best = session.config.saving.keep_best
        self.validator = Validator(session, runner, max_batches=self.settings.max_validation_steps)
        self.checkpoints: list[dict[str, Any]] = []  # one entry per checkpoint whose loss was computed at its save
        self.best: dict[str, Any] | None = None  # the entry with the lowest loss, and its stem
        self.spared: list[str] = []  # stems retention retired but kept because they were the best
        self._last: tuple[int, ValidationResult] | None = None  # the newest pass and its step

    @property
    def active(self) -> bool:
        """Whether there are held-out images to validate on."""
        return not self.validator.empty

    def due_after_step(self, step: int) -> bool:
        every = self.settings.validate_every_n_steps
        return self.active and every > 0 and step % every == 0

    def due_after_epoch(self, epoch: int) -> bool:
        every = self.settings.validate_every_n_epochs
        return self.active and every > 0 and epoch % every == 0

    def due_at_save(self) -> bool:
        return self.active and self.keep_best

    def due_at_end(self) -> bool:
        """The final model's loss, unless validation is off by both schedules (keep_best asks at the save)."""
        return self.active and bool(self.settings.validate_every_n_epochs or self.settings.validate_every_n_steps)

    # --- a pass ----------------------------------------------------------------------------------------------

    def run(self, evaluate: Callable[[], ValidationResult], *, step: int, epoch: int,
            checkpoint: tuple[str, str] | None = None) -> ValidationResult:
        """Evaluate (or reuse this step's result: the weights have not changed since) and report it.

        Args:
            evaluate: computes the loss of the current trained weights (the trainer's, in eval mode).
            checkpoint: (stem, path) of the file saved at this step, whose loss this is.
        """
        if self._last is not None and self._last[0] == step:
            result = self._last[1]
            if checkpoint is None:  # reported already; only a checkpoint's record needs it again
                return result
        else:
            result = evaluate()
            self._last = (step, result)
        session = self.session
        fields = {"step": step, "epoch": epoch, **result_fields(result)}
        if checkpoint is not None:
            fields["checkpoint"] = checkpoint[1]
            self._record(checkpoint, step, epoch, result)
        if session.is_main:
            fields["best"] = self.best["path"] if self.best else None
            session.log.event("validation", **fields)
            self._log_scalars(result, step)
        return result

    def _record(self, checkpoint: tuple[str, str], step: int, epoch: int, result: ValidationResult) -> None:
        stem, path = checkpoint
        entry = {"path": path, "stem": stem, "step": step, "epoch": epoch, "loss": result.loss,
                 "by_timestep": {str(t): value for t, value in result.by_timestep.items()}, "removed": False}
        self.checkpoints = [*(item for item in self.checkpoints if item["path"] != path), entry]
        self._choose_best()

    def _choose_best(self) -> None:
        """The checkpoint still on disk with the lowest finite loss (the earlier one on a tie)."""
        candidates = [entry for entry in self.checkpoints if not entry["removed"] and math.isfinite(entry["loss"])]
        self.best = min(candidates, key=lambda entry: entry["loss"]) if candidates else None
        if self.session.is_main:
            self._write_record()

    def _log_scalars(self, result: ValidationResult, step: int) -> None:
        if not self.session.config.logging.logging_dir:
            return
        values = {"loss/validation": result.loss}
        values.update({f"loss/validation_t{t}": value for t, value in result.by_timestep.items()})
        self.session.accelerator.log(values, step=step)

    # --- keep_best -------------------------------------------------------------------------------------------

    def retire(self, due: list[str]) -> list[str]:
        """Of the stems retention retires now, plus those spared earlier, the ones to remove now (with keep_best,
        the best checkpoint is spared until a better one comes)."""
        best = self.best["stem"] if self.keep_best and self.best else None
        remove, self.spared = naming.retire_sparing_best(due, self.spared, best)
        if remove:
            gone = set(remove)
            for entry in self.checkpoints:
                entry["removed"] = entry["removed"] or entry["stem"] in gone
            self._choose_best()
        return remove

    # --- the record beside the checkpoints -------------------------------------------------------------------

    def record_path(self) -> Path:
        return self.session.output_dir / naming.validation_record_name(self.session.output_name)

    def _write_record(self) -> None:
        record = {"version": RECORD_VERSION, "output_name": self.session.output_name,
                  "timesteps": self.validator.timesteps, "best": self.best, "checkpoints": self.checkpoints}
        atomic_write_text(self.record_path(), json.dumps(record, indent=1) + "\n")

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on choosing the best: kept in the training state's info."""
        return {"checkpoints": self.checkpoints, "best": self.best, "spared": self.spared}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.checkpoints = list(state.get("checkpoints") or [])
        self.best = state.get("best")
        self.spared = list(state.get("spared") or [])
