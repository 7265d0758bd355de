#!/usr/bin/env python
"""SD1.5 and SDXL LoRA training on CUDA: the engine's it/s and peak VRAM at real size, and its step time over the
same step on pre-made tensors (issues 16 and 18).

    python bench/sd_gpu.py [--out DIR] [--configs NAME,...] [--steps 30] [--deadline-s 300] [--tiny]

Each configuration runs in its own process (`--child NAME`), so its peak memory starts clean:
- the model: a real-size SD1.5 or SDXL single-file checkpoint with random weights, built from the shipped diffusers
  configs on the meta device and filled on the GPU (weights uniform ±1/sqrt(fan_in), norm scales 1, biases 0),
  written once per family in fp16 (no download) and read by the engine like any checkpoint;
- the engine: `run_training` in the child on a folder of random images at the resolution (captions "a photo"),
  latents and text-encoder outputs cached, a kohya LoRA rank 16 on the UNet only, the configuration's optimizer at
  1e-4, gradient clipping 1.0, the configuration's mixed precision, attention and checkpointing; its step time is
  the median gap between `progress` events after the first 5 steps, its peak the last `progress` event's
  `gpu_peak_mib` (PyTorch's peak allocation since training began);
- the plan: `python -m engine plan`'s estimate of the run's peak (engine.plan.make_plan, before the run) and its
  error against the engine's measured peak;
- the limit: the same model loaded the same way, the same LoRA and optimizer, one fixed batch of pre-made latents
  and text embeddings on the GPU, noise and timesteps drawn on the GPU, the UNet under autocast, MSE, backward
  (fp16: through a GradScaler), clipping, step, `torch.cuda.synchronize()` after every step; median after 5 steps.
The model files and run folders go to $SD_GPU_WORK (default /tmp/sd_gpu_work), never under DIR.
Results: one JSON line per configuration in DIR/sd_gpu.jsonl and a markdown table in DIR/sd_gpu.md (printed last);
the children's output in DIR/sd_gpu.log. `--tiny` runs the same code on the CPU with the tiny SD1 model at 64 px,
so the script is tested where no GPU is (figures meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 5
LORA_RANK = 16


@dataclass(frozen=True)
class SdConfig:
    family: str  # "sd1" | "sdxl"
    resolution: int
    batch_size: int
    precision: str  # "fp16" | "bf16"
    checkpointing: bool = False
    optimizer: str = "AdamW"
    attention: str = "sdpa"


# Most important first: a deadline cuts from the end.
CONFIGS = {
    "sd15-512-b4-fp16": SdConfig("sd1", 512, 4, "fp16"),
    "sdxl-1024-b1-bf16-gc": SdConfig("sdxl", 1024, 1, "bf16", checkpointing=True),
    "sd15-512-b4-bf16": SdConfig("sd1", 512, 4, "bf16"),
    "sd15-512-b1-fp16": SdConfig("sd1", 512, 1, "fp16"),
    "sd15-512-b4-fp16-adamw8bit": SdConfig("sd1", 512, 4, "fp16", optimizer="AdamW8bit"),
    "sdxl-1024-b1-bf16-gc-adamw8bit": SdConfig("sdxl", 1024, 1, "bf16", checkpointing=True, optimizer="AdamW8bit"),
    "sd15-512-b4-fp16-xformers": SdConfig("sd1", 512, 4, "fp16", attention="xformers"),
}
TINY = SdConfig("sd1", 64, 2, "bf16")
CHILD_LIMIT_S = {"sd1": 150, "sdxl": 240}  # the model file's first build, loading, caching and the steps


# ------------------------------------------------------------------------------------------------- the model


def build_checkpoint(family: str, path: Path, device: str) -> Path:
    """A real-size `family` checkpoint with random weights, built on `device` and written in fp16 (once)."""
    import torch

    from engine.models.ldm_checkpoint import write_pipeline_checkpoint

    if path.is_file():
        return path
    configs = REPO / "engine" / "models" / "configs" / family
    components = {name: _random_component(configs / name, device)
                  for name in ("unet", "vae", "text_encoder", "text_encoder_2") if (configs / name).is_dir()}
    write_pipeline_checkpoint(components, family, path, {}, dtype=torch.float16)
    return path


def _random_component(folder: Path, device: str) -> Any:
    """One pipeline component of the shipped config in `folder`, random float16 weights (gpu_driver.random_model)."""
    import torch
    from gpu_driver import random_model

    config = json.loads((folder / "config.json").read_text())
    if folder.name == "unet":
        from diffusers import UNet2DConditionModel as Model
    elif folder.name == "vae":
        from diffusers import AutoencoderKL as Model
    else:
        import transformers

        Model = getattr(transformers, config["architectures"][0])

    def build() -> Any:
        return Model.from_config(config) if hasattr(Model, "from_config") else \
            Model(Model.config_class.from_dict(config))

    module = random_model(build, device, torch.float16, seed=0,
                          is_scale=lambda name: "norm" in name and name.endswith("weight"))
    with torch.no_grad():
        for name, buffer in module.named_buffers():  # CLIP's position ids; random_model leaves buffers empty
            if "position_ids" in name:
                buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
    return module


# ------------------------------------------------------------------------------------------------- the engine


def write_images(folder: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    images = folder / "10_photo"
    images.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        pixels = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{index:02d}.png")
        (images / f"{index:02d}.txt").write_text("a photo")
    return folder


def run_config(config: SdConfig, model: Path, dataset: Path, folder: Path, steps: int) -> Path:
    from engine.config.io import deep_merge, default_config_dict, save_config
    from engine.config.schema import RunConfig

    data = deep_merge(default_config_dict(), {
        "model": {"pretrained_model_name_or_path": str(model), "model_family": config.family},
        "network": {"network_dim": LORA_RANK, "network_alpha": float(LORA_RANK), "train_unet_only": True},
        "dataset": {"train_data_dir": str(dataset),
                    "general": {"resolution": config.resolution, "batch_size": config.batch_size,
                                "enable_bucket": False, "min_bucket_reso": min(256, config.resolution)}},
        "optimizer": {"optimizer_type": config.optimizer, "learning_rate": 1e-4, "lr_scheduler": "constant",
                      "max_grad_norm": 1.0},
        "training": {"max_train_epochs": 0, "max_train_steps": steps, "mixed_precision": config.precision,
                     "cache_latents": True, "cache_text_encoder_outputs": True, "attention": config.attention,
                     "gradient_checkpointing": config.checkpointing, "seed": 1},
        "saving": {"output_dir": str(folder / "out"), "output_name": "lora", "save_every_n_epochs": 0},
    })
    path = folder / "config.toml"
    save_config(RunConfig.model_validate(data, context={"check_packages": False}), path)
    return path


def engine_figures(config_path: Path) -> dict[str, Any]:
    from engine.config.io import load_config
    from engine.train.run import run_training

    run_dir = config_path.parent / "run"
    code = run_training(load_config(config_path), config_path.parent, run_dir=run_dir)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    if code != 0:
        errors = [event.get("message") for event in events if event["type"] == "error"]
        raise RuntimeError(f"engine run failed ({code}): {errors}")
    progress = [event for event in events if event["type"] == "progress"]
    gaps = [b["time"] - a["time"] for a, b in zip(progress[WARMUP_STEPS:], progress[WARMUP_STEPS + 1:], strict=False)]
    last = progress[-1]
    return {"engine_step_s": statistics.median(gaps), "engine_peak_gib": last.get("gpu_peak_mib", 0) / 1024,
            "engine_reserved_gib": last.get("gpu_reserved_mib", 0) / 1024,
            "engine_rss_peak_gib": last.get("rss_peak_mib", 0) / 1024}


def plan_figures(config_path: Path) -> dict[str, Any]:
    """`python -m engine plan`'s estimate of the same run (before it, on the CPU: fake tensors)."""
    from engine.config.io import load_config
    from engine.plan import make_plan

    started = time.perf_counter()
    plan = make_plan(load_config(config_path), config_path.parent)
    return {"plan_peak_gib": plan.gpu_peak / 2**30, "plan_needed_gib": plan.gpu_needed / 2**30,
            "plan_fits": plan.fits, "plan_s": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------- the limit


def limit_figures(config: SdConfig, model_path: Path, device: str, steps: int) -> dict[str, Any]:
    """The same LoRA step on one fixed batch of pre-made tensors (see the module docstring)."""
    import torch

    from engine.models.loading import load_model
    from engine.networks.lora import create_lora_network

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[config.precision]
    model = load_model(model_path, family=config.family)
    unet = model.unet.to(device, dtype).requires_grad_(False)
    if config.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train(config.checkpointing)
    if config.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    network = create_lora_network(unet, model.text.encoders, config.family, dim=LORA_RANK, alpha=float(LORA_RANK),
                                  train_text_encoder=False)
    network.apply_to()
    network.to(device=device, dtype=torch.float32)
    del model
    parameters = [p for p in network.parameters() if p.requires_grad]
    optimizer = _optimizer(config.optimizer, parameters)
    scaler = torch.amp.GradScaler(torch.device(device).type) if config.precision == "fp16" else None
    batch, latent = config.batch_size, config.resolution // 8
    torch.manual_seed(0)
    x0 = torch.randn(batch, 4, latent, latent, device=device)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    extra = {}
    if config.family == "sdxl":
        size = float(config.resolution)
        extra = {"added_cond_kwargs": {
            "text_embeds": torch.randn(batch, unet.config.projection_class_embeddings_input_dim
                                       - 6 * unet.config.addition_time_embed_dim, device=device, dtype=dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)}}
    alphas = torch.linspace(0.9991, 0.0047, 1000, device=device)  # a fixed schedule: the cost, not the maths
    static = 0.0
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated() / 2**30  # frozen weights, the LoRA and the batch: before any step
    marks = [time.perf_counter()]
    for _ in range(steps):
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        with torch.autocast(torch.device(device).type, dtype=dtype):
            prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=states, **extra).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    gaps = [b - a for a, b in zip(marks[WARMUP_STEPS:], marks[WARMUP_STEPS + 1:], strict=False)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"limit_step_s": statistics.median(gaps), "limit_peak_gib": peak, "limit_static_gib": static,
            "lora_parameters": sum(p.numel() for p in parameters)}


