"""A run's memory plan: the peak GPU memory and system RAM it will take, broken down, and whether it fits.

The parts: frozen weights by where they live and their dtype (fp8 storage, blocks swapped to the CPU, text encoders
and VAE resident or not by what is cached), the trained weights, their optimizer's state (arithmetic per optimizer),
and the step itself (activations, temporaries and gradients), traced with fake tensors by engine.plan.trace; when the
run draws samples, what they need beyond the step's memory (engine.plan.sampling).
The estimate is of `torch.cuda.max_memory_allocated` during training; the card also holds the CUDA context and
the allocator's slack, which `fits` leaves room for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine.config.schema import RunConfig
from engine.models.families import family_info
from engine.models.vae import vae_dtype
from engine.plan.architecture import Architecture, build_architecture
from engine.plan.caches import device_caches
from engine.plan.items import GIB, PlanItem, dtype_name
from engine.plan.sampling import sample_shape, sampling_plan, trace_vae
from engine.plan.trace import StepShape, TracedStep, trace_step
from engine.plan.weights import denoiser_weights, other_parts
from engine.train.precision import PRECISION_DTYPES
from engine.train.precision import trained_dtype as weights_trained_dtype

__all__ = ["GIB", "MemoryPlan", "PlanItem", "make_plan", "optimizer_state_bytes"]

# What the card holds beyond PyTorch's peak allocation: the CUDA context and kernels (~0.5 GiB) and the caching
# allocator's rounding and fragmentation (reserved runs ~5-10 % above allocated in the device runs).
CONTEXT_BYTES = int(0.6 * GIB)
ALLOCATOR_SLACK = 0.10


@dataclass
class MemoryPlan:
    family: str
    items: list[PlanItem]
    shape: StepShape
    source: str
    notes: list[str] = field(default_factory=list)
    gpu_capacity: int | None = None  # bytes of the card planned for (detected or given)

    def total(self, where: str) -> int:
        return sum(item.bytes for item in self.items if item.where == where)

    @property
    def gpu_peak(self) -> int:
        return self.total("gpu")

    @property
    def gpu_needed(self) -> int:
        """The card memory the run needs: the peak plus the context and the allocator's slack."""
        return int(self.gpu_peak * (1 + ALLOCATOR_SLACK)) + CONTEXT_BYTES

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_capacity is None else self.gpu_needed <= self.gpu_capacity

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "gpu_peak_bytes": self.gpu_peak, "gpu_needed_bytes": self.gpu_needed,
                "host_bytes": self.total("host"), "gpu_capacity_bytes": self.gpu_capacity, "fits": self.fits,
                "batch_size": self.shape.batch_size, "resolution": [self.shape.width, self.shape.height],
                "items": [vars(item) for item in self.items], "architecture_from": self.source, "notes": self.notes}


def make_plan(config: RunConfig, base_dir: Path, *, gpu_capacity: int | None = None,
              traces: dict[tuple, Any] | None = None) -> MemoryPlan:
    """The plan of `config` (paths relative to `base_dir`); `gpu_capacity` defaults to the detected GPU's memory.

    `traces` keeps traced steps by what they depend on (:func:`trace_key`) across plans of variations of one run,
    as Fit to my GPU makes: a change of caches, optimizer or fp8 storage does not trace the step again."""
    from engine.files import resolve_path

    location = config.model.pretrained_model_name_or_path
    local = resolve_path(location, base_dir)
    architecture = build_architecture(config, local if local.exists() else location)
    shape = step_shape(config, base_dir, architecture.family)
    frozen = PRECISION_DTYPES[config.training.mixed_precision]
    trained_dtype = weights_trained_dtype(config.training)
    weights = denoiser_weights(config, architecture, frozen)
    samples = sample_shape(config, base_dir, architecture.family, shape.text_tokens)
    key = trace_key(config, shape, samples)
    traced = (traces or {}).get(key)
    if traced is None:
        traced = trace_step(config, architecture.family, architecture.denoiser, shape, frozen_dtype=frozen,
                            trained_dtype=trained_dtype, sample_shape=samples,
                            text_encoders=architecture.text_modules)
        if traces is not None:
            traces[key] = traced
    others = other_parts(config, architecture, frozen)
    items = [*weights, *others]
    if config.method == "lora":
        items.append(PlanItem("trained weights (LoRA)", traced.trained_bytes, "gpu",
                              f"{traced.trained_parameters:,} parameters, {dtype_name(trained_dtype)}"))
    items.append(PlanItem("optimizer state", optimizer_state_bytes(config, traced.trained_parameters, trained_dtype),
                          "gpu", config.optimizer.optimizer_type))
    if config.ema.enabled:  # engine.train.ema: a float32 copy of the trained weights, where ema.device says
        where = "host" if config.ema.device == "cpu" else "gpu"
        items.append(PlanItem("EMA of the trained weights", traced.trained_parameters * 4, where,
                              f"{traced.trained_parameters:,} parameters, float32"))
    items.extend(_step_items(config, shape, traced))
    vae_trace = partial(_vae_bytes, architecture, traces if traces is not None else {})
    if not config.training.cache_latents and architecture.vae_config is not None:
        encode = vae_trace(shape, vae_dtype(config.model.no_half_vae, "cuda", frozen), encode=True)
        items.append(PlanItem("VAE encoding, beyond the step", max(0, encode - traced.peak_bytes), "gpu",
                              f"the batch's images encoded before each step: {encode / GIB:.2f} GiB (no latent "
                              "cache)"))
    caches = device_caches(config, base_dir, architecture, shape.text_tokens)
    if caches.total:
        items.append(PlanItem("caches kept on the GPU", caches.total, "gpu", caches.detail()))
    if samples is not None:
        items.append(_sampling_item(config, architecture, others, traced, samples, vae_trace))
    if gpu_capacity is None:
        gpu_capacity = detected_gpu_memory()
    return MemoryPlan(architecture.family, items, shape, architecture.source, architecture.notes, gpu_capacity)


