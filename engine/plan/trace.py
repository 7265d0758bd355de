"""One training step of the real denoiser traced with fake tensors: the memory its forward and backward allocate,
at the run's batch size, resolution, precision and checkpointing, with no memory allocated and no GPU needed.

The denoiser (on the meta device, from engine.plan.architecture) becomes fake tensors; the run's network (the
engine's own LoRA builder), dtypes and gradient checkpointing are applied as placement does; a fake batch of the
run's largest bucket goes through the family's forward under autocast, then the loss and backward. A dispatch mode
counts every tensor storage made during the step until it is freed: the peak is what the step needs on top of the
weights resident before it (gradients of the trained weights included; optimizer states are arithmetic).

Traced on the CPU's kernels: CUDA's autocast keeps a few more ops in float32 (norms, softmax), and its attention
kernels save what the CPU's flash kernel saves (outputs and log-sum-exp), so the activations compare; the plan's
agreement with measured CUDA peaks is recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from engine.config.schema import RunConfig
from engine.models.checkpointing import offload_host
from engine.models.families import family_info
from engine.plan.text_trace import FULL_METHODS, cast_encoders, encode_for_loss, encoder_training, prepare_encoders

__all__ = ["HOST_STAND_IN", "PeakBytes", "StepShape", "TracedStep", "trace_step"]


@dataclass(frozen=True)
class StepShape:
    batch_size: int
    height: int  # pixels, the largest bucket's
    width: int
    text_tokens: int  # CLIP tokens (75 per chunk + 2) or T5 tokens for the flow families


@dataclass(frozen=True)
class TracedStep:
    peak_bytes: int  # what the step allocates at its worst moment, on top of the weights
    trained_parameters: int
    trained_bytes: int  # the trained weights themselves (float32 unless full_bf16 / full_fp16)
    gradient_bytes: int  # the trained weights' gradients after backward (part of peak_bytes)
    sampling_bytes: int = 0  # the denoiser's inference for samples (no gradients), when a sample shape was given
    offloaded_bytes: int = 0  # cpu_offload_checkpointing: the peak of the checkpoints' inputs waiting in host RAM


# The device that stands for the host in a trace: cpu_offload_checkpointing's copies go there (offload_host), so that
# they are new storages, counted apart from the device's.
HOST_STAND_IN = "meta"


class PeakBytes(TorchDispatchMode):
    """Live bytes of the storages made while active, and their peak (each storage counted once, until freed); those
    on the host's stand-in (HOST_STAND_IN) are counted apart, in `host_peak`."""

    def __init__(self, resident: nn.Module) -> None:
        super().__init__()
        # Storages that exist before the step (weights, buffers): views of them (a transposed weight) are not new.
        self.resident = {tensor.untyped_storage()._cdata
                         for tensor in (*resident.parameters(), *resident.buffers())}
        self.live: dict[int, tuple[int, bool]] = {}  # storage -> (bytes, on the host)
        self.current = self.peak = 0
        self.host_current = self.host_peak = 0

    def _note(self, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            return
        storage = value.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.resident:
            return
        size, on_host = storage.nbytes(), value.device.type == HOST_STAND_IN
        self.live[key] = (size, on_host)
        if on_host:
            self.host_current += size
            self.host_peak = max(self.host_peak, self.host_current)
        else:
            self.current += size
            self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size, on_host = self.live.pop(key, (0, False))
        if on_host:
            self.host_current -= size
        else:
            self.current -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tree_map(self._note, out)
        return out


def trace_step(config: RunConfig, family: str, denoiser: nn.Module, shape: StepShape, *,
               frozen_dtype: torch.dtype, trained_dtype: torch.dtype,
               sample_shape: StepShape | None = None, text_encoders: list[nn.Module] | None = None) -> TracedStep:
    """Trace one step (see the module docstring), and with `sample_shape` the denoiser's inference for samples
    after it (engine.plan.sampling). `denoiser` and `text_encoders` (the family's, on the meta device, where the
    architecture has them: those the run trains are traced, engine.plan.text_trace) are changed in place."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    text_encoders = text_encoders or []
    trains_denoiser = config.method in FULL_METHODS
    denoiser.to(trained_dtype if trains_denoiser else frozen_dtype)
    training = encoder_training(config, family, len(text_encoders))
    encoders = [encoder for encoder, trains in zip(text_encoders, training, strict=True) if trains]
    cast_encoders(config, encoders, frozen_dtype=frozen_dtype, trained_dtype=trained_dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        denoiser.to_empty(device="cpu")
        denoiser.requires_grad_(trains_denoiser)
        trained = prepare_encoders(config, encoders)
        if trains_denoiser:
            trained = [*denoiser.parameters(), *trained]
        elif config.method == "lora":
            trained, encoders = _lora_parameters(config, family, denoiser, trained_dtype, text_encoders, training)
        if config.training.gradient_checkpointing:
            from engine.train.placement import enable_checkpointing

            enable_checkpointing(denoiser, family, config.training.cpu_offload_checkpointing)
        denoiser.train(True)
        # The LoRA modules are the denoiser's and encoders' submodules once applied.
        tracker = PeakBytes(nn.ModuleList([denoiser, *encoders]))
        # CUDA's float32 rule for norms and softmax, also while checkpointing recomputes under autocast in backward.
        with tracker, _cuda_float32_ops(), offload_host(HOST_STAND_IN):
            inputs = _INPUTS[family_info(family).loader](denoiser, shape, frozen_dtype)
            if config.method == "textual_inversion":  # the gradient flows through the denoiser to the text
                inputs.text.requires_grad_(True)
            with _autocast(config):
                # Trained encoders run first; what their forward keeps for backward stays while the denoiser runs.
                encoded = encode_for_loss(encoders, family, shape.batch_size, shape.text_tokens)
                prediction = inputs.forward()
            loss = torch.nn.functional.mse_loss(prediction.float(), torch.zeros_like(prediction, dtype=torch.float32))
            (loss + encoded).backward()
        gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in trained if p.grad is not None)
        del inputs, prediction, loss, encoded
        sampling = _trace_inference(config, family, denoiser, trained, sample_shape, frozen_dtype)
    return TracedStep(peak_bytes=tracker.peak, trained_parameters=sum(p.numel() for p in trained),
                      trained_bytes=sum(p.numel() * p.element_size() for p in trained),
                      gradient_bytes=gradient_bytes, sampling_bytes=sampling, offloaded_bytes=tracker.host_peak)


def _trace_inference(config: RunConfig, family: str, denoiser: nn.Module, trained: list[nn.Parameter],
                     shape: StepShape | None, frozen_dtype: torch.dtype) -> int:
    """The peak of one denoiser call for samples: eval mode, no gradients (the optimizer has set them to None)."""
    if shape is None:
        return 0
    for parameter in trained:
        parameter.grad = None
    denoiser.train(False)
    tracker = PeakBytes(denoiser)
    with tracker, _cuda_float32_ops(), torch.no_grad():
        inputs = _INPUTS[family_info(family).loader](denoiser, shape, frozen_dtype)
        with _autocast(config):
            inputs.forward()
    return tracker.peak


def _autocast(config: RunConfig) -> contextlib.AbstractContextManager:
    from engine.train.precision import make_precision

    return make_precision(config.training.mixed_precision, torch.device("cpu")).autocast()


@contextlib.contextmanager
def _cuda_float32_ops() -> Iterator[None]:
    """CUDA's autocast runs norms and softmax in float32 (torch's autocast op reference) where the CPU's leaves them in
    half: while tracing, under autocast, their half inputs are cast up first, and the float32 copies are what backward
    keeps, as on a GPU. Functional-level, so checkpointing's recompute during backward goes through it too."""
    originals = {name: getattr(F, name) for name in _CUDA_FLOAT32}

    def upcasting(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return function(*tree_map(_up, args), **kwargs)
            return function(*args, **kwargs)
        return call

    try:
        for name, function in originals.items():
            setattr(F, name, upcasting(function))
        yield
    finally:
        for name, function in originals.items():
            setattr(F, name, function)


def _up(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


_CUDA_FLOAT32 = ("group_norm", "layer_norm", "softmax", "log_softmax")


def _lora_parameters(config: RunConfig, family: str, denoiser: nn.Module, trained_dtype: torch.dtype,
                     text_encoders: list[nn.Module], training: list[bool]) -> tuple[list[nn.Parameter],
                                                                                     list[nn.Module]]:
    """The engine's LoRA on the denoiser and the trained encoders, applied: its weights, and the encoders it put
    modules on (T5 only with train_t5xxl: the network decides, as in the run)."""
    from engine.networks.lora import create_lora_network, network_options
    from engine.train.learning_rates import learning_rates

    trains_unet = not config.network.train_text_encoder_only and learning_rates(config, len(training)).unet > 0
    # Stand-ins where the encoders are not traced: the network then puts no modules on them.
    encoders = [*text_encoders] if any(training) else \
        [nn.Module() for _ in family_info(family).text_encoder_lora_prefixes]
    network = create_lora_network(denoiser, encoders, family, train_unet=trains_unet,
                                  train_text_encoder=training if any(training) else False,
                                  **network_options(config.network))
    network.apply_to()
    parameters = network.trainable_parameters()
    for parameter in parameters:
        parameter.data = parameter.data.to(trained_dtype)
    trained = [encoder for encoder, loras in zip(encoders, network.text_encoder_loras, strict=True) if loras]
    return parameters, trained


@dataclass
class _Inputs:
    forward: Callable[[], torch.Tensor]
    text: torch.Tensor


def _sd_inputs(unet: nn.Module, shape: StepShape, dtype: torch.dtype) -> _Inputs:
    batch, latent = shape.batch_size, (shape.height // 8, shape.width // 8)
    x = torch.randn(batch, unet.config.in_channels, *latent).to(dtype)
    timesteps = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, shape.text_tokens, unet.config.cross_attention_dim, dtype=dtype)
    extra: dict[str, Any] = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, dtype=dtype),
                                       "time_ids": torch.zeros(batch, 6, dtype=dtype)}}
    return _Inputs(lambda: unet(x, timesteps, encoder_hidden_states=text, **extra).sample, text)


