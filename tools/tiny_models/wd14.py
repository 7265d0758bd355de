"""A tiny stand-in for a SmilingWolf WD14 tagger: ``model.onnx`` + ``selected_tags.csv``.

It keeps the real taggers' interface (input ``input_1:0``, NHWC float32 BGR 0..255, square; sigmoid scores with
one column per csv row, csv order) but computes only: per-channel mean → fixed random matrix → sigmoid. That is
enough for the scores to depend on the image, so tests can see different images get different tags.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

INPUT_NAME = "input_1:0"
OUTPUT_NAME = "predictions_sigmoid"

# (name, category) in csv order. Categories as in selected_tags.csv: 9 rating, 0 general, 4 character.
# Ratings come first: taggers read the first four scores as the rating.
TAGS = (
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("1girl", 0), ("solo", 0), ("long_hair", 0), ("short_hair", 0), ("looking_at_viewer", 0), ("smile", 0),
    ("simple_background", 0), ("white_background", 0), ("no_humans", 0), ("red_theme", 0), ("blue_theme", 0),
    ("green_theme", 0), ("dog", 0), ("^_^", 0), (">_<", 0), (":d", 0),
    ("hatsune_miku", 4), ("kagamine_rin", 4), ("hakurei_reimu", 4),
)  # fmt: skip


def write_selected_tags(path: Path) -> Path:
    """Write ``selected_tags.csv`` with the header real taggers assert on (``tag_id,name,category,count``)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category) in enumerate(TAGS):
            writer.writerow([100_000 + index, name, category, 50_000 - 1_000 * index])
    return path


def _graph_weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights large enough that a colour change moves scores across the usual 0.35 threshold."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, 4.0, size=(3, len(TAGS))).astype(np.float32)
    bias = rng.normal(-1.0, 1.0, size=(len(TAGS),)).astype(np.float32)
    return weight, bias


def write_model(path: Path, input_size: int = 448, seed: int = 600) -> Path:
    """Build the ONNX graph with ``onnx.helper`` and save it to ``path``.

    Raises:
        ModuleNotFoundError: ``onnx`` is not installed (only this builder needs it).
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("building the tiny WD14 tagger needs the onnx package: pip install onnx") from error

    weight, bias = _graph_weights(seed)
    initializers = [
        numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), "inverse_255"),
        numpy_helper.from_array(weight, "tag_weight"),
        numpy_helper.from_array(bias, "tag_bias"),
    ]
    nodes = [
        helper.make_node("Transpose", [INPUT_NAME], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "inverse_255"], ["scaled"]),
        helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "tag_weight"], ["logits_no_bias"]),
        helper.make_node("Add", ["logits_no_bias", "tag_bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_wd14_tagger",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", input_size, input_size, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", len(TAGS)])],
        initializers,
    )
    # Opset 17 / IR 8: readable by every onnxruntime from 1.14 on, like the published taggers.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="atelier-tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_wd14(folder: Path, input_size: int = 448) -> None:
    """Write ``model.onnx`` and ``selected_tags.csv`` into ``folder``."""
    write_model(folder / "model.onnx", input_size=input_size)
    write_selected_tags(folder / "selected_tags.csv")
