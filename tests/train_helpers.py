"""Shared pieces of the training tests: tiny run configs, running the engine, and a fixed validation loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.config.io import deep_merge, default_config_dict, save_config
from engine.config.schema import RunConfig

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, tiny_models: dict[str, Path], family: str = "sd1", **sections: Any) -> Path:
    """A small LoRA run on a tiny model: 64 px, batch 2, a few steps, float32, latents cached in memory."""
    model = tiny_models[family]
    base = {
        "model": {"pretrained_model_name_or_path": str(model), "model_family": family,
                  "v_parameterization": family == "sd2"},
        "network": {"network_dim": 4, "network_alpha": 4.0},
        "dataset": {"train_data_dir": str(tiny_models["dataset_img"]),
                    "general": {"resolution": 64, "batch_size": 2, "min_bucket_reso": 64, "max_bucket_reso": 128,
                                "bucket_reso_steps": 64}},
        "optimizer": {"learning_rate": 2e-3, "lr_scheduler": "constant"},
        "training": {"max_train_epochs": 0, "max_train_steps": 8, "mixed_precision": "no", "seed": 3},
        "saving": {"output_dir": str(path.parent / "out"), "output_name": "lora", "save_precision": "float"},
    }
    data = deep_merge(deep_merge(default_config_dict(), base), sections)
    config = RunConfig.model_validate(data, context={"check_packages": False})
    save_config(config, path)
    return path


def engine_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_engine(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=engine_env(), capture_output=True,
                          text=True, timeout=timeout)


def engine_here(*args: str) -> int:
    """`python -m engine ARGS` run in this process: the CLI's own code (config loading, the run's events and log,
    the exit code) without the seconds a new process spends importing torch, diffusers and transformers (about
    half of a tiny run's time). For tests whose subject is not the process itself; those about signals, a crash's
    exit or several processes start `python -m engine` (run_engine)."""
    from engine.cli import main

    return main(list(args))


def train_here(config: Path, *args: str) -> Path:
    """Train `config` in this process through the CLI (engine_here); the run must finish. Returns its output
    folder as write_config sets it (the run's lines went to the captured stdout, which pytest shows on failure)."""
    code = engine_here("train", str(config), *args)
    assert code == 0, f"python -m engine train {config} {' '.join(args)}: exit {code}"
    return config.parent / "out"


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_pipeline(folder: Path) -> Any:
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)


def pipeline_text_encoders(pipe: Any, family: str) -> Any:
    from engine.models.text_encoders import LoadedTextEncoders

    if family == "sdxl":
        return LoadedTextEncoders(family, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                  "", "")
    return LoadedTextEncoders(family, [pipe.tokenizer], [pipe.text_encoder], "", "")


def dataset_batch(image_dir: Path, size: int = 64) -> tuple[torch.Tensor, list[str]]:
    pixels, captions = [], []
    for image_path in sorted(p for p in image_dir.rglob("*") if p.suffix in (".png", ".jpg")):
        image = Image.open(image_path).convert("RGB").resize((size, size), Image.BICUBIC)
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        captions.append(image_path.with_suffix(".txt").read_text(encoding="utf-8").strip())
    return torch.stack(pixels), captions


@torch.no_grad()
def validation_loss(pipe: Any, family: str, image_dir: Path, *, v_prediction: bool = False, seed: int = 0) -> float:
    """Mean denoising loss on the dataset with fixed noise and timesteps (the same for every call)."""
    from diffusers import DDPMScheduler

    from engine.models.text_encoding import encode_captions

    pixels, captions = dataset_batch(image_dir)
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False,
                              prediction_type="v_prediction" if v_prediction else "epsilon")
    generator = torch.Generator().manual_seed(seed)
    losses = []
    encoded = encode_captions(pipeline_text_encoders(pipe, family), captions, clip_skip=1, max_token_length=75)
    for _ in range(4):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(100, 900, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, **unet_conditioning(encoded, family, latents.shape[0])).sample
        target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        losses.append(torch.nn.functional.mse_loss(prediction, target).item())
    return float(np.mean(losses))


def unet_conditioning(encoded: Any, family: str, batch: int, size: int = 64) -> dict[str, Any]:
    conditioning: dict[str, Any] = {"encoder_hidden_states": encoded.hidden_states}
    if family == "sdxl":
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)
        conditioning["added_cond_kwargs"] = {"text_embeds": encoded.pooled, "time_ids": time_ids}
    return conditioning


def make_locon_file(model_dir: Path, path: Path, metadata: dict[str, str], seed: int = 0) -> Path:
    """A LoCon (rank 4, conv rank 2) on the tiny SD1 model with random lora_up, as a trained file looks, saved in
    kohya's format with `metadata`."""
    from diffusers import UNet2DConditionModel

    from engine.models.text_encoders import load_text_encoders
    from engine.networks.lora import create_lora_network
    from engine.networks.network_file import save_network_file

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    network = create_lora_network(unet, load_text_encoders(model_dir).encoders, "sd1", dim=4, alpha=2.0,
                                  conv_dim=2, conv_alpha=1.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.3)
    save_network_file(path, network.kohya_state_dict(), metadata, save_as="safetensors")
    return path


_LOADED_MODELS: dict[str, tuple[Any, list[Any]]] = {}


