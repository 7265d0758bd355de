"""The driver shared by the CUDA training benches (bench/flux_gpu.py, bench/sd3_gpu.py): configurations, one
subprocess per configuration, timing, peak memory, the JSON lines and the markdown table.

A bench script is a thin plug-in: it describes its model in a :class:`Bench` (how to build, place and train it for
one :class:`Config`, and what to call its files) and calls :func:`main` with it. Run as
`python bench/<name>.py [--out DIR] [--configs RES:bf16|fp8:SWAP,...] [--steps N] [--warmup N] [--deadline-s S]
[--tiny]`; each configuration runs as `python bench/<name>.py --child RES:BASE:SWAP ...` in its own process, so its
peak memory starts clean and an out-of-memory error or a crash ends only that one.

What a configuration measures, whatever the model:
- the run's order: random weights made on the meta device and filled on the device (:func:`random_model`; no file
  is read) -> with `fp8` the linear weights stored in float8_e4m3fn (`store_in_fp8`) -> a kohya LoRA rank 16
  applied -> `place_transformer` (bf16, the last `blocks_to_swap` blocks' weights on the host, streamed in by
  `BlockSwapper`) with gradient checkpointing on -> the LoRA in float32 on the device, AdamW on it, as
  `engine.train.placement` does (all in the plug-in's `prepare`);
- a step (the plug-in's `train_step`): batch 1, random latents and text-encoder outputs of the real shapes, the
  family's objective under bf16 autocast, the loss in float32, backward, clipping at 1.0, AdamW step;
- the transformer only: no text encoders or VAE/AE, as in a run with cached latents and text-encoder outputs;
- timing: `torch.cuda.synchronize()` after every step; the median step after `--warmup` steps, it/s = 1 / it;
- memory: `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the warm-up and timed steps, their peaks
  reset once the model is placed (making the random weights on the GPU first is the bench's shortcut, not what a
  run does: a run loads to the host and places tensor by tensor, so its peak is the training peak measured here).

Results: one JSON line per configuration in DIR/<name>.jsonl (written as each one ends) and a markdown table in
DIR/<name>.md, printed last; the children's output goes to DIR/<name>.log. `--tiny` runs the same code on the CPU
with the plug-in's tiny model, so a script is tested where no GPU is.
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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
LORA_RANK = 16
TINY_TIMEOUT_S = 120


@dataclass(frozen=True)
class Config:
    resolution: int
    fp8: bool
    blocks_to_swap: int

    @property
    def name(self) -> str:
        return f"{self.resolution}px-{self.base}-swap{self.blocks_to_swap}"

    @property
    def base(self) -> str:
        return "fp8" if self.fp8 else "bf16"

    @property
    def text(self) -> str:
        """The `RES:BASE:SWAP` form :meth:`parse` reads."""
        return f"{self.resolution}:{self.base}:{self.blocks_to_swap}"

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


@dataclass(frozen=True)
class Bench:
    """One model's plug-in.

    `prepare(config, tiny, device)` returns the state `train_step(state, device) -> loss` works on; it holds at
    least "swapper" (a BlockSwapper or None), "host_bytes", "lora_modules" and "lora_parameters".
    `record_fields(config)` adds the model's own figures (token counts) to every record.
    """

    name: str  # the files' stem (DIR/<name>.jsonl, .md, .log) and the children's result tag
    script: Path  # the plug-in file the children run
    title: str  # what the table measures, e.g. "FLUX.1 dev architecture, random weights"
    tiny_title: str
    inputs: str  # the step's inputs in the table's first line, e.g. "T5 512 tokens"
    default_configs: str  # most important first: a deadline cuts from the end
    tiny_configs: str
    timeout_s: Mapping[int, float]  # per resolution: start-up and materialising plus the steps
    swap_extra_s: float  # more with swapping (pinning host memory for the swapped weights)
    prepare: Callable[[Config, bool, str], dict[str, Any]]
    train_step: Callable[[dict[str, Any], str], float]
    record_fields: Callable[[Config], dict[str, Any]]

    @property
    def result_tag(self) -> str:
        return f"{self.name.upper()}_RESULT "

    def limit_s(self, config: Config) -> float:
        return self.timeout_s.get(config.resolution, max(self.timeout_s.values())) + (
            self.swap_extra_s if config.blocks_to_swap else 0)


# ----------------------------------------------------------------------------------------- helpers for plug-ins


def random_model(build: Callable[[], Any], device: str, dtype: Any, seed: int, *,
                 is_scale: Callable[[str], bool]) -> Any:
    """`build()`'s module with random weights straight on `device` in `dtype`: built on the meta device (no memory,
    no init), then `to_empty` and one fill kernel per tensor (weights of 2 or more dimensions uniform
    ±1/sqrt(fan_in), 1-D norm scales (`is_scale(name)`) 1, other 1-D tensors (biases) 0), instead of a float32 init
    on the host and a copy of gigabytes. Buffers are left empty: the plug-in refills those its model needs."""
    import torch

    with torch.device("meta"):
        model = build().to(dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                bound = 1.0 / math.sqrt(param[0].numel())  # fan_in of a linear or a convolution
                param.uniform_(-bound, bound)
            elif is_scale(name):
                param.fill_(1.0)
            else:
                param.zero_()
    return model


def memory_functions() -> tuple[Any, Any]:
    """(store_in_fp8, place_transformer) from engine.models.flux.fp8 and engine.models.flux.block_swap."""
    from engine.models.flux.block_swap import place_transformer
    from engine.models.flux.fp8 import store_in_fp8

    return store_in_fp8, place_transformer


def lora_and_place(model: Any, encoders: int, family: str, config: Config, device: str) -> dict[str, Any]:
    """fp8 storage, the LoRA, checkpointing, placement, the LoRA on the device and AdamW, in a run's order
    (engine.train.build / placement). `encoders` empty stand-ins fill the text encoders' places: none is trained
    or measured. The state's common keys (see :class:`Bench`)."""
    import torch
    from torch import nn

    from engine.networks.lora import create_lora_network

    store_in_fp8, place_transformer = memory_functions()
    dtype = torch.bfloat16
    model.requires_grad_(False)
    if config.fp8:
        store_in_fp8(model, dtype)  # before the LoRA wraps the layers, as engine.train.build does
    network = create_lora_network(model, [nn.Module() for _ in range(encoders)], family, dim=LORA_RANK,
                                  alpha=float(LORA_RANK), train_text_encoder=False)
    network.apply_to()
    model.enable_gradient_checkpointing()
    swapper = place_transformer(model, device, dtype, blocks_to_swap=config.blocks_to_swap)
    model.train(True)
    network.to(device=device, dtype=torch.float32).train(True)
    parameters = network.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    host = sum(p.numel() * p.element_size() for p in swapper.swapped_parameters()) if swapper is not None else 0
    return {"model": model, "network": network, "swapper": swapper, "optimizer": optimizer,
            "parameters": parameters, "host_bytes": host, "lora_modules": sum(network.module_count().values()),
            "lora_parameters": sum(p.numel() for p in parameters)}