def _flux_inputs(model: nn.Module, shape: StepShape, dtype: torch.dtype) -> _Inputs:
    from engine.train import flow

    params, batch = model.params, shape.batch_size
    hw = (shape.height // 8, shape.width // 8)
    img = flow.pack_latents(torch.randn(batch, params.in_channels // 4, *hw)).to(dtype)
    text = torch.randn(batch, shape.text_tokens, params.context_in_dim, dtype=dtype)
    y = torch.randn(batch, params.vec_in_dim, dtype=dtype)
    guidance = torch.full((batch,), 3.5, dtype=dtype) if params.guidance_embed else None

    def forward() -> torch.Tensor:
        return model(img=img, img_ids=flow.image_ids(batch, hw, device="cpu", dtype=dtype), txt=text,
                     txt_ids=flow.text_ids(batch, shape.text_tokens, device="cpu", dtype=dtype),
                     timesteps=torch.full((batch,), 0.5, dtype=dtype), y=y, guidance=guidance)

    return _Inputs(forward, text)


def _sd3_inputs(model: nn.Module, shape: StepShape, dtype: torch.dtype) -> _Inputs:
    params, batch = model.params, shape.batch_size
    x = torch.randn(batch, params.in_channels, shape.height // 8, shape.width // 8, dtype=dtype)
    text = torch.randn(batch, 77 + shape.text_tokens, params.context_in_dim, dtype=dtype)
    y = torch.randn(batch, params.adm_in_channels, dtype=dtype)
    t = torch.full((batch,), 500.0, dtype=dtype)
    return _Inputs(lambda: model(x=x, t=t, y=y, context=text), text)


_INPUTS: dict[str, Callable[[nn.Module, StepShape, torch.dtype], _Inputs]] = {
    "ldm": _sd_inputs, "flux": _flux_inputs, "sd3": _sd3_inputs}
