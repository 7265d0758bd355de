"""Comparison grid throughput (`python -m engine compare`) over bare pipeline calls for the same pictures.

Both sides use one base model loaded once (not timed) and the run's LoRA network patched into it. The grid side is
the command's own work after loading: planning the cells, loading each checkpoint's file into the network, drawing
every cell through training's sampler (base model once per seed), writing the cells, a `progress` event per file,
the labelled grid PNG and index.json. The bare side calls diffusers' StableDiffusionPipeline on the same modules
for the same distinct pictures (the base model once per seed, each checkpoint's weights set from memory once, each
strength as the network's multiplier) and keeps the images in memory. Ratio = bare time / grid time (grid
throughput over bare throughput); runs alternate bare / grid. Both wall time and the process's CPU time are
reported: on a machine shared with other work the wall times swing widely, the CPU times (torch on 1 thread,
OMP_NUM_THREADS=1) much less.

    python bench/compare_grid.py [--size 128] [--steps 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from train_helpers import make_locon_file, write_config  # noqa: E402

STRENGTHS = [0.0, 0.5, 1.0]
SEEDS = [1, 2]
PROMPT = "a photo of a dog"


def _run(folder: Path, tiny: dict[str, Path], size: int, steps: int) -> tuple[Path, list[Path]]:
    config = write_config(folder / "config.toml", tiny, "sd1",
                          network={"network_dim": 4, "network_alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
                          sampling={"sample_prompts": [f"{PROMPT} --w {size} --h {size} --s {steps}"],
                                    "sample_sampler": "euler"})
    (folder / "out").mkdir()
    files = [make_locon_file(tiny["sd1"], folder / "out" / f"lora-{n:06d}.safetensors", {}, seed=n) for n in (1, 2)]
    return config, files


def grid_seconds(renderer, config, files: list[Path], out: Path) -> tuple[float, float]:
    from engine.cli.compare_cmd import _finish, _render_with_progress
    from engine.compare.grid import CELLS_FOLDER, plan_cells
    from engine.compare.plan import RunSource, given_checkpoints
    from engine.compare.render import grid_prompts
    from engine.events import EventWriter

    started, cpu = time.perf_counter(), time.process_time()
    source = RunSource(config, None)
    checkpoints = given_checkpoints(files, source)
    prompts = [prompt for prompt, _ in grid_prompts(renderer.method.config, config.parent, "sd1")]
    cells = plan_cells(prompts, [SEEDS] * len(prompts), checkpoints, STRENGTHS, out / CELLS_FOLDER)
    with EventWriter(out / "events.jsonl") as events:
        _render_with_progress(renderer, cells, events, [])
        _finish(events, source, out, checkpoints, STRENGTHS, cells)
    return time.perf_counter() - started, time.process_time() - cpu


def bare_seconds(renderer, tensors: list[dict], size: int, steps: int) -> tuple[float, float]:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    parts, network = renderer.parts, renderer.method.network
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text.encoders[0],
                                   tokenizer=parts.text.tokenizers[0], unet=parts.unet,
                                   scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                                    beta_schedule="scaled_linear"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def draw(seed: int) -> None:
        pipe(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(seed))

    started, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        renderer.show(None, 0)  # the base model: the network off
        for seed in SEEDS:
            draw(seed)
        network.apply_to()
        renderer.applied = True
        for weights in tensors:
            network.load_kohya_state_dict(weights)
            for strength in STRENGTHS[1:]:
                network.set_multiplier(strength)
                for seed in SEEDS:
                    draw(seed)
    renderer.loaded = None  # the grid side loads its checkpoints again
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="/tmp/tiny_models", help="the tiny models (tools/make_tiny_model.py)")
    args = parser.parse_args()
    import torch

    from engine.compare.render import load_renderer
    from engine.config.io import load_config
    from engine.networks.network_file import read_network_file

    models = Path(args.models)
    tiny = {"sd1": models / "sd1", "dataset_img": models / "dataset" / "img"}
    with tempfile.TemporaryDirectory() as tmp:
        config, files = _run(Path(tmp), tiny, args.size, args.steps)
        renderer = load_renderer(load_config(config, check_packages=False), config.parent, device="cpu")
        tensors = [read_network_file(path)[0] for path in files]
        bare_seconds(renderer, tensors, 64, 1)  # warm-up: first calls allocate
        wall, cpu = [], []
        for run in range(args.runs):
            bare = bare_seconds(renderer, tensors, args.size, args.steps)
            grid = grid_seconds(renderer, config, files, Path(tmp) / f"grid{run}")
            wall.append((bare[0], grid[0]))
            cpu.append((bare[1], grid[1]))
            print(f"run {run + 1}: wall bare {bare[0]:.2f} s, grid {grid[0]:.2f} s, ratio {bare[0] / grid[0]:.3f}; "
                  f"cpu bare {bare[1]:.2f} s, grid {grid[1]:.2f} s, ratio {bare[1] / grid[1]:.3f}", flush=True)
    cells = len(files) * len(STRENGTHS) * len(SEEDS)
    print(f"torch threads {torch.get_num_threads()}, {cells} cells ({len(SEEDS) * (1 + 2 * 2)} distinct pictures), "
          f"{args.size} px, {args.steps} steps")
    for name, pairs in (("wall", wall), ("cpu", cpu)):
        ratios = [bare / grid for bare, grid in pairs]
        bare, grid = (statistics.median(side) for side in zip(*pairs, strict=True))
        print(f"grid / bare throughput ({name} time), median of {args.runs}: {statistics.median(ratios):.3f} "
              f"(grid {grid:.2f} s, bare {bare:.2f} s)")


if __name__ == "__main__":
    main()
