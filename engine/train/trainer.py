"""The trainer: runs a `Session` from its first (or resumed) step to the end, a stop request, or a failure.

Between updates it asks small predicates what is due (save, sample, stop) and does it on the main process only;
every other process waits at a barrier so all of them stay in step.

Every save first checks what it is about to write (engine.train.save_checks): values that are not finite stop the
run instead of being saved, and the disk must have room for the whole save.
"""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.files import clean_stale_temporaries, disk_full_named, ensure_free_space
from engine.rundir import naming
from engine.train.ema import make_ema, resume_ema, save_models
from engine.train.loop import NonFiniteLoss, StepRunner, checked_loss, epoch_loader, micro_seed, position_after
from engine.train.reporting import ProgressMeter, memory_figures, progress_line
from engine.train.save_checks import NonFiniteWeights, refuse_non_finite, save_bytes
from engine.train.setup import Session
from engine.train.state import SavedState, TrainPosition, load_state, save_state
from engine.train.validation import ValidationResult
from engine.train.validation_hooks import ValidationTracker

_NON_FINITE_HINT = ("lower the learning rate (optimizer.learning_rate), or train in float32 or bf16 "
                    "(training.mixed_precision) instead of fp16")


class SaveFailedElsewhere(RuntimeError):
    """Raised on the other processes when the main process could not save, so that every process stops."""


@dataclass
class Outcome:
    """How a run ended: finished, stopped on request, or failed (with the step)."""

    status: str  # "finished" | "stopped" | "failed"
    global_step: int
    files: list[str] = field(default_factory=list)
    state: str | None = None


