"""The mixed-precision paths of training run where the tests run (issue 16): bf16 and fp16 autocast with fp16's loss
scaler, full_bf16 / full_fp16 trained weights and fp8 base storage, for LoRA, LyCORIS, Textual Inversion and full
fine-tuning, on every family, on the CPU (torch autocasts to both half types there) and on CUDA when there is one.

Each case trains a few steps on a tiny model in this process, recording with a dispatch mode the dtypes the
denoiser's and text encoders' matrix products and convolutions compute in during the forward passes. The run must
finish with finite losses, compute in the precision asked for, keep the trained weights in the dtype asked for, and
(fp16) have scaled its losses. Before engine.train.precision a CPU run trained fp16 requests in float32, so a
dtype mismatch of the half-precision code failed only on a GPU.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_flux import flux_config
from test_train_sd3 import sd3_config
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import events_of, train_in_process, write_config

aten = torch.ops.aten
COMPUTE_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
               aten.convolution.default}
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


@dataclass(frozen=True)
class Case:
    family: str
    precision: str  # training.mixed_precision
    method: str = "lora"
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def trained_dtype(self) -> torch.dtype:
        training = self.sections.get("training", {})
        if training.get("full_bf16"):
            return torch.bfloat16
        return torch.float16 if training.get("full_fp16") else torch.float32


# Samples at the start render with the run's precision: the prompts go through text encoders kept in half precision
# beside a float32 LoRA (a mix that failed outside autocast before this test).
SAMPLE = {"sampling": {"sample_at_first": True, "sample_prompts": ["sks dog, red square --w 64 --h 64 --s 2 --d 5"]}}
TI = {"embedding": {"token_string": "sksdog", "init_word": "dog", "num_vectors_per_token": 2}}
FP8 = {"model": {"fp8_base": True}}
CASES = {
    "sd1-lora-fp32": Case("sd1", "no"),
    "sd1-lora-fp16": Case("sd1", "fp16", sections=SAMPLE),
    "sd1-lora-bf16": Case("sd1", "bf16"),
    "sd1-lora-full_bf16": Case("sd1", "bf16", sections={"training": {"full_bf16": True}}),
    # full_fp16 with torch's AdamW is refused by the config (its eps is 0 in float16); 8-bit AdamW is its pairing.
    "sd1-lora-full_fp16": Case("sd1", "fp16", sections={"training": {"full_fp16": True},
                                                        "optimizer": {"optimizer_type": "AdamW8bit"}}),
    "sd1-loha-fp16": Case("sd1", "fp16", sections={"network": {"network_type": "loha", "conv_dim": 2}}),
    "sd1-ti-fp16": Case("sd1", "fp16", "textual_inversion", TI),
    "sd1-ti-bf16": Case("sd1", "bf16", "textual_inversion", TI),
    "sd1-dreambooth-fp16": Case("sd1", "fp16", "dreambooth"),
    "sd1-dreambooth-full_bf16": Case("sd1", "bf16", "dreambooth", {"training": {"full_bf16": True}}),
    # SDXL with its text encoders' LoRA trained, so both encoders run under autocast with gradients.
    "sdxl-lora-te-fp16": Case("sdxl", "fp16", sections={"training": {"cache_text_encoder_outputs": False},
                                                        **SAMPLE}),
    "flux1-lora-bf16-fp8": Case("flux1", "bf16", sections={**FP8, **SAMPLE}),
    "sd3-lora-bf16-fp8": Case("sd3", "bf16", sections=FP8),
    "sd3-lora-fp16": Case("sd3", "fp16", sections=SAMPLE),
}


class ComputeDtypes(TorchDispatchMode):
    """Counts the input dtypes of matrix products and convolutions while `recording` is on."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.seen: Counter[torch.dtype] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.recording and func in COMPUTE_OPS:
            self.seen[args[0].dtype] += 1
        return func(*args, **(kwargs or {}))


def _config(case: Case, tiny_models: dict[str, Path], folder: Path) -> Path:
    training = {"max_train_steps": 3, "mixed_precision": case.precision, **case.sections.get("training", {})}
    sections = {**case.sections, "training": training, "saving": {"save_state": True}}
    if case.family == "flux1":
        return flux_config(folder / "config.toml", tiny_models, **sections)  # LoRA: flux_config's only method
    if case.family == "sd3":
        return sd3_config(folder / "config.toml", tiny_models, **sections)
    return write_config(folder / "config.toml", tiny_models, case.family, method=case.method, **sections)


def _train(config_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ComputeDtypes]:
    """Train in this process; returns the trainer (its session and step runner) and the forward passes' dtypes."""
    recorder = ComputeDtypes()

    def forward_starts() -> None:
        recorder.recording = True

    def backward_starts() -> None:
        recorder.recording = False  # the backward pass's products follow the forward's dtypes; not counted

    trainer = train_in_process(config_path, monkeypatch, recorder, on_micro_batch=forward_starts,
                               on_backward=backward_starts)
    return trainer, recorder


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_mixed_precision_run_computes_and_keeps_the_dtypes_asked_for(name, tiny_models, tmp_path, monkeypatch):
    case = CASES[name]
    if case.sections.get("network", {}).get("network_type") == "loha":
        pytest.importorskip("lycoris", reason="LyCORIS networks need the lycoris package (the lycoris extra)")
    trainer, recorder = _train(_config(case, tiny_models, tmp_path), monkeypatch)
    session = trainer.session
    # Nearly every product of the forward pass runs in the autocast dtype; a few stay float32 by autocast's own
    # rules or ours (timestep embeddings' sinusoids, a loss in float32).
    computed, count = recorder.seen.most_common(1)[0]
    assert computed == HALF[case.precision], recorder.seen
    assert count >= 0.8 * sum(recorder.seen.values()), recorder.seen
    assert {parameter.dtype for parameter in trainer.runner.parameters} == {case.trained_dtype}
    assert session.precision.mode == case.precision and session.device.type in ("cpu", "cuda")
    losses = [event["loss"] for event in events_of(tmp_path / "out") if event["type"] == "progress"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    scaler = session.precision.scaler
    if case.precision == "fp16":  # the losses were scaled and the scaler's state saved for a resume
        assert scaler is not None and scaler.get_scale() > 1
        assert list((tmp_path / "out").rglob("scaler.pt")), "the fp16 loss scaler's state was not saved"
    else:
        assert scaler is None
    if "sampling" in case.sections:
        assert list((tmp_path / "out" / "samples").glob("*.png")), "no sample was rendered"
    if "fp8_base" in case.sections.get("model", {}):
        stored = {parameter.dtype for parameter in session.model.unet.parameters() if not parameter.requires_grad}
        assert torch.float8_e4m3fn in stored, stored


def test_full_fp16_with_torch_adamw_is_refused_before_the_run():
    from engine.config.io import deep_merge, default_config_dict
    from engine.config.schema import RunConfig

    data = deep_merge(default_config_dict(), {"training": {"mixed_precision": "fp16", "full_fp16": True},
                                              "optimizer": {"optimizer_type": "AdamW"}})
    with pytest.raises(ValueError, match="training.full_fp16: AdamW keeps its moments"):
        RunConfig.model_validate(data, context={"check_packages": False})
