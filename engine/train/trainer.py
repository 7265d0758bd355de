"""The trainer: runs a `Session` from its first (or resumed) step to the end, a stop request, or a failure.

Between updates it asks small predicates what is due (save, sample, stop) and does it on the main process only;
every other process waits at a barrier so all of them stay in step.

Saving and retiring checkpoints is engine.train.checkpoints'; the validation pass's bookkeeping is
engine.train.validation_hooks'.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.rundir import naming
from engine.train.checkpoints import Checkpoints
from engine.train.ema import make_ema, resume_ema
from engine.train.loop import NonFiniteLoss, StepRunner, checked_loss, epoch_loader, micro_seed, position_after
from engine.train.reporting import ProgressMeter, memory_figures, progress_line
from engine.train.save_checks import NonFiniteWeights
from engine.train.setup import Session
from engine.train.state import TrainPosition, load_state
from engine.train.validation import ValidationResult
from engine.train.validation_hooks import ValidationTracker

_NON_FINITE_HINT = ("lower the learning rate (optimizer.learning_rate), or train in float32 or bf16 "
                    "(training.mixed_precision) instead of fp16")


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
        self.ema = make_ema(session)  # the EMA of the trained weights (engine.train.ema); None unless ema.enabled
        self.checkpoints = Checkpoints(session, self.ema, self.validation, self._set_train_mode)
        if session.is_main:
            self.checkpoints.clean_leftovers()

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
        self.checkpoints.files = [str(path) for path in state.info.get("files", [])]
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
            self.checkpoints.retire_epochs(epoch)
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
        return Outcome("finished", step, list(self.checkpoints.files), state)

    def _stop(self, epoch: int, step: int) -> Outcome:
        state = self._save(naming.step_stem(self.session.output_name, step), kind="stop", epoch=epoch, step=step,
                           with_state=True)
        return Outcome("stopped", step, list(self.checkpoints.files), state)

    def _non_finite(self, error: NonFiniteLoss | NonFiniteWeights) -> Outcome:
        last = self.checkpoints.last_model()
        kept = (f"the last checkpoint, {last}, was checked before it was saved and holds only finite values"
                if last else "no checkpoint was saved before this")
        images = getattr(error, "images", [])
        again = ("; if it happens again on the same images, check them and rebuild their caches (python -m engine "
                 "cache-latents CONFIG --force)") if images else ""
        self.session.log.event("error", message=f"{error}; training stopped and the current weights were not saved",
                               hint=f"{_NON_FINITE_HINT}{again}; {kept}", step=error.step, last_checkpoint=last,
                               images=images)
        return Outcome("failed", error.step - 1, list(self.checkpoints.files))

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

    # --- saving ---------------------------------------------------------------------------------------------

    def _save(self, stem: str, *, kind: str, epoch: int, step: int, with_state: bool) -> str | None:
        return self.checkpoints.save(stem, kind=kind, epoch=epoch, step=step, position=self.position,
                                     with_state=with_state)

    def _retire_steps(self, step: int) -> None:
        self.checkpoints.retire_steps(step)

    # --- validation -------------------------------------------------------------------------------------------

    def _validate(self, *, due: bool, epoch: int, step: int, stem: str | None) -> None:
        """The validation pass when it is due, or at a save with saving.keep_best; before the save, so the state
        written with it knows the checkpoint's loss. `stem` names the file saved at this step, if any."""
        tracker = self.validation
        if not (due or (stem is not None and tracker.due_at_save())):
            return
        checkpoint = (stem, str(self.checkpoints.file_path(stem))) if stem else None
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