def _optimizer(name: str, parameters: list[Any]) -> Any:
    import torch

    if name == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=1e-4)
    return torch.optim.AdamW(parameters, lr=1e-4)


# ------------------------------------------------------------------------------------------------- processes


def missing_package(config: SdConfig) -> str | None:
    """The package a configuration needs that this Python lacks (the configuration is then skipped)."""
    import importlib.util

    needed = {"AdamW8bit": "bitsandbytes"}.get(config.optimizer) or \
        ("xformers" if config.attention == "xformers" else None)
    return needed if needed and importlib.util.find_spec(needed) is None else None


def child(name: str, out: Path, steps: int, tiny: bool) -> dict[str, Any]:
    import torch

    config = TINY if tiny else CONFIGS[name]
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    work = Path(os.environ.get("SD_GPU_WORK", "/tmp/sd_gpu_work"))  # model files of gigabytes: never under --out
    if tiny:
        sys.path.insert(0, str(REPO / "tools"))
        from make_tiny_model import build_all

        model = build_all(Path(os.environ.get("ATELIER_TINY_MODELS", work / "tiny")), ["sd1"])["sd1_ckpt"]
    else:
        model = build_checkpoint(config.family, work / f"{config.family}-random.safetensors", device)
        torch.cuda.empty_cache()
    folder = work / name
    dataset = write_images(folder / "data", max(8, 2 * config.batch_size), config.resolution)
    record: dict[str, Any] = {"name": name, **asdict(config), "steps": steps, "device": device}
    config_path = run_config(config, model, dataset, folder, steps)
    record.update(plan_figures(config_path))
    record.update(engine_figures(config_path))
    if record.get("engine_peak_gib"):
        record["plan_error"] = record["plan_peak_gib"] / record["engine_peak_gib"] - 1
    if device == "cuda":
        torch.cuda.empty_cache()
    record.update(limit_figures(config, model, device, steps))
    record["engine_over_limit"] = record["engine_step_s"] / record["limit_step_s"]
    record["engine_it_s"] = 1 / record["engine_step_s"]
    return record


