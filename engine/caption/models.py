"""Model folders, devices and image hygiene shared by the captioners.

`resolve_model` turns what the user typed (``--model``) into a local folder: an existing folder is used as it is; a
Hugging Face hub id (``owner/name``) is downloaded once into Atelier's cache and reused from then on without any
network call. Nothing here downloads at import time, and the heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from engine.caption.base import CaptionOutput
from engine.startup import start_up_done

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_CACHE_DIR = Path("~/.cache/atelier/models")
MARKER_NAME = ".atelier-download.json"  # written only after a download finished: its presence means "complete"
MODEL_FILES = ("config.json", "model.onnx")  # transformers folders have the first, WD14 (onnx) folders the second

# owner/name as the hub spells it; anything else that is not an existing folder is a typo'd path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Weights in formats we never load: skipping them saves gigabytes on repos that ship TF/Flax/Rust copies too.
_FOREIGN_WEIGHTS = ["*.h5", "*.msgpack", "*.ot", "*.tflite", "*.mlmodel", "*.mlpackage/*", "coreml/*"]
_TRUE = {"1", "on", "yes", "true"}


class CaptionModelError(Exception):
    """A captioning model cannot be found, downloaded or loaded; the message says what to do."""


def resolve_model(
    id_or_dir: str, *, cache_dir: str | Path | None = None, allow_patterns: list[str] | None = None,
    needs: str = "", label: str = "",
) -> Path:
    """Return a local folder holding the model named by ``id_or_dir``.

    * An existing folder is returned as it is, after checking that it holds ``config.json`` or ``model.onnx``.
    * A hub id ``owner/name`` is downloaded once into ``<cache_dir>/<owner>_<name>`` (``cache_dir`` defaults to
      ``~/.cache/atelier/models``), limited to ``allow_patterns`` when given, and reused afterwards without any
      network call once its completion marker exists.

    Raises `CaptionModelError` when the folder lacks model files, the id is malformed, or the hub is unreachable
    (``HF_HUB_OFFLINE=1`` or no connection); the message explains how to use a local folder instead, naming what
    the folder of this captioner (``label``) ``needs``.
    """
    text = str(id_or_dir).strip()
    if not text:
        raise CaptionModelError("No captioning model given: pass a hub id (owner/name) or a local folder.")
    local = Path(text).expanduser()
    if local.is_dir():
        return check_model_folder(local, needs, label)
    if local.exists():
        raise CaptionModelError(f"{local} is a file; --model takes a model folder or a hub id (owner/name).")
    if not _HUB_ID.match(text):
        raise CaptionModelError(f"No folder {local} exists, and {text!r} is not a Hugging Face hub id (owner/name).")
    target = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / text.replace("/", "_")
    if _download_complete(target, text, allow_patterns):
        return check_model_folder(target)  # reused as is: no network call
    _download(text, target, allow_patterns, needs, label)
    return check_model_folder(target)


def check_model_folder(folder: Path, needs: str = "", label: str = "") -> Path:
    """Return ``folder`` if it holds ``config.json`` or ``model.onnx``; otherwise raise naming what is missing (and
    what a ``label`` model folder ``needs``, when given)."""
    if any((folder / name).is_file() for name in MODEL_FILES):
        return folder
    present = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))[:10]
    wanted = f" A {label + ' ' if label else ''}model folder needs {needs}." if needs else ""
    raise CaptionModelError(
        f"{folder} is not a model folder: it has neither {' nor '.join(MODEL_FILES)} "
        "(transformers models need config.json, ONNX taggers model.onnx). "
        f"It contains: {', '.join(present) or 'nothing'}.{wanted}"
    )


def _download_complete(target: Path, repo_id: str, allow_patterns: list[str] | None) -> bool:
    """Whether ``target`` holds a finished download of ``repo_id`` covering ``allow_patterns``."""
    try:
        marker = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("repo_id") != repo_id:
        return False
    done = marker.get("allow_patterns")
    # A full download (None) covers any subset; otherwise every requested pattern must have been fetched.
    return done is None or (allow_patterns is not None and set(allow_patterns) <= set(done))


def _download(repo_id: str, target: Path, allow_patterns: list[str] | None, needs: str = "", label: str = "") -> None:
    """Fetch ``repo_id`` into ``target`` (tqdm progress on stderr) and write the completion marker."""
    def offline(why: str) -> CaptionModelError:
        return CaptionModelError(_offline_message(repo_id, allow_patterns, why, needs, label))

    if _offline():
        raise offline("HF_HUB_OFFLINE is set")
    import huggingface_hub
    from huggingface_hub import errors

    try:
        ignore = _ignore_patterns(huggingface_hub.list_repo_files(repo_id))
        target.mkdir(parents=True, exist_ok=True)
        huggingface_hub.snapshot_download(
            repo_id, local_dir=str(target), allow_patterns=allow_patterns, ignore_patterns=ignore
        )
    except errors.GatedRepoError as exc:
        raise CaptionModelError(
            f"{repo_id} is gated on the Hugging Face hub: accept its terms on huggingface.co and log in "
            "(`hf auth login`), or download it yourself and pass --model /path/to/folder."
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise CaptionModelError(f"No model {repo_id!r} on the Hugging Face hub (check the spelling).") from exc
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, ConnectionError, TimeoutError) as exc:
        raise offline(str(exc) or type(exc).__name__) from exc
    except Exception as exc:
        if _is_transport_error(exc):
            raise offline(str(exc)) from exc
        raise CaptionModelError(f"Downloading {repo_id} failed: {exc}") from exc
    marker = {"repo_id": repo_id, "allow_patterns": allow_patterns}
    (target / MARKER_NAME).write_text(json.dumps(marker), encoding="utf-8")


def _ignore_patterns(files: list[str]) -> list[str]:
    """Skip foreign weight formats, and PyTorch pickles when the repo also ships safetensors (same weights)."""
    ignore = list(_FOREIGN_WEIGHTS)
    if any(f.endswith(".safetensors") for f in files):
        ignore.append("*.bin")
    return ignore


def _offline() -> bool:
    """HF_HUB_OFFLINE (or its alias TRANSFORMERS_OFFLINE), read now rather than at huggingface_hub's import."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _is_transport_error(exc: BaseException) -> bool:
    """huggingface_hub talks through httpx; its connection failures are not builtin ConnectionErrors."""
    try:
        import httpx
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        return False
    return isinstance(exc, httpx.TransportError)