def load_models(tiny_models: dict[str, Path], family: str) -> tuple[Any, list[Any]]:
    """Fresh copies of a tiny family's UNet and text encoders (each test patches its own; loading once per
    session saves time)."""
    import copy

    from diffusers import UNet2DConditionModel

    from engine.models.text_encoders import load_text_encoders

    if family not in _LOADED_MODELS:
        unet = UNet2DConditionModel.from_pretrained(tiny_models[family], subfolder="unet").eval()
        _LOADED_MODELS[family] = unet, load_text_encoders(tiny_models[family]).encoders
    return copy.deepcopy(_LOADED_MODELS[family])


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, limit: float = 300) -> None:
    """Until the run in `run_dir` has reported `step` (its process must still be running meanwhile)."""
    import time

    deadline = time.time() + limit
    while time.time() < deadline:
        events = events_of(run_dir) if (run_dir / "events.jsonl").exists() else []
        if any(e["type"] == "progress" and e["step"] >= step for e in events):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def stop_by_sigterm_then_resume(config: Path, run_dir: Path, total_steps: int, stop_after: int = 3) -> int:
    """Train `config`, SIGTERM the run once it reported `stop_after`, check it stopped gracefully with a state
    before the end, then resume from that state to the end. Returns the step it stopped at."""
    import signal

    process = subprocess.Popen([sys.executable, "-m", "engine", "train", str(config)], cwd=REPO, env=engine_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, stop_after, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    done = events_of(run_dir)[-1]
    assert done["type"] == "done" and done["stopped"], done
    stopped_at = done["global_step"]
    assert stop_after <= stopped_at < total_steps, "the run ended before the signal; nothing was resumed"
    train_here(config, "--set", f"saving.resume={done['state']!r}".replace("'", '"'))  # resuming is not the signal
    return stopped_at


def assert_same_tensors(expected_file: Path, actual_file: Path, *, rtol: float, atol: float) -> None:
    """The two safetensors files hold the same keys and, key by key, the same values within the tolerances."""
    from safetensors.torch import load_file

    expected, actual = load_file(str(expected_file)), load_file(str(actual_file))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol, msg=key)


def train_in_process(config_path: Path, monkeypatch: Any, recorder: Any, *,
                     on_micro_batch: Any = None, on_update: Any = None, on_backward: Any = None) -> Any:
    """Train the config in this process, inside `recorder` (a context manager, e.g. a dispatch mode), calling the
    given hooks before each micro-batch, each update and each backward pass; returns the finished trainer.

    Tests that watch what one training step does (which dtypes it computes in, where it waits for the device) share
    this: the run is the engine's own (build_session, Trainer), only observed.
    """
    from engine.config.io import load_config
    from engine.rundir.control import ControlChannel
    from engine.train.build import build_session
    from engine.train.reporting import RunLog
    from engine.train.trainer import Trainer

    config = load_config(config_path, check_packages=False)
    out = config_path.parent / "out"
    log = RunLog(out)
    try:
        trainer = Trainer(build_session(config, config_path.parent, out, log), ControlChannel(out))
        runner = trainer.runner
        runner.micro_batch = _before(on_micro_batch, runner.micro_batch)
        runner.update = _before(on_update, runner.update)
        monkeypatch.setattr(torch.Tensor, "backward", _before(on_backward, torch.Tensor.backward))
        with recorder:
            assert trainer.run().status == "finished"
    finally:
        log.close()
    return trainer


def _before(hook: Any, call: Any) -> Any:
    """`call`, with `hook()` run before it (or `call` itself when there is no hook)."""
    if hook is None:
        return call

    def hooked(*args: Any, **kwargs: Any) -> Any:
        hook()
        return call(*args, **kwargs)

    return hooked


def run_trainer(config_path: Path, run_dir: Path) -> Any:
    """Build and run a session in this process (resuming from `saving.resume` when set), so a test can look at the
    trainer, its session and models afterwards; the run must finish."""
    from engine.config.io import load_config
    from engine.rundir.control import ControlChannel
    from engine.train.build import build_session
    from engine.train.reporting import RunLog
    from engine.train.trainer import Trainer

    config = load_config(config_path, check_packages=False)
    log = RunLog(run_dir)
    try:
        trainer = Trainer(build_session(config, config_path.parent, run_dir, log), ControlChannel(run_dir))
        if config.saving.resume:
            trainer.resume(Path(config.saving.resume))
        outcome = trainer.run()
    finally:
        log.close()
    assert outcome.status == "finished", outcome
    return trainer


def random_up_lora(model: torch.nn.Module, family: str, text_encoders: int, seed: int = 5,
                   **options: Any) -> torch.nn.Module:
    """A rank-4 LoRA over `model` (options: conv_dim, network_args, ...), applied, with random up weights so its
    outputs and gradients are not trivial (a fresh LoRA's zero up weights would hide a wrong swap or offload)."""
    from engine.networks.lora import create_lora_network

    torch.manual_seed(seed)
    network = create_lora_network(model, [torch.nn.Identity()] * text_encoders, family, dim=4, alpha=4,
                                  train_text_encoder=False, **options)
    network.apply_to()
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.normal_(0, 0.1)
    return network