def _step_items(config: RunConfig, shape: StepShape, traced: TracedStep) -> list[PlanItem]:
    """The traced step, the optimizer's update where it needs more, and the activations offloaded to the host."""
    items = [PlanItem("the step: activations, gradients and temporaries", traced.peak_bytes, "gpu",
                      f"{_step_detail(config, shape)}; gradients {traced.gradient_bytes / GIB:.2f} GiB of it")]
    update = _update_beyond_step(config, traced)
    if update:
        items.append(update)
    if traced.offloaded_bytes:
        items.append(PlanItem("checkpointed activations offloaded to the CPU", traced.offloaded_bytes, "host",
                              "training.cpu_offload_checkpointing: the checkpointed blocks' inputs wait in system RAM "
                              "until the backward pass recomputes each block on the GPU"))
    return items


def _sampling_item(config: RunConfig, architecture: Architecture, others: list[PlanItem], traced: TracedStep,
                   samples: StepShape, vae_trace: Callable[..., int]) -> PlanItem:
    """What the samples need beyond the step's memory (engine.plan.sampling): the parts waiting on the host visit
    the GPU as they are (a VAE parked for cached latents: float32, and it decodes so)."""
    visiting = sum(item.bytes for item in others if item.where == "host")
    decode = 0
    if architecture.vae_config is not None:
        frozen = PRECISION_DTYPES[config.training.mixed_precision]
        dtype = torch.float32 if config.training.cache_latents else vae_dtype(config.model.no_half_vae, "cuda", frozen)
        decode = vae_trace(StepShape(1, samples.height, samples.width, samples.text_tokens), dtype, encode=False)
    extra, detail = sampling_plan(visiting=visiting, denoiser_bytes=traced.sampling_bytes, vae_bytes=decode,
                                  step_bytes=traced.peak_bytes, shape=samples)
    return PlanItem("samples, beyond the step", extra, "gpu", detail)


def _vae_bytes(architecture: Architecture, traces: dict[tuple, Any], shape: StepShape, dtype: torch.dtype, *,
               encode: bool) -> int:
    """The VAE's traced working memory (engine.plan.sampling.trace_vae), kept with the run's traced steps."""
    key = ("vae", encode, repr(architecture.vae_config), shape, dtype)
    if key not in traces:
        traces[key] = trace_vae(architecture.vae_config or {}, shape, dtype, encode=encode)
    return traces[key]


def trace_key(config: RunConfig, shape: StepShape, samples: StepShape | None = None) -> tuple:
    """What the traced step depends on: the model, the method and network, precision, checkpointing, the batch's
    shape and the samples' (not the caches, the optimizer or fp8 storage, which the plan counts apart from the
    step)."""
    training, rates = config.training, config.optimizer
    trains_text = (training.cache_text_encoder_outputs, rates.learning_rate > 0, rates.text_encoder_lr,
                   rates.text_encoder2_lr)  # which text encoders the LoRA trains (trace.trained_text_encoders)
    return (config.model.pretrained_model_name_or_path, config.model.model_family, config.method,
            config.network.model_dump_json(), training.mixed_precision, training.full_bf16, training.full_fp16,
            training.gradient_checkpointing, training.cpu_offload_checkpointing, trains_text, shape, samples)


def detected_gpu_memory() -> int | None:
    return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None


