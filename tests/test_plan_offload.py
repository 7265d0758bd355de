"""The memory plan of cpu_offload_checkpointing (issue 16): the checkpointed blocks' saved inputs are planned in
system RAM, not on the GPU, and the GPU keeps the one block being recomputed.

Checked against what the engine really does: the tiny model loaded, its LoRA made and the models placed by the engine
itself (engine.train.placement) on the meta device standing for the GPU, as tests/unit/test_unet_block_swap.py does,
then made fake tensors (on the meta device still) so that the checkpoints' real copies to the CPU can be made; one
training step runs, and a dispatch mode written here counts the bytes of every live storage by device at its peak.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from train_helpers import write_config

pytestmark = pytest.mark.slow


class _BytesByDevice(TorchDispatchMode):
    """Peak bytes of the storages made while active, per device type (each storage counted once, until freed)."""

    def __init__(self, resident: set[int]) -> None:
        super().__init__()
        self.resident, self.sizes = resident, {}
        self.now: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)

    def _add(self, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            return
        storage = value.untyped_storage()
        key, device = storage._cdata, value.device.type
        if key in self.sizes or key in self.resident:
            return
        self.sizes[key] = (device, storage.nbytes())
        self.now[device] += storage.nbytes()
        self.peak[device] = max(self.peak[device], self.now[device])
        weakref.finalize(storage, self._drop, key)

    def _drop(self, key: int) -> None:
        device, size = self.sizes.pop(key)
        self.now[device] -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tree_map(self._add, out)
        return out


def _measured_step(config: Any, family: str, tiny_models: dict[str, Path], tmp_path: Path) -> dict[str, int]:
    """Peak bytes by device ("meta" = the GPU, "cpu" = the host) of one training step, placed by the engine."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.models.loading import load_model
    from engine.train.methods import create_method
    from engine.train.placement import place_models

    model = load_model(tiny_models[family], family=family)
    method = create_method(config, model, tmp_path)
    place_models(config, model, method, SimpleNamespace(device=torch.device("meta")), torch.float32,
                 latents_cached=True, texts_cached=True)
    unet = model.unet
    with FakeTensorMode(allow_non_fake_inputs=True):
        # Meta tensors hold no data to copy to the CPU: the placed modules become fake ones on the same device.
        unet.to_empty(device="meta")
        method.network.to_empty(device="meta")
        resident = {t.untyped_storage()._cdata for module in (unet, method.network)
                    for t in (*module.parameters(), *module.buffers())}
        batch, latent = 2, 8  # the config's batch of 64 px images
        unet_config = unet.config
        tracker = _BytesByDevice(resident)
        with tracker:
            sample = torch.randn(batch, unet_config.in_channels, latent, latent, device="meta")
            text = torch.randn(batch, 77, unet_config.cross_attention_dim, device="meta")
            extra = {}
            if unet_config.addition_embed_type == "text_time":
                pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
                extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, device="meta"),
                                               "time_ids": torch.zeros(batch, 6, device="meta")}}
            timesteps = torch.tensor([10, 500], device="meta")
            prediction = unet(sample, timesteps, encoder_hidden_states=text, **extra).sample
            torch.nn.functional.mse_loss(prediction.float(), torch.zeros_like(prediction)).backward()
    return dict(tracker.peak)


def _planned_and_measured(family: str, offload: bool, tiny_models: dict[str, Path], tmp_path: Path) -> tuple:
    """(the plan's step item on the GPU, its offloaded item or None, the measured peaks by device)."""
    from engine.config.io import load_config
    from engine.plan import make_plan

    config = load_config(write_config(tmp_path / f"{offload}.toml", tiny_models, family,
                                      network={"train_unet_only": True},
                                      training={"gradient_checkpointing": True, "cache_text_encoder_outputs": True,
                                                "cpu_offload_checkpointing": offload}), check_packages=False)
    items = {item.name: item for item in make_plan(config, tmp_path, gpu_capacity=None).items}
    step = next(item.bytes for name, item in items.items() if name.startswith("the step"))
    return step, items.get("checkpointed activations offloaded to the CPU"), _measured_step(config, family,
                                                                                            tiny_models, tmp_path)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_offloaded_checkpoints_are_planned_in_system_ram_as_the_engine_places_them(family, tiny_models, tmp_path):
    (plain_step, plain_host, plain), (step, host, offloaded) = (
        _planned_and_measured(family, offload, tiny_models, tmp_path) for offload in (False, True))
    print(f"{family}: planned {plain_step} -> {step} on the GPU and {host.bytes if host else 0} on the host; "
          f"measured {plain} -> {offloaded}")
    # Without offloading nothing of the step is on the host; with it, the plan puts there what went there.
    assert plain.get("cpu", 0) == 0 and plain_host is None
    assert host is not None and host.where == "host"
    assert abs(host.bytes - offloaded["cpu"]) <= 0.15 * offloaded["cpu"]
    # The GPU's peak falls by what the step measured (the offloaded inputs less the recomputed block's copy, and less
    # what stays on the GPU anyway: a block's input the UNet's skip connections or the next block still hold). The
    # peaks themselves are compared with a real run's in test_plan.py: the meta device has only the math attention
    # kernel, which keeps more for backward than the CPU's and CUDA's flash kernels that the plan traces.
    saved = plain["meta"] - offloaded["meta"]
    assert saved > 0 and abs((plain_step - step) - saved) <= 0.15 * saved


def test_fit_proposes_offloaded_checkpoints_only_where_they_make_the_run_fit(tiny_models, tmp_path):
    """Fit to my GPU: with every cheaper change made, a card between the plan with offloading and the plan without
    gets cpu_offload_checkpointing; a card smaller than both goes on to swapping blocks (they exclude each other)."""
    from engine.config.io import load_config
    from engine.plan import make_plan
    from engine.plan.fit import fit_to_gpu

    cheaper = {"cache_latents": True, "cache_text_encoder_outputs": True, "gradient_checkpointing": True}

    def config(name: str, **training: Any) -> Any:
        return load_config(write_config(tmp_path / f"{name}.toml", tiny_models, "sd1",
                                        network={"train_unet_only": True}, optimizer={"optimizer_type": "AdamW8bit"},
                                        training={**cheaper, **training}), check_packages=False)

    plain = config("plain")
    needed = make_plan(plain, tmp_path, gpu_capacity=None).gpu_needed
    offloaded = make_plan(config("offloaded", cpu_offload_checkpointing=True), tmp_path, gpu_capacity=None).gpu_needed
    assert offloaded < needed

    between = fit_to_gpu(plain, tmp_path, (offloaded + needed) // 2)
    assert between.fits and [(c.key, c.value) for c in between.changes] == \
        [("training.cpu_offload_checkpointing", True)]
    assert between.changes[0].gpu_needed_bytes == offloaded

    smaller = fit_to_gpu(plain, tmp_path, offloaded - 1)
    keys = [change.key for change in smaller.changes]
    assert "training.cpu_offload_checkpointing" not in keys and keys[0] == "training.blocks_to_swap", keys
