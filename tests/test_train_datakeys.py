"""Dataset keys that act inside training (issue 14): each runs the real trainer in-process on the tiny SD1 model.

network_multiplier per dataset, custom_attributes.diff_output_preservation, face_crop_aug_range and
training.persistent_data_loader_workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from train_helpers import write_config

IMAGES = "10_sks dog"


def _inline(tiny_models: dict[str, Path], *datasets: dict[str, Any]) -> dict[str, Any]:
    """Inline datasets over the tiny dataset's training folder, one repeat each (a few batches per epoch)."""
    folder = str(tiny_models["dataset_img"] / IMAGES)
    entries = []
    for each in datasets:
        dataset = dict(each)
        subset = {"image_dir": folder, "num_repeats": 1, **dataset.pop("subset", {})}
        entries.append({**dataset, "subsets": [subset]})
    return {"train_data_dir": "", "datasets": entries}


def _session(tmp_path: Path, tiny_models: dict[str, Path], **sections: Any) -> tuple[Any, Any]:
    from engine.config.io import load_config
    from engine.train.build import build_session
    from engine.train.reporting import RunLog

    path = write_config(tmp_path / "config.toml", tiny_models, **sections)
    config = load_config(path, check_packages=False)
    log = RunLog(tmp_path / "out")
    return build_session(config, path.parent, tmp_path / "out", log), log


def _train(session: Any, run_dir: Path) -> Any:
    from engine.rundir.control import ControlChannel
    from engine.train.trainer import Trainer

    trainer = Trainer(session, ControlChannel(run_dir))
    return trainer, trainer.run()


# --- persistent data-loader workers -----------------------------------------------------------------------------


class _PidRecordingDataset(torch.utils.data.Dataset):
    """The training dataset, noting which process loaded each item (a worker, with workers > 0)."""

    def __init__(self, inner: Any, record: Path):
        self.inner = inner
        self.record = record

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: Any) -> Any:
        with self.record.open("a", encoding="utf-8") as handle:
            handle.write(f"{key.epoch} {os.getpid()}\n")
        return self.inner[key]


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_serve_every_epoch(persistent, tiny_models, tmp_path):
    session, log = _session(tmp_path, tiny_models, dataset=_inline(tiny_models, {}),
                            training={"max_train_steps": 0, "max_train_epochs": 3, "max_data_loader_n_workers": 1,
                                      "persistent_data_loader_workers": persistent})
    record = tmp_path / "pids.txt"
    try:
        session.dataset = _PidRecordingDataset(session.dataset, record)
        _, outcome = _train(session, tmp_path / "out")
    finally:
        log.close()
    assert outcome.status == "finished"
    pids: dict[int, set[str]] = {}
    for line in record.read_text(encoding="utf-8").splitlines():
        epoch, pid = line.split()
        pids.setdefault(int(epoch), set()).add(pid)
    assert sorted(pids) == [1, 2, 3] and all(len(each) == 1 for each in pids.values())
    assert str(os.getpid()) not in set.union(*pids.values())  # loaded in a worker, not here
    workers = set.union(*pids.values())
    assert len(workers) == (1 if persistent else 3), pids


# --- network_multiplier per dataset -------------------------------------------------------------------------------


