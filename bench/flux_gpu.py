#!/usr/bin/env python
"""FLUX.1 dev LoRA training on CUDA: it/s and peak VRAM of the real-size transformer, per memory setting (issue 12).

    python bench/flux_gpu.py [--out DIR] [--configs 1024:bf16:0,1024:fp8:18,...] [--steps 6] [--warmup 2]
                             [--deadline-s 420] [--tiny]

What one configuration measures (each runs in its own subprocess, so its peak memory starts clean and an
out-of-memory error or a crash ends only that one):
- the model: `Flux(FLUX_DEV)` (19 double + 38 single blocks, hidden 3072, 11.9 B parameters) with random weights,
  made on the meta device and materialised on the GPU in bf16 with `torch.empty` + a uniform fill (seconds; no
  file is read). With `fp8` its linear weights are then stored in float8_e4m3fn (`store_in_fp8`);
- the run's order: fp8 storage -> kohya LoRA rank 16 (`create_lora_network`, FLUX.1's default targets: every
  linear layer of the double and single blocks) applied -> `place_transformer` (bf16, the last `blocks_to_swap`
  blocks' weights on the host, streamed in by `BlockSwapper`) with gradient checkpointing on -> the LoRA in float32
  on the GPU, AdamW on it, as `engine.train.placement` does;
- a step: batch 1, random 16-channel latents of the resolution (1024 px -> 128x128 latent -> 4096 packed tokens),
  T5-shaped random text (512 tokens x 4096) and CLIP-L pooled vector (768), guidance 3.5, σ drawn as
  `engine.train.flow` does, x_σ, the transformer under bf16 autocast, the velocity MSE in float32, backward,
  gradient clipping at 1.0, AdamW step;
- the transformer only: the text encoders (CLIP-L, T5-XXL) and the AE are not built or placed, as in a run with
  cached latents and text-encoder outputs (T5-XXL alone is ~9.5 GB in bf16 while it encodes);
- timing: `torch.cuda.synchronize()` after every step; the median step after `--warmup` steps, and it/s = 1 / it;
- memory: `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the warm-up and timed steps, their peaks
  reset once the model is placed (making the random weights on the GPU first is this bench's shortcut, not what
  a run does: a run loads to the host and places tensor by tensor, so its peak is the training peak measured here).

Results: one JSON line per configuration in DIR/flux_gpu.jsonl (written as each one ends) and a markdown table in
DIR/flux_gpu.md, printed last; the children's output goes to DIR/flux_gpu.log.

`--tiny` runs the same code on the CPU with a tiny FLUX (hidden 64, 2 heads, 4 + 4 blocks, text width 32) over
{32, 64} px x {bf16, fp8} x {swap 0, 2}, so the script is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "FLUX_GPU_RESULT "
GIB = 1024**3

# The configurations issue 12 asks for, most important first (a deadline cuts from the end).
DEFAULT_CONFIGS = ("1024:bf16:0,1024:fp8:0,1024:fp8:18,1024:bf16:18,"
                   "512:bf16:0,512:fp8:0,512:fp8:18,512:bf16:18")
TINY_CONFIGS = "64:bf16:0,64:fp8:0,64:fp8:2,64:bf16:2,32:bf16:0,32:fp8:2"
LORA_RANK = 16
T5_TOKENS = 512
GUIDANCE = 3.5
# Per-configuration limits in seconds: start-up and materialising (~20 s) plus (warm-up + timed) steps; swapping
# also pins ~10 GiB of host memory for the swapped weights (its speed on the device machine is unknown).
TIMEOUT_S = {1024: 150, 512: 100}
SWAP_EXTRA_S = 45
TINY_TIMEOUT_S = 120


@dataclass(frozen=True)
class Config:
    resolution: int
    fp8: bool
    blocks_to_swap: int

    @property
    def name(self) -> str:
        return f"{self.resolution}px-{'fp8' if self.fp8 else 'bf16'}-swap{self.blocks_to_swap}"

    @classmethod
    def parse(cls, text: str) -> Config:
        """`RES:bf16|fp8:SWAP`, e.g. `1024:fp8:18`."""
        try:
            resolution, base, swap = text.strip().split(":")
            if base not in ("bf16", "fp8"):
                raise ValueError(base)
            return cls(int(resolution), base == "fp8", int(swap))
        except ValueError as error:
            raise SystemExit(f"--configs: {text!r} is not RES:bf16|fp8:SWAP (e.g. 1024:fp8:18): {error}") from error


# --------------------------------------------------------------------------------------------------- one config


def model_params(tiny: bool) -> Any:
    from engine.models.flux.params import FLUX_DEV, FluxParams

    if not tiny:
        return FLUX_DEV
    return FluxParams(hidden_size=64, num_heads=2, depth=4, depth_single_blocks=4, context_in_dim=32,
                      vec_in_dim=32, axes_dim=(4, 14, 14))


def random_flux(params: Any, device: str, dtype: Any, seed: int) -> Any:
    """`Flux(params)` with random weights straight on `device` in `dtype`: built on the meta device (no memory, no
    init), then `to_empty` and one fill kernel per tensor (linear weights uniform ±1/sqrt(fan_in), biases 0, norm
    scales 1), instead of a float32 init on the host and a 24 GB copy."""
    import torch

    from engine.models.flux.transformer import Flux

    with torch.device("meta"):
        model = Flux(params).to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                bound = 1.0 / math.sqrt(param.shape[1])
                param.uniform_(-bound, bound)
            elif name.endswith(".scale"):
                param.fill_(1.0)
            else:
                param.zero_()
    return model


def _memory_functions() -> tuple[Any, Any]:
    """(store_in_fp8, place_transformer) from engine.models.flux.fp8 and engine.models.flux.block_swap."""
    from engine.models.flux.block_swap import place_transformer
    from engine.models.flux.fp8 import store_in_fp8

    return store_in_fp8, place_transformer


def prepare(config: Config, tiny: bool, device: str) -> dict[str, Any]:
    """The model, LoRA, optimizer and fixed inputs of one configuration, placed as a run places them."""
    import torch
    from torch import nn

    from engine.networks.lora import create_lora_network

    store_in_fp8, place_transformer = _memory_functions()
    params = model_params(tiny)
    dtype = torch.bfloat16
    model = random_flux(params, device, dtype, seed=0)
    model.requires_grad_(False)
    if config.fp8:
        store_in_fp8(model, dtype)  # before the LoRA wraps the layers, as engine.train.build does
    # FLUX.1 has two text encoders (CLIP-L, T5); none is trained or measured, so empty stand-ins fill their places.
    network = create_lora_network(model, [nn.Module(), nn.Module()], "flux1", dim=LORA_RANK, alpha=float(LORA_RANK),
                                  train_text_encoder=False)
    network.apply_to()
    model.enable_gradient_checkpointing()
    swapper = place_transformer(model, device, dtype, blocks_to_swap=config.blocks_to_swap)
    model.train(True)
    network.to(device=device, dtype=torch.float32).train(True)
    parameters = network.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    latent = config.resolution // 8
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "x0": torch.randn(1, params.in_channels // 4, latent, latent, generator=generator).to(device),
        "txt": torch.randn(1, T5_TOKENS, params.context_in_dim, generator=generator).to(device, dtype),
        "y": torch.randn(1, params.vec_in_dim, generator=generator).to(device, dtype),
    }
    host = sum(p.numel() * p.element_size() for p in swapper.swapped_parameters()) if swapper is not None else 0
    return {"model": model, "network": network, "swapper": swapper, "optimizer": optimizer,
            "parameters": parameters, "inputs": inputs, "generator": generator, "host_bytes": host,
            "lora_modules": sum(network.module_count().values()),
            "lora_parameters": sum(p.numel() for p in parameters)}


def train_step(state: dict[str, Any], device: str) -> float:
    """One flow-matching LoRA step (engine.train.objectives.FlowObjective's maths); returns the loss."""
    import torch

    from engine.train import flow

    model, inputs, generator = state["model"], state["inputs"], state["generator"]
    x0, txt, y = inputs["x0"], inputs["txt"], inputs["y"]
    height, width = x0.shape[-2:]
    dtype = torch.bfloat16
    noise = torch.randn(x0.shape, generator=generator).to(device)
    sigmas = flow.sample_sigmas(1, flow.FlowSettings(), (height, width), generator, device)
    noisy = flow.noisy_input(x0, noise, sigmas)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        packed = model(img=flow.pack_latents(noisy).to(dtype),
                       img_ids=flow.image_ids(1, (height, width), device=device, dtype=dtype),
                       txt=txt, txt_ids=flow.text_ids(1, txt.shape[1], device=device, dtype=dtype),
                       timesteps=sigmas.to(dtype), y=y,
                       guidance=torch.full((1,), GUIDANCE, device=device, dtype=dtype))
    prediction = flow.unpack_latents(packed.float(), (height, width))
    loss = torch.nn.functional.mse_loss(prediction, flow.velocity_target(x0, noise).float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state["parameters"], 1.0)
    state["optimizer"].step()
    state["optimizer"].zero_grad(set_to_none=True)
    return loss.item()  # a host sync on its own; the explicit synchronize below makes the timing not depend on it


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(config: Config, tiny: bool, device: str, steps: int, warmup: int) -> dict[str, Any]:
    """Build, place, run `warmup` + `steps` steps; the record of :func:`run_one`."""
    import torch

    cuda = device.startswith("cuda")
    start = time.perf_counter()
    state = prepare(config, tiny, device)
    record: dict[str, Any] = {"lora_modules": state["lora_modules"], "lora_parameters": state["lora_parameters"],
                              "host_swapped_gib": state["host_bytes"] / GIB}
    if cuda:
        import gc

        gc.collect()
        torch.cuda.empty_cache()  # what making the model on the GPU and moving swapped blocks out left cached
        _synchronize(device)
        record["setup_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        record["placed_allocated_gib"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    record["setup_s"] = time.perf_counter() - start
    times, losses = [], []
    try:
        for _ in range(warmup + steps):
            began = time.perf_counter()
            losses.append(train_step(state, device))
            _synchronize(device)
            times.append(time.perf_counter() - began)
    finally:
        record["steps_done"] = len(times)
        if cuda:
            record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    timed = times[warmup:]
    record |= {"step_s": timed, "warmup_step_s": times[:warmup], "median_step_s": statistics.median(timed),
               "it_s": 1.0 / statistics.median(timed), "loss_last": losses[-1],
               "loss_finite": all(math.isfinite(loss) for loss in losses)}
    if state["swapper"] is not None:
        record["swap_ins"] = state["swapper"].swap_ins
    return record


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def run_one(config: Config, tiny: bool, device: str, steps: int, warmup: int) -> dict[str, Any]:
    """The whole record of one configuration (status "ok" or "oom"); other errors propagate."""
    import torch

    record: dict[str, Any] = {"config": config.name, **asdict(config), "tiny": tiny, "device": device,
                              "lora_rank": LORA_RANK, "batch": 1, "t5_tokens": T5_TOKENS,
                              "image_tokens": (config.resolution // 16) ** 2, "steps": steps, "warmup": warmup,
                              "torch": torch.__version__}
    if device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(device)
        record["gpu_total_gib"] = torch.cuda.mem_get_info(device)[1] / GIB
    try:
        record |= measure(config, tiny, device, steps, warmup)
        record["status"] = "ok"
    except torch.cuda.OutOfMemoryError as error:
        record |= {"status": "oom", "error": str(error).splitlines()[0]}
        if device.startswith("cuda"):
            record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    record["peak_rss_gib"] = peak_rss_gib()
    return record


def child_main(config_text: str, tiny: bool, device: str, steps: int, warmup: int) -> int:
    sys.path.insert(0, str(REPO))
    if device == "cpu":
        import torch

        # The CPU run only tests the script: one thread, because on a shared, loaded machine torch's threads wait on
        # each other (a tiny step took 14 s with 2 threads against 0.8 s with 1).
        torch.set_num_threads(1)
    record = run_one(Config.parse(config_text), tiny, device, steps, warmup)
    print(RESULT_TAG + json.dumps(record), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------ driver


def run_child(config: Config, args: argparse.Namespace, device: str, timeout: float, log: Any) -> dict[str, Any]:
    """Run one configuration in a subprocess; its record, or one saying why there is none."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", f"{config.resolution}:"
               f"{'fp8' if config.fp8 else 'bf16'}:{config.blocks_to_swap}", "--device", device,
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])
    base = {"config": config.name, **asdict(config), "tiny": args.tiny, "device": device}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as expired:
        _log(log, config, _text(expired.stdout), _text(expired.stderr))
        return base | {"status": "timeout", "error": f"no result within {timeout:.0f} s (killed)",
                       "wall_s": time.perf_counter() - started}
    _log(log, config, done.stdout, done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1][len(RESULT_TAG):]) | {"wall_s": time.perf_counter() - started}
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]  # the exception's own line
    status = "oom" if "OutOfMemoryError" in done.stderr or "out of memory" in done.stderr else "error"
    return base | {"status": status, "returncode": done.returncode, "error": tail,
                   "wall_s": time.perf_counter() - started}


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _log(log: Any, config: Config, stdout: str, stderr: str) -> None:
    log.write(f"===== {config.name}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
    log.flush()


def _gib(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    return "" if value is None else f"{value:.2f}"


def markdown(records: list[dict[str, Any]], tiny: bool) -> str:
    first = next((r for r in records if r.get("status") == "ok"), records[0] if records else {})
    what = "tiny FLUX on the CPU (a test of the script)" if tiny else "FLUX.1 dev architecture, random weights"
    lines = [
        f"{what}; {first.get('gpu', first.get('device', '?'))}, torch {first.get('torch', '?')}; LoRA rank "
        f"{LORA_RANK} (AdamW, float32), batch 1, bf16 autocast, gradient checkpointing, T5 {T5_TOKENS} tokens; "
        "transformer only (no text encoders, no AE); median of "
        f"{first.get('steps', '?')} steps after {first.get('warmup', '?')} warm-up.",
        "",
        "| px | base | blocks_to_swap | it/s | s/step | peak allocated GiB | peak reserved GiB | "
        "placed GiB | swapped to host GiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        it_s = f"{r['it_s']:.3f}" if "it_s" in r else ""
        step = f"{r['median_step_s']:.3f}" if "median_step_s" in r else ""
        status = r.get("status", "?") + ("" if r.get("status") == "ok" else f" ({r.get('error', '')[:80]})")
        lines.append(f"| {r['resolution']} | {'fp8' if r['fp8'] else 'bf16'} | {r['blocks_to_swap']} | {it_s} | "
                     f"{step} | {_gib(r, 'peak_allocated_gib')} | {_gib(r, 'peak_reserved_gib')} | "
                     f"{_gib(r, 'placed_allocated_gib')} | {_gib(r, 'host_swapped_gib')} | "
                     f"{status.replace('|', '/').replace(chr(10), ' ')} |")
    return "\n".join(lines) + "\n"


def driver_main(args: argparse.Namespace) -> int:
    device = args.device or ("cpu" if args.tiny else "cuda")
    if not args.tiny and not device.startswith("cuda"):
        raise SystemExit("flux_gpu.py: the real-size FLUX needs a CUDA device (24 GB of weights, minutes a step on a "
                         "CPU); pass --tiny to test the script on the CPU")
    configs = [Config.parse(text) for text in (args.configs or (TINY_CONFIGS if args.tiny else DEFAULT_CONFIGS))
               .split(",") if text.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.deadline_s
    records: list[dict[str, Any]] = []
    with open(out / "flux_gpu.jsonl", "w") as jsonl, open(out / "flux_gpu.log", "w") as log:
        for config in configs:
            left = deadline - time.monotonic()
            own = args.config_timeout_s or (TINY_TIMEOUT_S if args.tiny else TIMEOUT_S.get(config.resolution, 150)
                                            + (SWAP_EXTRA_S if config.blocks_to_swap else 0))
            limit = min(own, left)
            if limit < min(own, 30):  # too little left for a configuration to finish: say so instead
                record = {"config": config.name, **asdict(config), "status": "skipped",
                          "error": f"--deadline-s {args.deadline_s:.0f} reached"}
            else:
                record = run_child(config, args, device, limit, log)
            records.append(record)
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            print(f"{config.name}: {record.get('status')} it/s={record.get('it_s', float('nan')):.3f} "
                  f"peak_alloc={record.get('peak_allocated_gib', float('nan')):.2f} GiB "
                  f"wall={record.get('wall_s', 0):.0f} s {record.get('error', '')[:200]}", flush=True)
    table = markdown(records, args.tiny)
    (out / "flux_gpu.md").write_text(table)
    print(table)
    return 0 if all(r.get("status") in ("ok", "oom") for r in records) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "test-output" / "flux_gpu"), help="folder for the results")
    parser.add_argument("--configs", help=f"RES:bf16|fp8:SWAP,... in order (default {DEFAULT_CONFIGS})")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 6; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; 1 with --tiny)")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="skip configurations past this many seconds")
    parser.add_argument("--config-timeout-s", type=float, help="limit per configuration (default 150 s at 1024 px, "
                        "100 s at 512 px, 45 s more with swapping, 120 s with --tiny)")
    parser.add_argument("--device", help="cuda (default) or cpu (--tiny's default)")
    parser.add_argument("--tiny", action="store_true", help="tiny FLUX on the CPU: tests this script")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else 2 if args.tiny else 6
    args.warmup = args.warmup if args.warmup is not None else 1 if args.tiny else 2
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.tiny, args.device or "cpu", args.steps, args.warmup)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
