"""WD14 tagger (SmilingWolf ONNX models) behind the Captioner interface; sd-scripts' tag_images_by_wd14_tagger.py.

A model folder holds ``model.onnx`` and ``selected_tags.csv``. The model takes NHWC float32 BGR 0..255 squares
(``preprocess_wd14``) and gives one sigmoid score per csv row; ``engine.caption.wd14_tags`` picks and orders the
tags. onnxruntime is imported only when a tagger is built, so importing this module (e.g. for ``WD14_MODELS``) stays
light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from engine.caption.base import CaptionOutput
from engine.caption.wd14_tags import (
    TagSelector,
    TagTable,
    Wd14Options,
    parse_tag_list,
    parse_tag_replacement,
    tag_frequency_summary,
)
from engine.data.images import to_rgb
from engine.data.resize import resize_image
from engine.startup import start_up_done

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "DEFAULT_WD14_MODEL", "MODEL_FILE", "TAGS_FILE", "WD14_MODELS", "Wd14Options", "Wd14Tagger",
    "parse_tag_list", "parse_tag_replacement", "preprocess_wd14", "tag_frequency_summary",
]

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_WD14_MODEL = "SmilingWolf/wd-v1-4-convnext-tagger-v2"  # sd-scripts' default --repo_id
WD14_MODELS: tuple[str, ...] = (
    DEFAULT_WD14_MODEL,
    "SmilingWolf/wd-v1-4-convnextv2-tagger-v2",
    "SmilingWolf/wd-v1-4-swinv2-tagger-v2",
    "SmilingWolf/wd-v1-4-vit-tagger-v2",
    "SmilingWolf/wd-v1-4-moat-tagger-v2",
    "SmilingWolf/wd-swinv2-tagger-v3",
    "SmilingWolf/wd-vit-tagger-v3",
    "SmilingWolf/wd-convnext-tagger-v3",
    "SmilingWolf/wd-vit-large-tagger-v3",
    "SmilingWolf/wd-eva02-large-tagger-v3",
)
_CUDA, _CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_WHITE = (255, 255, 255)


def preprocess_wd14(image: Image.Image, size: int) -> np.ndarray:
    """One image as the SmilingWolf taggers expect it: float32 (size, size, 3) BGR in 0..255.

    Upright by EXIF orientation; transparency composited on white; padded to a centred white square; resized with
    area (shrinking) or Lanczos (enlarging). No normalisation.
    """
    # Tags should describe the image as displayed, so orientation comes first (sd-scripts skips this step).
    # The dataset loader's conversion: transparency (RGBA/LA/PA, tRNS) onto white, 16-bit scaled, else RGB.
    rgb = to_rgb(ImageOps.exif_transpose(image))
    side = max(rgb.size)
    if rgb.width != rgb.height:
        square = Image.new("RGB", (side, side), _WHITE)
        # The odd pixel of padding goes right/bottom, as sd-scripts' pad_l = pad_x // 2.
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        rgb = square
    pixels = np.asarray(resize_image(rgb, (size, size)), dtype=np.float32)
    return np.ascontiguousarray(pixels[:, :, ::-1])  # RGB -> BGR


class Wd14Tagger:
    """A SmilingWolf WD14 tagger run with onnxruntime (CUDA when onnxruntime-gpu sees a GPU, else CPU)."""

    name = "wd14"

    def __init__(self, model_dir: str | Path, options: Wd14Options, *, device: str = "auto") -> None:
        """Load ``model.onnx`` and ``selected_tags.csv`` from ``model_dir``.

        Args:
            device: "auto" (CUDA if available, else CPU), "cpu", or "cuda"/"cuda:N" (an error if CUDA is missing).

        Raises:
            FileNotFoundError: the folder lacks one of the two files.
            ValueError: a bad csv header, or a model that is not NHWC [batch, size, size, 3] with one score per
                csv row.
        """
        folder = Path(model_dir)
        missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"WD14 model folder {folder} lacks {' and '.join(missing)}; it needs "
                                    f"{MODEL_FILE} and {TAGS_FILE} (the ONNX files of a SmilingWolf tagger repo)")
        self.options = options
        self.separator = options.caption_separator
        self.table = TagTable.from_csv(folder / TAGS_FILE)
        self._selector = TagSelector(self.table, options)
        self._session = _open_session(folder / MODEL_FILE, device)
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self.input_size, fixed_batch = _input_geometry(model_input.shape, folder / MODEL_FILE)
        self._fixed_batch = fixed_batch
        self.batch_size = fixed_batch or options.batch_size
        self._dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        self._check_output_width(folder / MODEL_FILE)

    def describe_device(self) -> str:
        """The provider onnxruntime actually uses (it silently falls back to CPU when CUDA fails to start)."""
        if self._session.get_providers()[0] == _CUDA:
            return "CUDA (onnxruntime-gpu)"
        return "CPU (onnxruntime)"

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One image as the model's input array; the folder runner calls this in its worker threads."""
        return preprocess_wd14(image, self.input_size)

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Raw scores, shape (len(images), rows of selected_tags.csv), in batches of ``batch_size``."""
        return self._predict_arrays([self.preprocess(image) for image in images])

    def caption(self, images: Sequence[Image.Image]) -> list[CaptionOutput]:
        """Tags for each image, chosen and ordered by the options (see ``engine.caption.wd14_tags``)."""
        return self.caption_preprocessed([self.preprocess(image) for image in images])

    def caption_preprocessed(self, arrays: Sequence[np.ndarray]) -> list[CaptionOutput]:
        """Tags for arrays from :meth:`preprocess`."""
        return [self._selector.select(probs) for probs in self._predict_arrays(list(arrays))]

    def _predict_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        step = self.batch_size
        batches = [self._run(arrays[start:start + step]) for start in range(0, len(arrays), step)]
        return np.concatenate(batches) if batches else np.zeros((0, len(self.table)), dtype=np.float32)

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        count = len(arrays)
        batch = np.stack(arrays).astype(self._dtype, copy=False)
        if self._fixed_batch and count < self._fixed_batch:
            # A model with a fixed batch dimension only takes full batches: fill with blanks, drop their scores.
            filler = np.zeros((self._fixed_batch - count, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, filler])
        scores = self._session.run(None, {self._input_name: batch})[0]
        return np.asarray(scores, dtype=np.float32).reshape(batch.shape[0], -1)[:count]

    def _check_output_width(self, model_path: Path) -> None:
        width = self._session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self.table):
            raise ValueError(f"{model_path} gives {width} scores but {TAGS_FILE} has {len(self.table)} rows; "
                             "the two files come from different models")


def _input_geometry(shape: Sequence[Any], model_path: Path) -> tuple[int, int | None]:
    """(square side, fixed batch or None) from an NHWC input shape; symbolic dims come as str or None."""
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise ValueError(f"{model_path}: expected an NHWC input [batch, size, size, 3] like the SmilingWolf "
                         f"taggers, found {list(shape)}")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return shape[1], batch


def _open_session(model_path: Path, device: str) -> onnxruntime.InferenceSession:
    """An inference session on the requested device; "auto" prefers CUDA and falls back to CPU."""
    import onnxruntime as ort  # here, not at the top: the GUI imports this module and must stay light

    providers = _providers(device, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(model_path), providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for bad files and provider failures
        if providers[0] != _CUDA or device != "auto":
            raise ValueError(f"cannot load the WD14 model {model_path}: {err}") from err
        session = ort.InferenceSession(str(model_path), providers=[_CPU])
    if device.startswith("cuda") and session.get_providers()[0] != _CUDA:
        raise RuntimeError(f"onnxruntime could not start CUDA for {model_path}; check the CUDA/cuDNN libraries "
                           "that onnxruntime-gpu needs, or use device 'cpu'")
    start_up_done()  # the imports and the model: the heavy part of the caption command's start-up is over
    return session


def _providers(device: str, available: Sequence[str]) -> list[Any]:
    """onnxruntime providers for ``device``; never the Azure provider onnxruntime lists by default."""
    if device == "cpu":
        return [_CPU]
    if device == "auto":
        return [_CUDA, _CPU] if _CUDA in available else [_CPU]
    if device == "cuda" or device.startswith("cuda:"):
        if _CUDA not in available:
            raise RuntimeError("device 'cuda' needs onnxruntime-gpu (this onnxruntime has no CUDAExecutionProvider)")
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
        return [(_CUDA, {"device_id": int(index)}), _CPU]
    raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