def _randomized(network: Any, seed: int = 0) -> Any:
    """A LoRA whose up weights are not zero (a fresh one adds nothing, which would hide any scaling)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.3)
    return network


def test_lora_scales_each_sample_by_its_own_multiplier(tiny_models):
    from train_helpers import load_models

    from engine.networks.lora import create_lora_network

    unet, encoders = load_models(tiny_models, "sd1")
    network = _randomized(create_lora_network(unet, encoders, "sd1", dim=4, alpha=4.0))
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn((1, 4, 8, 8), generator=generator).repeat(2, 1, 1, 1)
    context = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator).repeat(2, 1, 1)
    steps = torch.tensor([500, 500])
    with torch.no_grad():
        base = unet(sample, steps, encoder_hidden_states=context).sample
        network.apply_to()
        full = unet(sample, steps, encoder_hidden_states=context).sample
        network.set_multiplier(torch.tensor([1.0, 0.0]))
        mixed = unet(sample, steps, encoder_hidden_states=context).sample
        network.set_multiplier(torch.tensor([0.5, 0.5]))
        half = unet(sample, steps, encoder_hidden_states=context).sample
        network.set_multiplier(0.5)
        half_float = unet(sample, steps, encoder_hidden_states=context).sample
    assert not torch.allclose(full, base, atol=1e-4)  # the LoRA changes the output
    torch.testing.assert_close(mixed[0], full[0])  # sample 0 at full strength
    torch.testing.assert_close(mixed[1], base[1])  # sample 1 as if there were no LoRA
    torch.testing.assert_close(half, half_float)


def test_a_dataset_at_multiplier_zero_does_not_train_the_network(tiny_models, tmp_path):
    reg_folder = str(tiny_models["dataset_reg"] / "1_dog")
    datasets = _inline(tiny_models, {"network_multiplier": 1.0},
                       {"network_multiplier": 0.0, "subset": {"image_dir": reg_folder, "class_tokens": "dog"}})
    session, log = _session(tmp_path, tiny_models, dataset=datasets,
                            training={"max_train_steps": 0, "max_train_epochs": 1})
    from engine.rundir.control import ControlChannel
    from engine.train.trainer import Trainer

    network = session.method.network
    seen: list[tuple[str, float, float]] = []  # (folder, the batch's multiplier, gradient norm of the network)
    try:
        trainer = Trainer(session, ControlChannel(tmp_path / "out"))
        original = trainer.runner.micro_batch

        def recording(batch: dict[str, Any], *args: Any) -> float:
            loss = original(batch, *args)
            grads = [p.grad.abs().sum() for p in network.parameters() if p.grad is not None]
            norm = float(torch.stack(grads).sum()) if grads else 0.0
            seen.append((Path(batch["image"][0]).parent.name, float(batch["network_multiplier"][0]), norm))
            return loss

        trainer.runner.micro_batch = recording
        assert trainer.run().status == "finished"
    finally:
        log.close()
    by_folder = {folder: (multiplier, []) for folder, multiplier, _ in seen}
    for folder, _, norm in seen:
        by_folder[folder][1].append(norm)
    assert by_folder[IMAGES][0] == 1.0 and by_folder["1_dog"][0] == 0.0, by_folder
    assert all(norm > 0 for norm in by_folder[IMAGES][1])  # the multiplier-1 dataset trains the network
    assert all(norm == 0 for norm in by_folder["1_dog"][1])  # the multiplier-0 dataset's batches leave it as it is
    assert all(lora.multiplier == 1.0 for lora in network.all_loras())  # full strength again for samples


# --- custom_attributes.diff_output_preservation -----------------------------------------------------------------


def test_diff_output_preservation_trains_towards_the_base_prediction(tiny_models, tmp_path, monkeypatch):
    import engine.train.losses as losses

    reg_folder = str(tiny_models["dataset_reg"] / "1_dog")
    dop = {"custom_attributes": {"diff_output_preservation": True}}
    # One bucket and a batch of every image: the one micro-batch holds both subsets.
    datasets = _inline(tiny_models, {"batch_size": 14, "enable_bucket": False, "subset": dop})
    datasets["datasets"][0]["subsets"].append({"image_dir": reg_folder, "num_repeats": 1, "class_tokens": "dog"})
    session, log = _session(tmp_path, tiny_models, dataset=datasets,
                            training={"max_train_steps": 1, "max_train_epochs": 0})
    network = _randomized(session.method.network)
    unet = session.model.unet
    calls: list[tuple[tuple, dict, torch.Tensor]] = []
    unet.register_forward_hook(lambda module, args, kwargs, output: calls.append(
        (tuple(a.detach().clone() for a in args), dict(kwargs), output.sample.detach().clone())), with_kwargs=True)
    targets, flags = [], []
    real_loss = losses.batch_loss
    monkeypatch.setattr(losses, "batch_loss", lambda pred, target, *rest, **kw: (
        targets.append(target.detach().clone()), real_loss(pred, target, *rest, **kw))[1])
    from engine.rundir.control import ControlChannel
    from engine.train.trainer import Trainer

    try:
        trainer = Trainer(session, ControlChannel(tmp_path / "out"))
        original = trainer.runner.micro_batch
        trainer.runner.micro_batch = lambda batch, *args: (flags.append(batch["diff_output_preservation"]),
                                                           original(batch, *args))[1]
        assert trainer.run().status == "finished"
    finally:
        log.close()
    assert len(targets) == 1 and len(calls) == 2  # one micro-batch: the step's forward, then the prior's
    chosen = [index for index, flag in enumerate(flags[0]) if flag]
    assert 0 < len(chosen) < len(flags[0]), flags  # a batch mixing both subsets
    (args, kwargs, trained), target = calls[0], targets[0]
    network.restore()  # the UNet alone: what the base model predicts for the same inputs
    with torch.no_grad():
        base = unet(*args, **kwargs).sample
    for row in range(len(flags[0])):
        if row in chosen:
            torch.testing.assert_close(target[row], base[row].float())  # DOP: the base model's own prediction
            assert not torch.allclose(trained[row], base[row], atol=1e-4)  # which the LoRA moved away from
        else:
            assert not torch.allclose(target[row], base[row].float(), atol=1e-3)  # the noise, as usual


# --- face_crop_aug_range --------------------------------------------------------------------------------------------


def _gradient_image(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    width, height = size
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def test_face_crop_cuts_around_the_face_box_of_the_file_name(tiny_models, tmp_path):
    from PIL import Image
    from safetensors import safe_open

    from engine.data.transforms import resize_image, to_model_tensor
    from engine.train.dataset import SampleKey

    folder = tmp_path / "faces"
    folder.mkdir()
    _gradient_image(folder / "face_120_50_40_40.png", (200, 100))  # a 40 px face centred at (120, 50)
    (folder / "face.txt").write_text("sks face", encoding="utf-8")  # sd-scripts' caption name for face crops
    _gradient_image(folder / "plain.png", (64, 64))
    dataset = {"train_data_dir": "", "datasets": [{
        "enable_bucket": False, "resolution": 64, "batch_size": 1,
        "subsets": [{"image_dir": str(folder), "face_crop_aug_range": [2.0, 2.0], "class_tokens": "sks"}]}]}
    session, log = _session(tmp_path, tiny_models, dataset=dataset,
                            training={"max_train_steps": 2, "cache_latents": False})
    try:
        index = next(i for i, example in enumerate(session.dataset.examples) if example.record.path.stem != "plain")
        item = session.dataset[SampleKey(index, epoch=1, position=0, step=1)]
        _, outcome = _train(session, tmp_path / "out")
    finally:
        log.close()
    # The face is to be 1/2 of the 64 px side: scale 64 / (40 * 2) = 0.8, so 200x100 -> 160x80 with the face at
    # (96, 40); a 64 px cut centred there starts at (96 - 32, 40 - 32) = (64, 8).
    with Image.open(folder / "face_120_50_40_40.png") as image:
        expected = np.array(resize_image(image.convert("RGB"), (160, 80)).crop((64, 8, 128, 72)))
    torch.testing.assert_close(item["pixels"], to_model_tensor(expected))
    assert item["caption"] == "sks face"
    assert outcome.status == "finished"
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_face_crop_aug_range"] == "(2.0, 2.0)"  # recorded because it ran
