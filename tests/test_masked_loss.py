"""Masked loss through the real training step on the tiny models (SD1 and FLUX.1): the masked-out region gets no
gradient, and what the model does there changes neither the loss nor the trained weights' gradients; masks from the
alpha channel and from a mask folder train alike; the disk cache stores the mask and re-encodes when it changes.

Why the test perturbs the prediction and not the image: the masked-out pixels still reach the model as input (the
VAE and the denoiser mix neighbouring areas through convolutions and attention), so an image changed only where
the mask is 0 can change the prediction in the kept area too, here as in sd-scripts. What masking guarantees, and
what is checked exactly, is that the loss reads nothing of the prediction where the mask is 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import write_config

pytestmark = pytest.mark.slow

SIZE = 64
COLOURS = ((200, 40, 40), (30, 90, 220))


def _alpha() -> np.ndarray:
    """Left half transparent (ignored), right half opaque (trained): exactly four latent columns each."""
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[:, : SIZE // 2] = 0
    return alpha


def _picture(index: int) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    base = np.array(COLOURS[index], dtype=np.int32)
    return ((base + (x * 3 + y * 2)[..., None] * (index + 1)) % 256).astype(np.uint8)


def make_dataset(root: Path) -> dict[str, Path]:
    """The same two pictures as RGBA cut-outs (alpha_mask) and as opaque images on white with a mask folder."""
    folders = {name: root / name for name in ("cutouts", "photos", "masks")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for index in range(2):
        rgba = Image.fromarray(np.dstack([_picture(index), _alpha()]), mode="RGBA")
        rgba.save(folders["cutouts"] / f"{index}.png")
        on_white = Image.new("RGB", rgba.size, (255, 255, 255))
        on_white.paste(rgba, mask=rgba.getchannel("A"))  # what training sees of a cut-out
        on_white.save(folders["photos"] / f"{index}.png")
        Image.fromarray(_alpha(), mode="L").save(folders["masks"] / f"{index}.png")
        for folder in ("cutouts", "photos"):
            (folders[folder] / f"{index}.txt").write_text(f"sks thing {index}", encoding="utf-8")
    return folders


def masked_datasets(folders: dict[str, Path], batch_size: int = 2) -> dict[str, Any]:
    return {"train_data_dir": "", "datasets": [
        {"batch_size": batch_size, "subsets": [{"image_dir": str(folders["cutouts"]), "alpha_mask": True}]},
        {"batch_size": batch_size, "subsets": [{"image_dir": str(folders["photos"]),
                                                "conditioning_data_dir": str(folders["masks"])}]}]}


def build(tmp_path: Path, config_path: Path) -> Any:
    from accelerate.state import AcceleratorState

    from engine.config.io import load_config
    from engine.train.build import build_session
    from engine.train.loop import StepRunner
    from engine.train.reporting import RunLog

    AcceleratorState._reset_state(True)
    log = RunLog(tmp_path / "run")  # left open: the session reports through it while it trains
    session = build_session(load_config(config_path, check_packages=False), config_path.parent, tmp_path / "run",
                            log)
    randomize_lora(session.method.network)
    return session, StepRunner(session)


def randomize_lora(network: Any) -> None:
    """A fresh LoRA's up weights are 0, so its down weights would get no gradient at all; give them some."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.3)


def batch_of(session: Any, folder: Path) -> dict[str, Any]:
    """The training batch of the two images in `folder`, as the data loader builds it."""
    from engine.train.dataset import SampleKey, collate

    indices = [i for i, example in enumerate(session.dataset.examples) if example.record.path.parent == folder]
    assert len(indices) == 2
    return collate([session.dataset[SampleKey(index, epoch=1, position=0, step=0, slot=slot)]
                    for slot, index in enumerate(indices)])


class OutputEdit:
    """A forward hook on the denoiser that adds `delta` to its output (or nothing) and keeps that output's
    gradient, so a test can see what the loss does with each part of the prediction."""

    def __init__(self, denoiser: Any, to_output: Any = None):
        self.delta: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.to_output = to_output or (lambda delta: delta)
        self.handle = denoiser.register_forward_hook(self)

    def __call__(self, module: Any, args: Any, output: Any) -> Any:
        sample = output.sample if hasattr(output, "sample") else output
        if self.delta is not None:
            sample = sample + self.to_output(self.delta).to(sample)
        sample.retain_grad()
        self.output = sample
        return type(output)(sample=sample) if hasattr(output, "sample") else sample


