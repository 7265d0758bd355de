"""`run_training`: one run from a config file to its `done` event, whatever happens in between.

The run directory (``--run-dir``, else ``saving.output_dir``) receives config.toml (the full config with absolute
paths, so it can be run again from anywhere), events.jsonl, train.log and, on a crash, error-traceback.txt.
Exit codes: 0 finished or stopped on request, 2 input the user must fix (a full disk too), 1 a failure
during training.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config.absolute import absolute_config
from engine.config.io import config_to_toml, resolve_path
from engine.config.schema import RunConfig
from engine.files import atomic_write_text
from engine.rundir.layout import TRACEBACK_FILE, config_path
from engine.train.reporting import RunLog, tracker_name

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def run_training(config: RunConfig, base_dir: Path, *, run_dir: Path | None = None) -> int:
    from engine.rundir.control import StoppedBeforeTraining, take_started_channel

    started = time.time()
    run_dir = (run_dir or resolve_path(config.saving.output_dir, base_dir)).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file of that name, no permission, a read-only disk: input to fix, not a crash
        print(f"error: {run_dir}: cannot be used as the run folder ({_os_reason(error)}); choose another "
              "--run-dir or saving.output_dir", file=sys.stderr)
        return EXIT_BAD_INPUT
    # The channel watching since the process started (python -m engine train), so a stop asked during the
    # imports and the model loading is not lost; SIGTERM/SIGINT request a graceful stop like the "stop" command.
    control = take_started_channel(run_dir)
    control.install_signal_handlers()
    accelerator, log = None, None
    try:
        phase_check(control, None)("while reading the config")
        from engine.train.setup import (  # torch and accelerate: seconds
            apply_cpu_threads,
            make_accelerator,
            precision_warning,
        )

        apply_cpu_threads(config.launch)
        accelerator = make_accelerator(config, base_dir)
        log = RunLog(run_dir, active=accelerator.is_main_process)
        phase_check(control, accelerator)("while starting up")
        precision_warning(config, accelerator, log)
        if accelerator.is_main_process:
            write_run_config(config, base_dir, run_dir)
        from engine.train.memory_check import memory_plan_check

        plan = memory_plan_check(config, base_dir, log, device_type=accelerator.device.type) \
            if accelerator.is_main_process else None
        return _run(config, base_dir, run_dir, log, accelerator, control, plan)
    except StoppedBeforeTraining as stop:
        log = log or RunLog(run_dir, active=_processes_from_env() == 1)
        log.event("done", **stopped_early_fields(stop, config, base_dir, started))
        return EXIT_OK
    except OSError as error:  # the run folder's own files could not be written (a full disk, no permission)
        message = f"{run_dir}: the run's files cannot be written there ({_os_reason(error)})"
        hint = "free some space on that disk or choose another --run-dir or saving.output_dir"
        if log is None:
            print(f"error: {message}; {hint}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return report_failure(log, EXIT_BAD_INPUT, "could not start", message=message, hint=hint,
                              where=str(run_dir))
    finally:
        control.restore_signal_handlers()
        if accelerator is not None:
            accelerator.end_training()
        if log is not None:
            try:
                log.close()
            except OSError as error:  # the last lines could not be flushed (a full disk): say so, not a traceback
                print(f"error: the run's log could not be closed: {error}", file=sys.stderr)


def phase_check(control: Any, accelerator: Any) -> Callable[[str], None]:
    """A check for a stop at a phase boundary before training: raises StoppedBeforeTraining when one was asked.

    Several processes agree first (a stop seen by any stops all at the same boundary): one leaving alone would
    leave the others waiting for it forever. Before the accelerator exists they cannot agree, so there only a
    single process checks.
    """
    from engine.rundir.control import StoppedBeforeTraining

    def check(phase: str) -> None:
        asked = control.check_stop()
        processes = accelerator.num_processes if accelerator is not None else _processes_from_env()
        if processes > 1:
            if accelerator is None:
                return
            import torch

            flag = torch.tensor([float(asked)], device=accelerator.device)
            asked = bool(accelerator.reduce(flag, reduction="sum").item())
        if asked:
            raise StoppedBeforeTraining(phase, control.stop_reason or "asked on another process")

    return check


def stopped_early_fields(stop: Any, config: RunConfig, base_dir: Path, started: float) -> dict[str, Any]:
    """The `done` event of a run stopped before its first step: nothing was trained, so nothing is saved; a
    resumed run can still be resumed from the state it was given."""
    state = str(resolve_path(config.saving.resume, base_dir)) if config.saving.resume else None
    then = f"; resume from {state}" if state else ""
    return {"task": "train", "ok": True, "stopped": True, "phase": stop.phase, "reason": stop.reason,
            "summary": f"stopped {stop.phase}, before the first training step: nothing was trained, so nothing "
                       f"was saved{then}",
            "global_step": None if state else 0, "files": [], "state": state, "elapsed_s": time.time() - started}


def _processes_from_env() -> int:
    """How many processes train together, as torchrun / accelerate launch tell them (before accelerate loads)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _os_reason(error: OSError) -> str:
    if isinstance(error, FileExistsError | NotADirectoryError):
        return "a file of that name is in the way"
    return error.strerror or str(error)