def finish_step(state: dict[str, Any], loss: Any) -> float:
    """Backward, clip to 1.0, AdamW step, zero; the loss as a float."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(state["parameters"], 1.0)
    state["optimizer"].step()
    state["optimizer"].zero_grad(set_to_none=True)
    return loss.item()  # a host sync on its own; the explicit synchronize after the step makes timing not need it


# --------------------------------------------------------------------------------------------------- one config


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(bench: Bench, config: Config, tiny: bool, device: str, steps: int, warmup: int) -> dict[str, Any]:
    """Build, place, run `warmup` + `steps` steps; the record of :func:`run_one`."""
    import torch

    cuda = device.startswith("cuda")
    start = time.perf_counter()
    state = bench.prepare(config, tiny, device)
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
            losses.append(bench.train_step(state, device))
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


def run_one(bench: Bench, config: Config, tiny: bool, device: str, steps: int, warmup: int) -> dict[str, Any]:
    """The whole record of one configuration (status "ok" or "oom"); other errors propagate."""
    import torch

    record: dict[str, Any] = {"config": config.name, **asdict(config), "tiny": tiny, "device": device,
                              "lora_rank": LORA_RANK, "batch": 1, **bench.record_fields(config), "steps": steps,
                              "warmup": warmup, "torch": torch.__version__}
    if device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(device)
        record["gpu_total_gib"] = torch.cuda.mem_get_info(device)[1] / GIB
    try:
        record |= measure(bench, config, tiny, device, steps, warmup)
        record["status"] = "ok"
    except torch.cuda.OutOfMemoryError as error:
        record |= {"status": "oom", "error": str(error).splitlines()[0]}
        if device.startswith("cuda"):
            record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    record["peak_rss_gib"] = peak_rss_gib()
    return record


def child_main(bench: Bench, config_text: str, tiny: bool, device: str, steps: int, warmup: int) -> int:
    if device == "cpu":
        import torch

        # The CPU run only tests the script: one thread, because on a shared, loaded machine torch's threads wait on
        # each other (a tiny step took 14 s with 2 threads against 0.8 s with 1).
        torch.set_num_threads(1)
    record = run_one(bench, Config.parse(config_text), tiny, device, steps, warmup)
    print(bench.result_tag + json.dumps(record), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------ driver


def run_child(bench: Bench, config: Config, args: argparse.Namespace, device: str, timeout: float,
              log: Any) -> dict[str, Any]:
    """Run one configuration in a subprocess; its record, or one saying why there is none."""
    command = [sys.executable, str(bench.script), "--child", config.text, "--device", device,
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
    lines = [line for line in done.stdout.splitlines() if line.startswith(bench.result_tag)]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1][len(bench.result_tag):]) | {"wall_s": time.perf_counter() - started}
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


def markdown(bench: Bench, records: list[dict[str, Any]], tiny: bool) -> str:
    first = next((r for r in records if r.get("status") == "ok"), records[0] if records else {})
    what = bench.tiny_title if tiny else bench.title
    lines = [
        f"{what}; {first.get('gpu', first.get('device', '?'))}, torch {first.get('torch', '?')}; LoRA rank "
        f"{LORA_RANK} (AdamW, float32), batch 1, bf16 autocast, gradient checkpointing, {bench.inputs}; "
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


def driver_main(bench: Bench, args: argparse.Namespace) -> int:
    device = args.device or ("cpu" if args.tiny else "cuda")
    if not args.tiny and not device.startswith("cuda"):
        raise SystemExit(f"{bench.script.name}: the real-size model needs a CUDA device (gigabytes of weights, "
                         "minutes a step on a CPU); pass --tiny to test the script on the CPU")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"{bench.script.name}: this Python's torch {torch.__version__} sees no CUDA device; run "
                             "it where one is (bench/gpu_check.sh finds such a Python), or pass --tiny")
    configs = [Config.parse(text) for text in (args.configs or (bench.tiny_configs if args.tiny else
                                                                bench.default_configs)).split(",") if text.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.deadline_s
    records: list[dict[str, Any]] = []
    with open(out / f"{bench.name}.jsonl", "w") as jsonl, open(out / f"{bench.name}.log", "w") as log:
        for config in configs:
            left = deadline - time.monotonic()
            own = args.config_timeout_s or (TINY_TIMEOUT_S if args.tiny else bench.limit_s(config))
            limit = min(own, left)
            if limit < min(own, 30):  # too little left for a configuration to finish: say so instead
                record = {"config": config.name, **asdict(config), "status": "skipped",
                          "error": f"--deadline-s {args.deadline_s:.0f} reached"}
            else:
                record = run_child(bench, config, args, device, limit, log)
            records.append(record)
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
            print(f"{config.name}: {record.get('status')} it/s={record.get('it_s', float('nan')):.3f} "
                  f"peak_alloc={record.get('peak_allocated_gib', float('nan')):.2f} GiB "
                  f"wall={record.get('wall_s', 0):.0f} s {record.get('error', '')[:200]}", flush=True)
    table = markdown(bench, records, args.tiny)
    (out / f"{bench.name}.md").write_text(table)
    print(table)
    return 0 if all(r.get("status") in ("ok", "oom") for r in records) else 1


def parse_args(bench: Bench, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    timeouts = ", ".join(f"{limit:.0f} s at {res} px" for res, limit in bench.timeout_s.items())
    parser = argparse.ArgumentParser(prog=bench.script.name, description=description)
    parser.add_argument("--out", default=str(REPO / "test-output" / bench.name), help="folder for the results")
    parser.add_argument("--configs", help=f"RES:bf16|fp8:SWAP,... in order (default {bench.default_configs})")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 6; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; 1 with --tiny)")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="skip configurations past this many seconds")
    parser.add_argument("--config-timeout-s", type=float, help=f"limit per configuration (default {timeouts}, "
                        f"{bench.swap_extra_s:.0f} s more with swapping, {TINY_TIMEOUT_S} s with --tiny)")
    parser.add_argument("--device", help="cuda (default) or cpu (--tiny's default)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: tests this script")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else 2 if args.tiny else 6
    args.warmup = args.warmup if args.warmup is not None else 1 if args.tiny else 2
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def main(bench: Bench, description: str, argv: list[str] | None = None) -> int:
    """The plug-in script's entry point: a child's one configuration, or the driver over all of them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the engine, for the plug-in's prepare in the children
    args = parse_args(bench, description, argv)
    if args.child:
        return child_main(bench, args.child, args.tiny, args.device or "cpu", args.steps, args.warmup)
    return driver_main(bench, args)