def _offline_message(repo_id: str, allow_patterns: list[str] | None, why: str, needs: str = "",
                     label: str = "") -> str:
    """The advice shown when a hub id cannot be downloaded: which files a local folder needs, and how to give it on
    the command line and in the GUI."""
    generic = "config.json, the weights (model.safetensors) and the processor/tokenizer files"
    files = needs or (", ".join(allow_patterns) if allow_patterns else generic)
    # Plain file names go on hf's command line as they are; wildcard patterns would not, so then the whole repo.
    plain = allow_patterns and not any(set(pattern) & set("*?[") for pattern in allow_patterns)
    include = "".join(f" {name}" for name in allow_patterns or ()) if plain else ""
    return (
        f"This machine cannot reach the Hugging Face hub to download {repo_id} ({why}). "
        "Download it on a machine with internet access "
        f"(e.g. `hf download {repo_id}{include} --local-dir {repo_id.split('/')[-1]}`) and copy the folder here. "
        f"A {label + ' ' if label else ''}model folder needs {files}. "
        "Then give the folder instead of the hub id: --model /path/to/folder on the command line, or in the GUI "
        "put the folder's path in the Model box of the Captioning tab (type it, or pick it with Browse; it must lie "
        "inside the folders the app may use: your home folder or an --allow-path folder). "
        f"(No local folder named {repo_id!r} exists either.)"
    )


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` → ``"cuda"`` when a CUDA GPU is usable, else ``"cpu"``; anything else is passed to torch as is."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionModelError(f"Device {device!r} was requested but CUDA is not available here; use --device cpu.")
    return device


def describe_torch_device(device: str) -> str:
    """A human label for the log, e.g. ``"CPU"`` or ``"CUDA (NVIDIA H100 80GB HBM3)"``."""
    import torch

    if device.startswith("cuda"):
        return f"CUDA ({torch.cuda.get_device_name(torch.device(device))})"
    return device.upper()


def check_model_type(folder: Path, expected: str, label: str) -> None:
    """Fail early and clearly when ``folder`` holds another kind of model than the captioner loads."""
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        message = f"{folder}/config.json cannot be read ({exc}); is this a {label} model folder?"
        raise CaptionModelError(message) from exc
    if model_type != expected:
        raise CaptionModelError(f"{folder} holds a {model_type!r} model, not a {label} one (model_type {expected!r}).")


def load_processor(folder: Path, processor_class: str, image_processor_class: str):
    """Build ``processor_class`` from the folder with the PIL image processor ``image_processor_class``.

    transformers 5's AutoProcessor prefers the torchvision-backed image processor and only falls back to the PIL one
    when torchvision is missing (as here, where it must stay missing); asking for the PIL class explicitly gives the
    same preprocessing on every machine, with or without torchvision, and no fallback warning.
    """
    import transformers

    try:
        image_processor = getattr(transformers, image_processor_class).from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CaptionModelError(
            f"{folder} lacks a usable processor (preprocessor_config.json or processor_config.json, and the "
            f"tokenizer files tokenizer.json / vocab.txt): {exc}"
        ) from exc
    return getattr(transformers, processor_class)(image_processor=image_processor, tokenizer=tokenizer)


def load_model(folder: Path, model_class: str, device: str):
    """Load a transformers model class from ``folder`` onto ``device`` in eval mode, offline."""
    import transformers

    try:
        model = getattr(transformers, model_class).from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        message = f"Cannot load {model_class} from {folder} (weights missing or damaged?): {exc}"
        raise CaptionModelError(message) from exc
    start_up_done()  # the imports and the model: the heavy part of the caption command's start-up is over
    return model.to(device).eval()


def caption_in_batches(
    images: Sequence[Image.Image], batch_size: int, caption_batch: Callable[[Sequence[Image.Image]], list[str]],
) -> list[CaptionOutput]:
    """Run a sentence captioner's `caption_batch` over `images` in chunks of `batch_size`, keeping the order."""
    texts: list[str] = []
    for start in range(0, len(images), batch_size):
        texts.extend(caption_batch(images[start : start + batch_size]))
    return [CaptionOutput(text=text) for text in texts]
