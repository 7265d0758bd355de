#!/usr/bin/env python
"""How much latent caching costs beyond the VAE itself: (whole cache-latents run) / (bare encoding).

    .venv/bin/python bench/cache_latents.py [--images 32] [--size 512] [--batch-size 4] [--workers 2]
                                            [--repeats 3] [--device cpu] [--append bench/RESULTS.md]

Both sides use the same VAE (SD1.5's architecture, random weights, built offline), the same images, batch size
and batch composition. The bare side encodes tensors that were decoded, resized and converted beforehand; the
cache side is ``build_latent_cache`` from a list of image files to written ``.npz`` files (stat, key checks,
decoding in worker threads, encoding, atomic writes). Runs alternate and the median of the per-run ratios is
reported. Aim: < 1.2, i.e. decoding and writing hide behind the encoding.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.cache.latents import CacheJob, CacheOptions, build_latent_cache  # noqa: E402
from engine.data.buckets import BucketAssignment  # noqa: E402
from engine.data.records import ImageRecord  # noqa: E402
from engine.data.transforms import prepare, to_model_tensor  # noqa: E402
from engine.models.vae import SCALING_FACTORS, LoadedVae, weights_identity  # noqa: E402


def sd15_vae(device: str):
    """SD1.5's AutoencoderKL (83.7 M parameters) with random weights: the real cost, no download."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=512, scaling_factor=SCALING_FACTORS["sd1"])
    identity = weights_identity(vae.state_dict())
    vae = torch.nn.Module.to(vae, device=device).eval().requires_grad_(False)
    return LoadedVae(vae=vae, identity=identity, family="sd1", scaling_factor=SCALING_FACTORS["sd1"], source="bench")


def make_images(folder: Path, count: int, size: int) -> list[CacheJob]:
    """Photo-like JPEGs (smooth gradients plus noise, so they do not compress to nothing)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    jobs = []
    for index in range(count):
        base = (ramp[None, :, None] * rng.random(3) + ramp[:, None, None] * rng.random(3)) / 2
        pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"image_{index:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=92)
        record = ImageRecord(path=path, size=(size, size), caption="", caption_source="none", num_repeats=1,
                             is_reg=False, dataset_index=0, subset_index=0, bucket=(size, size), resized=(size, size))
        jobs.append(CacheJob(record, CacheOptions()))
    return jobs


def bare_encode(vae, tensors: list[torch.Tensor], batch_size: int) -> float:
    parameter = next(vae.parameters())
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(tensors), batch_size):
            batch = torch.stack(tensors[start:start + batch_size]).to(parameter.device, parameter.dtype)
            vae.encode(batch).latent_dist.mode().float().cpu()
    return time.perf_counter() - started


def cache_run(jobs: list[CacheJob], loaded: LoadedVae, cache_dir: Path, batch_size: int, workers: int) -> float:
    started = time.perf_counter()
    report = build_latent_cache(jobs, loaded, cache_dir=cache_dir, batch_size=batch_size, workers=workers,
                                skip_existing=False)
    elapsed = time.perf_counter() - started
    assert report.encoded == len(jobs) and not report.failed, report.summary()
    return elapsed


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {os.cpu_count()}-core CPU"
    return f"{os.cpu_count()}-core CPU, no GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--append", type=Path, help="append the result as a markdown entry to this file")
    args = parser.parse_args(argv)

    loaded = sd15_vae(args.device)
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as temporary:
        root = Path(temporary)
        (root / "images").mkdir()
        jobs = make_images(root / "images", args.images, args.size)
        tensors = [to_model_tensor(prepare(j.record.path, BucketAssignment(j.record.bucket, j.record.resized, 0.0))
                                   .pixels) for j in jobs]
        bare_encode(loaded.vae, tensors[:args.batch_size], args.batch_size)  # warm-up (allocator, kernels)
        bare, cached = [], []
        for repeat in range(args.repeats):
            bare.append(bare_encode(loaded.vae, tensors, args.batch_size))
            cached.append(cache_run(jobs, loaded, root / f"cache{repeat}", args.batch_size, args.workers))
            print(f"run {repeat + 1}: encode {bare[-1]:.2f} s, cache-latents {cached[-1]:.2f} s, "
                  f"ratio {cached[-1] / bare[-1]:.3f}", flush=True)
    ratio = statistics.median(c / b for c, b in zip(cached, bare, strict=True))
    line = (f"{args.images} images {args.size}x{args.size} JPEG, SD1.5 VAE (random weights), {args.device}, "
            f"vae_batch_size {args.batch_size}, workers {args.workers}: ratio {ratio:.3f} (median of {args.repeats}); "
            f"cache-latents {statistics.median(cached):.2f} s, bare encode {statistics.median(bare):.2f} s "
            f"({statistics.median(bare) / args.images:.3f} s/image)")
    print(line)
    if args.append:
        entry = (f"\n## cache-latents overhead — {datetime.date.today().isoformat()}, {machine(args.device)}\n\n"
                 f"`bench/cache_latents.py`: {line}. Runs: "
                 + ", ".join(f"{c:.2f}/{b:.2f} s" for c, b in zip(cached, bare, strict=True)) + " (cache/encode).\n")
        if not args.append.exists():
            args.append.write_text("# Benchmark results\n\nEach entry: date, machine, command, figures.\n")
        with args.append.open("a", encoding="utf-8") as stream:
            stream.write(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
