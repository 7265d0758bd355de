"""Everything a run needs before its first step: data, models, caches, the method, optimizer and schedule.

Input the user must fix (a broken dataset, a missing model, an impossible option) raises `RunInputError` here,
before any GPU time is spent on training; the run turns it into an `error` event with a hint.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from engine.config.schema import RunConfig
from engine.config.sections_output import LaunchSection
from engine.data.records import ScanResult
from engine.train.precision import PRECISION_DTYPES, Precision, make_precision
from engine.train.reporting import RunLog, is_main_launch_process, run_log_folder


class RunInputError(ValueError):
    """Something in the config or the files it names that the user must fix; `hint` says how."""

    def __init__(self, message: str, hint: str = "", where: str = ""):
        super().__init__(message)
        self.hint = hint
        self.where = where


@dataclass
class Schedule:
    """How long the run is, in the units the loop counts."""

    batches_per_epoch: int  # micro-batches per epoch on this process
    steps_per_epoch: int  # optimizer steps per epoch
    num_epochs: int
    total_steps: int
    accumulation: int


@dataclass
class Session:
    """The assembled parts of a run (see :func:`build_session`)."""

    config: RunConfig
    base_dir: Path
    run_dir: Path
    output_dir: Path
    output_name: str
    accelerator: Any
    log: RunLog
    scan: ScanResult
    model: Any  # engine.models.loaded_model.LoadedModel
    method: Any  # engine.train.methods.Method
    dataset: Any  # engine.train.dataset.TrainingDataset
    sampler: Any  # engine.data.sampler.BucketBatchSampler
    schedule: Schedule
    optimizer: Any
    built_optimizer: Any
    lr_scheduler: Any
    facts: Any  # engine.networks.metadata.TrainingFacts
    text_cached: bool
    latents_cached: bool
    block_swapper: Any = None  # engine.models.block_swap.BlockSwapper while training.blocks_to_swap is on
    started_at: float = field(default_factory=time.time)

    # Read once: accelerate answers both by building its process state again (and parsing environment flags) on
    # every access, some 25 µs each, and the step asks for the device many times.
    @cached_property
    def device(self) -> torch.device:
        return self.accelerator.device

    @cached_property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @cached_property
    def precision(self) -> Precision:
        """The forward passes' autocast and the fp16 loss scaler (engine.train.precision), made once per run."""
        training = self.config.training
        return make_precision(training.mixed_precision, self.device, full_fp16=training.full_fp16)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype frozen weights are kept in and the denoiser's inputs are cast to: the precision's."""
        return self.precision.dtype


def apply_cpu_threads(launch: LaunchSection) -> int:
    """Use launch.num_cpu_threads_per_process CPU threads in this process, also when it was started without
    accelerate (one process), and give the same to the processes it starts (OMP_NUM_THREADS, as accelerate launch
    sets it). Unset leaves the environment's choice alone (torch reads OMP_NUM_THREADS at start). Returns the number
    now used by torch."""
    threads = launch.num_cpu_threads_per_process
    if threads is None:
        return torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def make_accelerator(config: RunConfig, base_dir: Path) -> Any:
    """An Accelerator for this machine: CPU runs use `cpu=True` so several CPU processes form a real group."""
    from accelerate import Accelerator

    from engine.config.io import resolve_path

    on_cpu = not torch.cuda.is_available()
    logging_dir = ""
    if config.logging.logging_dir:  # each run its own folder below logging_dir (sd-scripts' <prefix><date-time>)
        logging_dir = str(run_log_folder(resolve_path(config.logging.logging_dir, base_dir), config.logging.log_prefix,
                                         reserve=is_main_launch_process()))
    trackers = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
    # Mixed precision is engine.train.precision's (accelerate offers it on a GPU only): accelerate's own stays off, so
    # its autocast and scaler cannot act twice, whatever `accelerate launch --mixed_precision` put in the environment.
    return Accelerator(cpu=on_cpu, mixed_precision="no",
                       log_with=trackers[config.logging.log_with] if logging_dir else None,
                       project_dir=logging_dir or None)


def precision_warning(config: RunConfig, accelerator: Any, log: RunLog) -> None:
    """fp16 on a CPU trains as asked (engine.train.precision), but CPUs compute float16 slower than float32."""
    if config.training.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        log.event("warning", message="training.mixed_precision = fp16 on a CPU: it trains in float16 as asked, but "
                  "more slowly than in float32", hint="set training.mixed_precision = \"no\" (or \"bf16\") for CPU "
                  "runs", where="training.mixed_precision")


def compute_schedule(config: RunConfig, batches_per_epoch: int) -> Schedule:
    accumulation = config.training.gradient_accumulation_steps
    if batches_per_epoch <= 0:
        raise RunInputError("the dataset gives no batches", "add images or check the folders' repeats")
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    if config.training.max_train_steps > 0:
        total = config.training.max_train_steps
        epochs = math.ceil(total / steps_per_epoch)
    else:
        epochs = config.training.max_train_epochs
        total = epochs * steps_per_epoch
    return Schedule(batches_per_epoch, steps_per_epoch, epochs, total, accumulation)


def weight_dtype(config: RunConfig) -> torch.dtype:
    """The dtype frozen weights are kept in: the mixed-precision type (as sd-scripts does for LoRA)."""
    return PRECISION_DTYPES[config.training.mixed_precision]


def configure_attention(unet: Any, config: RunConfig) -> None:
    """SDPA is diffusers' default; xformers on request (refused without CUDA or the package); "none" = plain."""
    choice = config.training.attention
    if choice != "sdpa" and not hasattr(unet, "set_attn_processor"):  # our FLUX transformer calls SDPA itself
        raise RunInputError(f"training.attention = {choice!r} is not available for this model family; it always uses "
                            "PyTorch's scaled-dot-product attention", "set training.attention = \"sdpa\"",
                            "training.attention")
    if choice == "xformers":
        from engine.config.choices import XFORMERS

        if not torch.cuda.is_available():
            raise RunInputError("training.attention = \"xformers\" needs a CUDA GPU",
                                "use attention = \"sdpa\" (the default), which is as fast on recent PyTorch",
                                "training.attention")
        if not XFORMERS.is_installed():
            raise RunInputError("training.attention = \"xformers\" but the xformers package is not installed",
                                XFORMERS.install_hint() + ", or use attention = \"sdpa\"", "training.attention")
        unet.enable_xformers_memory_efficient_attention()
    elif choice == "none":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