def driver(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["tiny"] if args.tiny else [n.strip() for n in (args.configs or ",".join(CONFIGS)).split(",")]
    deadline = time.monotonic() + args.deadline_s
    records = []
    with (out / "sd_gpu.log").open("a") as log, (out / "sd_gpu.jsonl").open("a") as jsonl:
        for name in names:
            config = TINY if args.tiny else CONFIGS[name]
            left = deadline - time.monotonic()
            skip = missing_package(config)
            if skip or left < 45:
                record = {"name": name, "skipped": f"{skip} is not installed" if skip else "out of time"}
            else:
                record = run_child(name, args, min(CHILD_LIMIT_S[config.family], left), log)
            records.append(record)
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            print(json.dumps(record), flush=True)
    table = markdown(records)
    (out / "sd_gpu.md").write_text(table)
    print(table)
    return 0 if all("error" not in record for record in records) else 1


def run_child(name: str, args: argparse.Namespace, limit: float, log: Any) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", args.out,
               "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    started = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=REPO)
    except subprocess.TimeoutExpired as error:
        log.write(f"== {name}: over {limit:.0f} s\n{error.stdout or ''}{error.stderr or ''}\n")
        return {"name": name, "error": f"over its {limit:.0f} s limit"}
    log.write(f"== {name} (exit {result.returncode}, {time.monotonic() - started:.0f} s)\n"
              f"{result.stdout}{result.stderr}\n")
    log.flush()
    for line in result.stdout.splitlines():
        if line.startswith("SD_GPU_RESULT "):
            return json.loads(line[len("SD_GPU_RESULT "):])
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    kind = "out of memory" if "OutOfMemoryError" in result.stderr else "failed"
    return {"name": name, "error": f"{kind}: {' / '.join(tail)}"}


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| configuration | engine it/s | engine step ms | limit step ms | engine / limit | engine peak GiB "
             "| plan GiB | plan error | limit peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        if "engine_step_s" not in record:
            lines.append(f"| {record['name']} | {record.get('skipped') or record.get('error')} | | | | | | | |")
            continue
        lines.append(f"| {record['name']} | {record['engine_it_s']:.2f} | {record['engine_step_s'] * 1000:.1f} "
                     f"| {record['limit_step_s'] * 1000:.1f} | {record['engine_over_limit']:.3f} "
                     f"| {record['engine_peak_gib']:.2f} | {record['plan_peak_gib']:.2f} "
                     f"| {record.get('plan_error', float('nan')):+.1%} | {record['limit_peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "test-output" / "sd_gpu"))
    parser.add_argument("--configs", default="", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--deadline-s", type=float, default=300)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    if args.child:
        print("SD_GPU_RESULT " + json.dumps(child(args.child, Path(args.out), args.steps, args.tiny)), flush=True)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