class Trainer:
    def __init__(self, session: Session, control: Any):
        self.session = session
        self.control = control  # engine.rundir.control.ControlChannel
        self.runner = StepRunner(session)
        self.validation = ValidationTracker(session, self.runner)
        self.position = TrainPosition()
        self.meter = ProgressMeter(session.schedule.total_steps)
        self.files: list[str] = []
        self._metadata: dict[str, str] | None = None  # built at the first save; only progress changes after
        self.ema = make_ema(session)  # the EMA of the trained weights (engine.train.ema); None unless ema.enabled
        if session.is_main:
            self._clean_leftovers()

    # --- public ----------------------------------------------------------------------------------------------

    def resume(self, folder: Path) -> None:
        state = load_state(folder)
        session = self.session
        session.method.load_trained_state(state.trained)
        session.optimizer.load_state_dict(state.optimizer)
        session.lr_scheduler.load_state_dict(state.scheduler)
        scaler = session.precision.scaler
        if scaler is not None and state.scaler is not None:
            scaler.load_state_dict(state.scaler)
        resume_ema(self.ema, state.ema, session.log)
        self.position = state.position
        self.files = [str(path) for path in state.info.get("files", [])]
        self.validation.load_state_dict(state.info.get("validation"))
        self.meter.start_step = state.position.global_step

    def run(self) -> Outcome:
        session = self.session
        schedule = session.schedule
        self._set_train_mode(True)
        if session.config.sampling.sample_at_first and self.position.global_step == 0:
            self._sample(epoch=0, step=0, stem_kind="step")
        before_training = getattr(session.method, "before_training", None)  # e.g. DreamBooth's text-encoder stop
        if before_training is not None:
            before_training(self.position.global_step, schedule.total_steps)
        if session.device.type == "cuda":  # progress reports training's peak; loading and caching peak on their own
            torch.cuda.reset_peak_memory_stats(session.device)
        try:
            return self._train()
        except NonFiniteWeights as error:
            return self._non_finite(error)

    def _train(self) -> Outcome:
        schedule = self.session.schedule
        step = self.position.global_step
        for epoch in range(self.position.epoch, schedule.num_epochs + 1):
            start = self.position.batches_done if epoch == self.position.epoch else 0
            outcome = self._run_epoch(epoch, start)
            if outcome is not None:
                return outcome
            step = self.position.global_step
            if step >= schedule.total_steps:
                break
            self._after_epoch(epoch)
        return self._finish(step)

    # --- epochs and steps ------------------------------------------------------------------------------------

    def _run_epoch(self, epoch: int, start: int) -> Outcome | None:
        session = self.session
        schedule = session.schedule
        accumulation = schedule.accumulation
        step = self.position.global_step
        losses: list[torch.Tensor] = []  # this update's micro-batch losses, still on the device
        images: list[list[str] | None] = []
        micro = start
        for batch in epoch_loader(session, epoch, start):
            seed = micro_seed(session.config.training.seed, epoch, micro, session.accelerator.process_index)
            try:
                losses.append(self.runner.micro_batch(batch, seed, accumulation, step + 1))
                images.append(batch.get("image"))
                micro += 1
                if len(losses) < accumulation and micro < schedule.batches_per_epoch:
                    continue
                # The update's one read from the device, after its backward passes and before the optimizer step.
                loss = checked_loss(losses, images, step + 1)
            except NonFiniteLoss as error:
                return self._non_finite(error)
            lrs = self.runner.update()
            step += 1
            if self.ema is not None:
                self.ema.after_step(step)
            self.position = position_after(epoch, micro, step, schedule.batches_per_epoch)
            self._report(step, epoch, loss, lrs)
            losses, images = [], []
            outcome = self._between_steps(epoch, step)
            if outcome is not None:
                return outcome
            if step >= schedule.total_steps:
                break
        return None

    def _between_steps(self, epoch: int, step: int) -> Outcome | None:
        session = self.session
        commands = self._commands()
        if "stop" in commands:
            return self._stop(epoch, step)
        saving, sampling = session.config.saving, session.config.sampling
        saving_now = "save" in commands or naming.step_save_due(step, saving.save_every_n_steps)
        stem = naming.step_stem(session.output_name, step) if saving_now else None
        self._validate(due=self.validation.due_after_step(step), epoch=epoch, step=step, stem=stem)
        if stem is not None:
            self._save(stem, kind="step", epoch=epoch, step=step, with_state=saving.save_state)
            self._retire_steps(step)
        if "sample" in commands or naming.sample_due_after_step(step, sampling):
            self._sample(epoch=epoch, step=step, stem_kind="step")
        return None

    def _after_epoch(self, epoch: int) -> None:
        session = self.session
        saving = session.config.saving
        saving_now = naming.epoch_save_due(epoch, session.schedule.num_epochs, saving.save_every_n_epochs)
        stem = naming.epoch_stem(session.output_name, epoch) if saving_now else None
        self._validate(due=self.validation.due_after_epoch(epoch), epoch=epoch, step=self.position.global_step,
                       stem=stem)
        if stem is not None:
            self._save(stem, kind="epoch", epoch=epoch, step=self.position.global_step, with_state=saving.save_state)
            retired = naming.epoch_files_to_remove(session.output_name, epoch, every_n=saving.save_every_n_epochs,
                                                   keep_last_n=saving.save_last_n_epochs)
            for name in self.validation.retire(retired):
                self._remove_output(name)
        if naming.sample_due_after_epoch(epoch, session.config.sampling):
            self._sample(epoch=epoch, step=self.position.global_step, stem_kind="epoch")

    def _finish(self, step: int) -> Outcome:
        session = self.session
        saving = session.config.saving
        epoch = min(self.position.epoch, session.schedule.num_epochs)
        with_state = saving.save_state or saving.save_state_on_train_end
        stem = naming.last_stem(session.output_name)
        self._validate(due=self.validation.due_at_end(), epoch=epoch, step=step, stem=stem)
        state = self._save(stem, kind="last", epoch=epoch, step=step, with_state=with_state)
        if naming.sample_due_after_epoch(session.schedule.num_epochs, session.config.sampling):
            self._sample(epoch=session.schedule.num_epochs, step=step, stem_kind="epoch")
        return Outcome("finished", step, list(self.files), state)

    def _stop(self, epoch: int, step: int) -> Outcome:
        state = self._save(naming.step_stem(self.session.output_name, step), kind="stop", epoch=epoch, step=step,
                           with_state=True)
        return Outcome("stopped", step, list(self.files), state)

    def _non_finite(self, error: NonFiniteLoss | NonFiniteWeights) -> Outcome:
        last = self._last_checkpoint()
        kept = (f"the last checkpoint, {last}, was checked before it was saved and holds only finite values"
                if last else "no checkpoint was saved before this")
        images = getattr(error, "images", [])
        again = ("; if it happens again on the same images, check them and rebuild their caches (python -m engine "
                 "cache-latents CONFIG --force)") if images else ""
        self.session.log.event("error", message=f"{error}; training stopped and the current weights were not saved",
                               hint=f"{_NON_FINITE_HINT}{again}; {kept}", step=error.step, last_checkpoint=last,
                               images=images)
        return Outcome("failed", error.step - 1, list(self.files))

    def _last_checkpoint(self) -> str | None:
        """The newest model file (or diffusers folder) this run saved and still has; states are not models."""
        models = [path for path in self.files if not path.endswith("-state")]
        return models[-1] if models else None

    # --- control ---------------------------------------------------------------------------------------------

    def _commands(self) -> set[str]:
        commands = set(self.control.poll())
        if self.control.stop_requested:
            commands.add("stop")
        accelerator = self.session.accelerator
        if accelerator.num_processes > 1:
            # The main process decides for everyone, so all processes save, sample or stop at the same step.
            flags = torch.tensor([name in commands for name in ("stop", "save", "sample")], dtype=torch.float32,
                                 device=accelerator.device)
            flags = accelerator.reduce(flags, reduction="sum")
            commands = {name for name, flag in zip(("stop", "save", "sample"), flags.tolist(), strict=True) if flag}
        return commands

    # --- reporting -------------------------------------------------------------------------------------------

    def _report(self, step: int, epoch: int, loss: float, lrs: list[float]) -> None:
        session = self.session
        if not session.is_main:
            return
        figures = self.meter.update(step, loss)
        names = [group.get("name", f"group{index}") for index, group in enumerate(session.optimizer.param_groups)]
        session.log.event("progress", task="train", step=step, total_steps=session.schedule.total_steps,
                          epoch=epoch, num_epochs=session.schedule.num_epochs, lr=lrs, lr_names=names,
                          **figures, **memory_figures())
        if step == 1 or step % 10 == 0 or step == session.schedule.total_steps:
            session.log.line(progress_line(step, session.schedule.total_steps, epoch, figures, lrs))
        if session.config.logging.logging_dir:
            values = {"loss/current": loss, "loss/average": figures["loss_avg"]}
            values.update({f"lr/{name}": lr for name, lr in zip(names, lrs, strict=True)})
            session.accelerator.log(values, step=step)

    # --- saving ----------------------------------------------------------------------------------------------

    def _save(self, stem: str, *, kind: str, epoch: int, step: int, with_state: bool) -> str | None:
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
                                           optimizer_state=optimizer_state)
            except Exception as error:  # noqa: BLE001 - shared with the other processes below, then raised
                failure = error
        self._share_failure(failure)
        session.accelerator.wait_for_everyone()
        return state_folder

    def _write(self, stem: str, *, kind: str, epoch: int, step: int, trained: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any] | None) -> str | None:
        from engine.networks.metadata import build_metadata, modelspec_metadata, with_progress

        session = self.session
        precision = session.config.saving.save_precision
        needed = save_bytes(session.method, trained, optimizer_state, precision)
        if self.ema is not None and session.config.ema.save == "beside":  # the EMA's file is as large as the model's
            needed += save_bytes(session.method, trained, None, precision)
        ensure_free_space(session.output_dir, needed)
        if self._metadata is None:
            self._metadata = {**build_metadata(session.config, session.facts),
                              **modelspec_metadata(session.config, session.facts,
                                                   kind=getattr(session.method, "metadata_kind", "lora"))}
        metadata = with_progress(self._metadata, steps=step, epoch=epoch, finished_at=time.time())
        self._set_train_mode(False)
        try:
            with disk_full_named(session.output_dir):
                saved = save_models(session.method, self.ema, session.config.ema.save, session.output_dir, stem,
                                    metadata)
        finally:
            self._set_train_mode(True)
        for path, fields in saved:  # the trained weights' file, and the EMA's beside it (ema.save = "beside")
            self.files.append(str(path))
            # Files a save writes beside the model (SD3's trained text encoders) are this run's too, for retention.
            self.files.extend(str(companion) for companion in self._companions(path) if companion.exists())
            session.log.event("checkpoint", **{"kind": kind, "path": str(path), "step": step, "epoch": epoch,
                                               **fields})
        if optimizer_state is None:
            return None
        state_folder = str(self._save_state(stem, epoch, step))
        self.files.append(state_folder)
        session.log.event("checkpoint", kind="state", path=state_folder, step=step, epoch=epoch)
        return state_folder

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

    def _save_state(self, stem: str, epoch: int, step: int) -> Path:
        # Read again now that train mode is back: a schedule-free optimizer's eval/train round trip may round the
        # weights, and a resume must start from exactly the values training goes on with.
        session = self.session
        scaler = session.precision.scaler
        state = SavedState(
            trained=session.method.trained_state(), optimizer=session.optimizer.state_dict(),
            scheduler=session.lr_scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
            position=self.position, ema=self.ema.snapshot() if self.ema is not None else None,
            info={"method": session.config.method, "output_name": session.output_name, "epoch_saved": epoch,
                  "step_saved": step, "session_id": getattr(session.facts, "session_id", None),
                  "validation": self.validation.state_dict(),
                  "files": [*self.files, str(session.output_dir / naming.state_dir_name(stem))]},
        )
        return save_state(session.output_dir / naming.state_dir_name(stem), state)

    def _clean_leftovers(self) -> None:
        """Remove what killed runs left half-written under this run's names (and restore a state folder a crash
        left only under its retired name), before this run writes anything."""
        session = self.session
        save_as = session.config.saving.save_model_as
        names = {session.output_name, session.config.saving.output_name}
        cleaned = clean_stale_temporaries(session.output_dir,
                                          lambda name: any(naming.owns_name(own, save_as, name) for own in names))
        if cleaned:
            session.log.line(f"cleaned {len(cleaned)} leftover(s) of interrupted saves in {session.output_dir}")

    def _retire_steps(self, step: int) -> None:
        saving = self.session.config.saving
        retired = naming.step_files_to_remove(self.session.output_name, step, every_n=saving.save_every_n_steps,
                                              keep_last_n_steps=saving.save_last_n_steps)
        for name in self.validation.retire(retired):
            self._remove_output(name)

    def _remove_output(self, stem: str) -> None:
        """Remove one of this run's own older checkpoints and its state, as the retention settings ask.

        Only paths this run wrote (including before a resume: the list travels in the state) are ever removed.
        """
        session = self.session
        if not session.is_main:
            return
        save_as = session.config.saving.save_model_as
        model_file = session.output_dir / naming.file_name(stem, save_as)
        ema_file = session.output_dir / naming.file_name(naming.ema_stem(stem), save_as)
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

    # --- validation -------------------------------------------------------------------------------------------

    def _validate(self, *, due: bool, epoch: int, step: int, stem: str | None) -> None:
        """The validation pass when it is due, or at a save with saving.keep_best; before the save, so the state
        written with it knows the checkpoint's loss. `stem` names the file saved at this step, if any."""
        tracker = self.validation
        if not (due or (stem is not None and tracker.due_at_save())):
            return
        save_as = self.session.config.saving.save_model_as
        checkpoint = (stem, str(self.session.output_dir / naming.file_name(stem, save_as))) if stem else None
        tracker.run(self.evaluate_trained_weights, step=step, epoch=epoch, checkpoint=checkpoint)

    def evaluate_trained_weights(self) -> ValidationResult:
        """The validation loss of the weights being trained (the EMA's with ema.validate_with_ema), in eval mode
        (dropout off). The one place validation reads the trained weights."""
        ema = self.ema if self.session.config.ema.validate_with_ema else None
        self._set_train_mode(False)
        try:
            with ema.applied() if ema is not None else nullcontext():
                return self.validation.validator.evaluate()
        finally:
            self._set_train_mode(True)

    # --- sampling --------------------------------------------------------------------------------------------

    def _sample(self, *, epoch: int, step: int, stem_kind: str) -> None:
        session = self.session
        if session.is_main:
            from engine.train.sample_hooks import sample_now

            self._set_train_mode(False)
            ema = self.ema if session.config.ema.sample_with_ema else None
            with ema.applied() if ema is not None else nullcontext():
                images = sample_now(session, epoch=epoch, step=step, kind=stem_kind)
            self._set_train_mode(True)
            if images:
                session.log.event("sample", step=step, epoch=epoch, count=len(images),
                                  folder=str(Path(images[0]["path"]).parent), images=images)
                self._log_sample_images(images, step)
        session.accelerator.wait_for_everyone()

    def _log_sample_images(self, images: list[dict[str, Any]], step: int) -> None:
        """Sample images to TensorBoard too, when it is the tracker (W&B users have the files and the GUI)."""
        config = self.session.config
        if not config.logging.logging_dir or config.logging.log_with not in ("tensorboard", "all"):
            return
        import numpy as np
        from PIL import Image

        writer = self.session.accelerator.get_tracker("tensorboard", unwrap=True)
        for image in images:
            with Image.open(image["path"]) as opened:
                pixels = np.asarray(opened.convert("RGB"))
            writer.add_image(f"samples/{image['index']:02d}", pixels, step, dataformats="HWC")

    def _set_train_mode(self, training: bool) -> None:
        from engine.train.optimizers import set_eval_mode, set_train_mode

        (set_train_mode if training else set_eval_mode)(self.session.optimizer)
        for module in self.session.method.trainable_modules():
            module.train(training)
