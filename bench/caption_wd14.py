#!/usr/bin/env python
"""WD14 folder captioning throughput over the model's throughput on pre-processed arrays (same session, batches).

    .venv/bin/python bench/caption_wd14.py [--images 48] [--batch-size 4] [--workers 2] [--repeats 3]

The model is WD14-shaped (NHWC 448x448x3 input, selected_tags.csv with ratings, general and character tags) and
built offline with the onnx helper API: a small conv net of about 3.5 GFLOPs per image. The real
wd-v1-4-convnext-tagger-v2 needs roughly 45 GFLOPs, so loading and preprocessing weigh more here than with a real
tagger: the ratio is a pessimistic estimate. Images are 1024x768 JPEGs with noise (realistic decode cost).
Folder side: `run_captioning` (open in worker threads, preprocess, infer, choose tags, dry run: no writes).
Baseline: the same session run on arrays preprocessed beforehand. Ratio = folder images/s over baseline images/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import timed  # noqa: E402

from engine.caption.runner import FolderOptions, run_captioning  # noqa: E402
from engine.caption.wd14 import Wd14Options, Wd14Tagger, preprocess_wd14  # noqa: E402

BASE_CONVS = [(3, 48, 4, 4, 0), (48, 96, 3, 2, 1), (96, 192, 3, 2, 1), (192, 384, 3, 1, 1), (384, 384, 3, 1, 1)]


def convs(width: int) -> list[tuple[int, int, int, int, int]]:
    """The conv stack with channels multiplied by `width` (compute grows about width squared)."""
    return [(cin if cin == 3 else cin * width, cout * width, k, s, p) for cin, cout, k, s, p in BASE_CONVS]


def build_model(folder: Path, width: int = 1, tags: int = 224) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["input_1:0"], ["x0"], perm=[0, 3, 1, 2])]
    weights = []
    stack = convs(width)
    for index, (cin, cout, kernel, stride, pad) in enumerate(stack):
        w = (rng.standard_normal((cout, cin, kernel, kernel)) / np.sqrt(cin * kernel * kernel)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{index}"))
        nodes += [helper.make_node("Conv", [f"x{index}", f"w{index}"], [f"c{index}"], strides=[stride] * 2,
                                   pads=[pad] * 4),
                  helper.make_node("Relu", [f"c{index}"], [f"x{index + 1}"])]
    last = f"x{len(stack)}"
    head = (rng.standard_normal((stack[-1][1], tags)) * 0.05).astype(np.float32)
    weights.append(numpy_helper.from_array(head, "head"))
    nodes += [helper.make_node("GlobalAveragePool", [last], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("MatMul", ["flat", "head"], ["logits"]),
              helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])]
    graph = helper.make_graph(
        nodes, "wd14_shaped",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", 448, 448, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", tags])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"]
    rows += [f"{i},rating_{i},9,1" for i in range(4)]
    rows += [f"{i},tag_{i},0,1" for i in range(4, tags - 20)]
    rows += [f"{i},character_{i},4,1" for i in range(tags - 20, tags)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")


def make_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(1)
    for index in range(count):
        pixels = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=1, help="channel multiplier: 1 is ~3.5 GFLOPs per image, "
                        "3 is ~30 GFLOPs, near the real ConvNeXt tagger's ~45")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        model_dir, images_dir = Path(temp) / "model", Path(temp) / "images"
        model_dir.mkdir()
        images_dir.mkdir()
        build_model(model_dir, args.width)
        make_images(images_dir, args.images)
        tagger = Wd14Tagger(model_dir, Wd14Options(batch_size=args.batch_size), device="cpu")
        arrays = [preprocess_wd14(Image.open(path).convert("RGB"), tagger.input_size)
                  for path in sorted(images_dir.glob("*.jpg"))]

        def baseline() -> None:
            for start in range(0, len(arrays), args.batch_size):
                tagger._run(arrays[start:start + args.batch_size])

        options = FolderOptions(mode="overwrite", dry_run=True, batch_size=args.batch_size, workers=args.workers)
        folder_seconds = timed(lambda: run_captioning(images_dir, tagger, options), args.repeats)
        baseline_seconds = timed(baseline, args.repeats)
    folder_rate, baseline_rate = args.images / folder_seconds, args.images / baseline_seconds
    print(f"folder: {folder_rate:.2f} images/s ({folder_seconds:.2f} s); arrays: {baseline_rate:.2f} images/s "
          f"({baseline_seconds:.2f} s); ratio {folder_rate / baseline_rate:.3f} (median of {args.repeats}, "
          f"batch {args.batch_size}, {args.workers} workers, {args.images} images 1024x768, width {args.width})")


if __name__ == "__main__":
    main()