def write_run_config(config: RunConfig, base_dir: Path, run_dir: Path) -> None:
    text = config_to_toml(absolute_config(config, base_dir))
    target = config_path(run_dir)
    if target.exists() and target.read_text(encoding="utf-8") == text:
        return
    if target.exists():
        # The run folder already has a different config (a user's file or an older run): keep it, write beside it.
        target = run_dir / f"config-{time.strftime('%Y%m%d-%H%M%S')}.toml"
    atomic_write_text(target, text)


def _run(config: RunConfig, base_dir: Path, run_dir: Path, log: RunLog, accelerator: Any, control: Any,
         plan: dict[str, Any] | None) -> int:
    from engine.train.build import build_session
    from engine.train.setup import RunInputError
    from engine.train.state import StateError
    from engine.train.trainer import Trainer

    started, training = time.time(), False
    try:
        check = phase_check(control, accelerator)
        session = build_session(config, base_dir, run_dir, log, accelerator=accelerator, checkpoint=check)
        trainer = Trainer(session, control)
        resumed = ""
        if config.saving.resume:
            resumed = str(resolve_path(config.saving.resume, base_dir))
            trainer.resume(Path(resumed))
        check("before the first training step")  # StoppedBeforeTraining passes every `except Exception`
        log.event("start", task="train", **start_fields(session, resumed), memory_plan=plan)
        training = True  # a failure from here on is not "could not start"
        if config.logging.logging_dir and accelerator.is_main_process:
            accelerator.init_trackers(tracker_name(config.method, config.logging.log_tracker_name))
        outcome = trainer.run()
    except (RunInputError, StateError) as error:
        return report_failure(log, EXIT_BAD_INPUT, "failed" if training else "could not start",
                              message=str(error), hint=getattr(error, "hint", ""), where=getattr(error, "where", ""))
    except Exception as error:  # noqa: BLE001 - every failure must end the event stream with an explanation
        return report_unexpected(error, log, run_dir)
    elapsed = time.time() - started
    ok = outcome.status != "failed"
    summary = {"finished": f"finished {outcome.global_step} steps in {elapsed:.0f} s",
               "stopped": f"stopped at step {outcome.global_step}; resume from {outcome.state}",
               "failed": f"failed after step {outcome.global_step}"}[outcome.status]
    log.event("done", task="train", ok=ok, stopped=outcome.status == "stopped", summary=summary,
              global_step=outcome.global_step, files=outcome.files, state=outcome.state, elapsed_s=elapsed)
    return EXIT_OK if ok else EXIT_FAILED


def report_unexpected(error: Exception, log: RunLog, run_dir: Path) -> int:
    """The error and done events of a failure nobody planned for, or of a full disk (input to fix: exit 2)."""
    from engine.files import as_disk_full
    from engine.train.checkpoints import SaveFailedElsewhere

    if isinstance(error, SaveFailedElsewhere):
        return EXIT_FAILED  # another process's failure, which that process reports
    full = as_disk_full(error, run_dir)
    if full is not None:
        return report_failure(log, EXIT_BAD_INPUT, "stopped: the disk is full", message=str(full), hint=full.hint,
                              where=str(full.folder))
    trace_file = run_dir / TRACEBACK_FILE
    try:
        trace_file.write_text(traceback.format_exc(), encoding="utf-8")
    except OSError:
        trace_file = None
    return report_failure(log, EXIT_FAILED, "failed", message=f"{type(error).__name__}: {error}",
                          traceback_file=str(trace_file) if trace_file else "",
                          hint="see the traceback file; if the message does not say what to change, please report it")


def report_failure(log: RunLog, code: int, summary: str, **error: Any) -> int:
    """Write the `error` and `done` events; when the event log cannot be written (a full disk, often), the
    message still reaches the console, on stderr, instead of a traceback."""
    for type_, fields in (("error", error), ("done", {"task": "train", "ok": False, "stopped": False,
                                                       "summary": summary})):
        try:
            log.event(type_, **fields)
        except Exception as failure:  # noqa: BLE001 - the console is the last place left to say it
            print(f"{type_}: {fields.get('message') or fields.get('summary')}"
                  f" (the run's events could not be written: {failure})", file=sys.stderr)
            if fields.get("hint"):
                print(f"  what to do: {fields['hint']}", file=sys.stderr)
    return code


def start_fields(session: Any, resumed: str) -> dict[str, Any]:
    import torch

    config, schedule, facts = session.config, session.schedule, session.facts
    return {
        "method": config.method, "family": session.model.family, "total_steps": schedule.total_steps,
        "num_epochs": schedule.num_epochs, "steps_per_epoch": schedule.steps_per_epoch,
        "batches_per_epoch": schedule.batches_per_epoch, "num_train_images": facts.num_train_images,
        "num_reg_images": facts.num_reg_images, "num_validation_images": facts.num_validation_images,
        "resumed_from": resumed, "resume_step": 0,
        "run_dir": str(session.run_dir), "output_dir": str(session.output_dir),
        "output_name": session.output_name, "trainable": session.method.describe(),
        "config": {
            "network_type": config.network.network_type, "network_dim": config.network.network_dim,
            "network_alpha": config.network.network_alpha, "optimizer": config.optimizer.optimizer_type,
            "learning_rate": config.optimizer.learning_rate, "lr_scheduler": config.optimizer.lr_scheduler,
            "mixed_precision": session.precision.mode,
            "gradient_accumulation_steps": schedule.accumulation, "processes": session.accelerator.num_processes,
            "device": str(session.device), "cpu_threads": torch.get_num_threads(),
            "log_dir": str(session.accelerator.logging_dir or "") if config.logging.logging_dir else "",
        },
    }