def loss_and_gradients(runner: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One real micro-batch (forward, loss, backward) from zeroed gradients."""
    for parameter in runner.parameters:
        parameter.grad = None
    loss = runner.micro_batch(batch, seed=7, accumulation=1, step=0)
    return loss, [parameter.grad.clone() for parameter in runner.parameters if parameter.grad is not None]


def same(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Equal to the bit on the CPU; on CUDA, whose backward kernels sum in no fixed order, equal to rounding."""
    if first.device.type == "cpu":
        return torch.equal(first, second)
    return torch.allclose(first, second, rtol=1e-4, atol=1e-7)


def latent_mask(batch: dict[str, Any], latent_size: int) -> torch.Tensor:
    mask = torch.nn.functional.interpolate(batch["loss_mask"].unsqueeze(1), size=(latent_size, latent_size),
                                           mode="area")
    assert set(mask.unique().tolist()) == {0.0, 1.0}  # the halves fall on whole latent cells
    return mask


def check_masked_region_is_ignored(runner: Any, batch: dict[str, Any], edit: OutputEdit) -> torch.Tensor:
    """The checks both families share; returns d loss / d prediction of the unedited step."""
    latent_shape = tuple(batch["latents"].shape)
    mask = latent_mask(batch, latent_shape[-1])
    base_loss, base_grads = loss_and_gradients(runner, batch)
    output_grad = edit.output.grad  # d loss / d prediction, in the denoiser's output layout
    random = torch.randn(latent_shape, generator=torch.Generator().manual_seed(3))

    edit.delta = random * (1 - mask)  # the model gets the ignored half arbitrarily wrong
    ignored_loss, ignored_grads = loss_and_gradients(runner, batch)
    edit.delta = random * mask  # ... or the kept half
    kept_loss, kept_grads = loss_and_gradients(runner, batch)
    edit.delta = None

    assert same(ignored_loss, base_loss)
    assert len(ignored_grads) == len(base_grads) > 0
    assert all(same(a, b) for a, b in zip(ignored_grads, base_grads, strict=True))
    assert not torch.allclose(kept_loss, base_loss)
    assert any(not torch.allclose(a, b) for a, b in zip(kept_grads, base_grads, strict=True))
    return output_grad


# --- SD1 ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("masked_sd1")
    folders = make_dataset(root)
    config = write_config(root / "config.toml", tiny_models, "sd1", dataset=masked_datasets(folders),
                          training={"masked_loss": True, "cache_latents_to_disk": True})
    session, runner = build(root, config)
    edit = OutputEdit(session.model.unet)
    yield session, runner, edit, folders
    edit.handle.remove()


@pytest.mark.parametrize("source", ["cutouts", "photos"])
def test_sd1_the_masked_out_region_gets_no_gradient(sd1, source):
    session, runner, edit, folders = sd1
    batch = batch_of(session, folders[source])
    assert batch["loss_mask"].shape == (2, SIZE, SIZE)
    output_grad = check_masked_region_is_ignored(runner, batch, edit)
    mask = latent_mask(batch, SIZE // 8).expand_as(output_grad)
    assert torch.count_nonzero(output_grad[mask == 0]) == 0  # the gradient there is zero
    assert torch.count_nonzero(output_grad[mask == 1]) > 0


def test_sd1_alpha_masks_and_mask_files_train_alike(sd1):
    session, runner, _, folders = sd1
    cutouts, photos = batch_of(session, folders["cutouts"]), batch_of(session, folders["photos"])
    assert torch.equal(cutouts["loss_mask"], photos["loss_mask"])
    assert same(cutouts["latents"], photos["latents"])
    cutout_loss, cutout_grads = loss_and_gradients(runner, cutouts)
    photo_loss, photo_grads = loss_and_gradients(runner, photos)
    assert same(cutout_loss, photo_loss)
    assert all(same(a, b) for a, b in zip(cutout_grads, photo_grads, strict=True))
    unmasked_loss, _ = loss_and_gradients(runner, {key: value for key, value in photos.items() if key != "loss_mask"})
    assert not torch.allclose(unmasked_loss, photo_loss)  # the mask does change the loss


def test_sd1_disk_cache_holds_the_mask_and_a_changed_mask_is_encoded_again(sd1, tiny_models):
    from engine.cache.latent_files import cache_path, load_entry
    from engine.cache.latent_jobs import jobs_from_scan, stale_cache_findings
    from engine.cache.latents import build_latent_cache
    from engine.data.scan import scan_config

    session, _, _, folders = sd1
    for folder in ("cutouts", "photos"):
        entry = load_entry(cache_path(folders[folder] / "0.png", (SIZE, SIZE), "sd1"))
        np.testing.assert_array_equal(entry.alpha_mask, _alpha().astype(np.float32) / 255.0)
    inverted = 255 - _alpha()
    Image.fromarray(inverted, mode="L").save(folders["masks"] / "0.png")
    try:
        jobs = jobs_from_scan(scan_config(session.config, session.base_dir))
        stale = stale_cache_findings(jobs, family="sd1")
        assert [(Path(f.where).name, f.message) for f in stale] == [
            ("0_64x64_sd.npz", "the mask file changed since it was cached")]
        report = build_latent_cache(jobs, session.model.vae, to_disk=True)
        assert [reason for _, reason in report.rebuilt_stale] == ["the mask file changed since it was cached"]
        entry = load_entry(cache_path(folders["photos"] / "0.png", (SIZE, SIZE), "sd1"))
        np.testing.assert_array_equal(entry.alpha_mask, inverted.astype(np.float32) / 255.0)
    finally:
        Image.fromarray(_alpha(), mode="L").save(folders["masks"] / "0.png")


def test_sd1_masked_run_trains_to_the_end(tiny_models, tmp_path):
    """Pixels instead of cached latents (the mask goes through prepare each step, flipped with its image), two
    steps."""
    from engine.rundir.control import ControlChannel
    from engine.train.dataset import SampleKey
    from engine.train.trainer import Trainer

    folders = make_dataset(tmp_path / "data")
    datasets = masked_datasets(folders)
    for dataset in datasets["datasets"]:
        dataset["flip_aug"] = True
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", dataset=datasets,
                          training={"masked_loss": True, "cache_latents": False, "max_train_steps": 2})
    session, _ = build(tmp_path, config)
    flipped = set()
    for index, example in enumerate(session.dataset.examples):
        for position in range(4):  # several draws, so both flips show up
            item = session.dataset[SampleKey(index, epoch=1, position=position, step=0)]
            white = (item["pixels"] == 1.0).all(dim=0)  # the cut-outs' transparent half, and no other pixel
            if example.record.mask.kind == "alpha":
                assert torch.equal(white, item["loss_mask"] == 0)  # the mask flipped with the pixels, or not
            flipped.add(bool(item["loss_mask"][:, 0].all()))
    assert flipped == {True, False}
    outcome = Trainer(session, ControlChannel(tmp_path / "run")).run()
    assert outcome.status == "finished"
    assert (tmp_path / "out" / "lora.safetensors").is_file()


# --- the flow families (FLUX.1, SD3) ---------------------------------------------------------------------------------


def flow_family(name: str) -> tuple[str, Path, dict[str, Any], Any]:
    """(family, model file, model section, how a latent-shaped delta reaches the denoiser's output)."""
    from engine.train import flow

    if name == "flux1":
        from flux_tiny import tiny_flux_files

        files = tiny_flux_files("dev")
        model = {"t5xxl": str(files["t5xxl"]), "ae": str(files["ae"]), "clip_l": str(files["clip_l"])}
        to_output = flow.pack_latents  # the transformer speaks in 2x2 patches
    else:
        from sd3_tiny import tiny_sd3_files

        files = tiny_sd3_files("medium")
        model = {"clip_l": str(files["clip_l"]), "clip_g": str(files["clip_g"]), "t5xxl": str(files["t5xxl"]),
                 "t5xxl_max_token_length": 16}
        to_output = None  # the MMDiT answers in latent layout
    model.update(model_family=name, v_parameterization=False, tokenizer_cache_dir=str(files["t5_tokenizer"]))
    return name, files["model"], model, to_output


@pytest.mark.parametrize("name", ["flux1", "sd3"])
def test_flow_families_the_masked_out_region_gets_no_gradient(tiny_models, tmp_path, name):
    from engine.train import flow

    family, model_file, model, to_output = flow_family(name)
    folders = make_dataset(tmp_path / "data")
    datasets = masked_datasets(folders)
    datasets["general"] = {"bucket_reso_steps": 16}
    sections: dict[str, Any] = {"flow": {"guidance_scale": 1.0}} if family == "flux1" else {}
    config = write_config(tmp_path / "config.toml", {family: model_file, "dataset_img": folders["photos"]},
                          family, model=model, dataset=datasets, training={"masked_loss": True}, **sections)
    session, runner = build(tmp_path, config)
    edit = OutputEdit(session.model.unet, to_output=to_output)
    try:
        for source in ("cutouts", "photos"):
            batch = batch_of(session, folders[source])
            output_grad = check_masked_region_is_ignored(runner, batch, edit)
            latent_hw = tuple(batch["latents"].shape[-2:])
            unpacked = flow.unpack_latents(output_grad, latent_hw) if to_output is not None else output_grad
            mask = latent_mask(batch, latent_hw[-1]).expand_as(unpacked)
            assert torch.count_nonzero(unpacked[mask == 0]) == 0
            assert torch.count_nonzero(unpacked[mask == 1]) > 0
    finally:
        edit.handle.remove()