def step_shape(config: RunConfig, base_dir: Path, family: str) -> StepShape:
    """The largest batch: the datasets' largest batch size at their largest resolution (buckets keep the area)."""
    sizes = [(dataset.params.get("batch_size") or 1, _resolution(dataset.params.get("resolution")))
             for dataset in _datasets(config, base_dir)] or [(1, (512, 512))]
    batch = max(size for size, _ in sizes)
    width, height = max((resolution for _, resolution in sizes), key=lambda wh: wh[0] * wh[1])
    info = family_info(family)
    if info.loader == "ldm":
        chunks = config.model.max_token_length // 75
        tokens = 77 if chunks == 1 else 77 * chunks  # sd-scripts concatenates each chunk's 77 states
    else:
        from engine.config.sections_model import t5xxl_token_length

        # Without a file to read the variant from: SD3's variants all read 256 T5 tokens, FLUX.1 dev and Chroma 512.
        variant = "medium" if info.base_version_is_variant else "dev"
        tokens = t5xxl_token_length(config.model.t5xxl_max_token_length, variant)
    return StepShape(batch, height, width, tokens)


def _resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    return 512, 512


def _datasets(config: RunConfig, base_dir: Path) -> list[Any]:
    from engine.config.dataset import resolve_datasets, resolve_general_only

    section = config.dataset
    if section.config_file:
        from engine.config.io import load_dataset_file
        from engine.files import resolve_path

        dataset_file = load_dataset_file(resolve_path(section.config_file, base_dir))
        return resolve_datasets(section.general, dataset_file.datasets, dataset_file.general)
    if section.datasets:
        return resolve_datasets(section.general, section.datasets)
    return [resolve_general_only(section)]


def _step_detail(config: RunConfig, shape: StepShape) -> str:
    training = config.training
    checkpointing = "gradient checkpointing" if training.gradient_checkpointing else "no checkpointing"
    if training.gradient_checkpointing and training.cpu_offload_checkpointing:
        checkpointing += " (its saved inputs offloaded to the CPU)"
    return (f"batch {shape.batch_size} at {shape.width}x{shape.height}, {config.training.mixed_precision} "
            f"autocast, {checkpointing} (traced with fake tensors)")


# Bytes of state per trained parameter, from each optimizer's algorithm: torch's keep their moments in the
# parameter's dtype (`element`), the 8-bit ones one byte per moment. Adafactor is computed from the shapes.
_STATE_PER_PARAMETER: dict[str, tuple[int, int]] = {  # (moments in the parameter's dtype, bytes of 8-bit moments)
    "AdamW": (2, 0), "PagedAdamW": (2, 0), "PagedAdamW32bit": (2, 0), "AdamW8bit": (0, 2), "PagedAdamW8bit": (0, 2),
    "Lion": (1, 0), "Lion8bit": (0, 1), "PagedLion8bit": (0, 1), "SGDNesterov": (1, 0), "SGDNesterov8bit": (0, 1),
    "DAdaptation": (3, 0), "DAdaptAdamPreprint": (3, 0), "DAdaptAdaGrad": (2, 0), "DAdaptAdam": (3, 0),
    "DAdaptAdan": (4, 0), "DAdaptAdanIP": (4, 0), "DAdaptLion": (2, 0), "DAdaptSGD": (2, 0), "Prodigy": (4, 0),
    "AdamWScheduleFree": (2, 0), "RAdamScheduleFree": (2, 0), "SGDScheduleFree": (1, 0), "Adafactor": (0, 0),
}


# Copies of the trained weights torch's own optimizers make in their update (their foreach implementation, CUDA's
# default): AdamW's sqrt(v) + eps, SGD's Nesterov step; made while the gradients are alive, after the activations are
# freed. bitsandbytes' 8-bit and paged optimizers update in fused kernels; Adafactor's factored temporaries are small.
_UPDATE_COPIES: dict[str, int] = {"AdamW": 1, "SGDNesterov": 1}


def _update_beyond_step(config: RunConfig, traced: TracedStep) -> PlanItem | None:
    """The optimizer's update when it needs more than the step's peak (full fine-tuning: the gradients and the
    update's temporaries of a whole model outgrow the activations; a LoRA's never do)."""
    copies = _UPDATE_COPIES.get(config.optimizer.optimizer_type, 0) * traced.trained_bytes
    beyond = traced.gradient_bytes + copies - traced.peak_bytes
    if beyond <= 0 or config.optimizer.fused_backward_pass:  # fused: each gradient is applied and freed at once
        return None
    return PlanItem("the optimizer's update, beyond the step", beyond, "gpu",
                    f"{config.optimizer.optimizer_type}: the gradients ({traced.gradient_bytes / GIB:.2f} GiB) and "
                    f"its temporaries ({copies / GIB:.2f} GiB) after the activations are freed")


def optimizer_state_bytes(config: RunConfig, parameters: int, dtype: torch.dtype) -> int:
    """The optimizer's state for `parameters` trained weights of `dtype` (Adafactor: its factored second moment is
    about a row and a column per matrix, under 1 % of the weights; counted as 1 %)."""
    moments, eight_bit = _STATE_PER_PARAMETER.get(config.optimizer.optimizer_type, (2, 0))
    if config.optimizer.optimizer_type == "Adafactor":
        return parameters * 4 // 100
    return parameters * (moments * dtype.itemsize + eight_bit)
