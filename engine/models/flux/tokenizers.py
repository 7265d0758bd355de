"""The tokenizers of FLUX.1 and Chroma, found offline (spec §3.1).

* CLIP-L: the diffusers folder's ``tokenizer/`` when the model is one, else the package's own CLIP tokenizer
  (SD1's shipped config with the CLIP vocabulary: the exact tokenizer of openai/clip-vit-large-patch14).
* T5-XXL (``google/t5-v1_1-xxl``'s SentencePiece tokenizer), first found of:

  1. the diffusers folder's ``tokenizer_2/`` (Chroma's pipeline has T5 as its only tokenizer: ``tokenizer/``);
  2. ``model.tokenizer_cache_dir``: a folder holding the tokenizer itself, or sd-scripts' layout
     ``<dir>/google_t5-v1_1-xxl``;
  3. Atelier's model cache (``<cache>/models/google_t5-v1_1-xxl``, complete when its download marker is there, as
     for the captioning models);
  4. a download into 2's layout (when set) or 3, only when the machine is online.

  Offline with none of these, the error says how to bring the tokenizer over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.models.single_file import ModelLoadError
from engine.models.vae import is_offline

__all__ = ["T5_TOKENIZER_FILES", "T5_TOKENIZER_REPO", "load_clip_tokenizer", "load_t5_tokenizer", "t5_cache_folder"]

T5_TOKENIZER_REPO = "google/t5-v1_1-xxl"
# What the tokenizer needs from the repository (config.json too: the download check wants a model file there).
T5_TOKENIZER_FILES = ["spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "config.json"]
_TOKENIZER_MARKERS = ("tokenizer.json", "spiece.model")  # a folder with one of these holds a T5 tokenizer
_CLIP_MARKERS = ("vocab.json", "tokenizer.json")


def load_clip_tokenizer(model_folder: Path | None = None, subfolder: str = "tokenizer",
                        shipped: tuple[str, str] = ("sd1", "tokenizer")) -> Any:
    """A ``CLIPTokenizer``: ``<model_folder>/<subfolder>`` when it has one, else the package's own.

    Args:
        model_folder: the diffusers folder of the model, if it is one.
        subfolder: its tokenizer subfolder (SD3's CLIP-G: "tokenizer_2").
        shipped: (family, subfolder) of the package's tokenizer to use otherwise: CLIP-L's by default; SD3's CLIP-G
            takes SDXL's second tokenizer (the same vocabulary, padding with "!", id 0).
    """
    from transformers import CLIPTokenizer

    folder = model_folder / subfolder if model_folder is not None else None
    if folder is not None and any((folder / name).is_file() for name in _CLIP_MARKERS):
        try:
            return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{folder}: cannot load the CLIP tokenizer ({error})") from error
    from engine.models.tokenizers import load_tokenizer

    return load_tokenizer(*shipped)


def t5_cache_folder(cache_dir: Path) -> Path:
    """sd-scripts' place for the T5 tokenizer under a cache folder: ``<cache_dir>/google_t5-v1_1-xxl``."""
    return cache_dir / T5_TOKENIZER_REPO.replace("/", "_")


def load_t5_tokenizer(model_folder: Path | None = None, tokenizer_cache_dir: str | Path | None = None,
                      subfolder: str = "tokenizer_2") -> Any:
    """T5-XXL's tokenizer, from the first place in the module docstring's order that holds it.

    Args:
        model_folder: the diffusers folder of the model, if it is one.
        tokenizer_cache_dir: ``model.tokenizer_cache_dir`` ("" or None: not set).
        subfolder: the model folder's T5 tokenizer subfolder ("tokenizer_2"; Chroma's pipeline: "tokenizer").

    Raises:
        ModelLoadError: no tokenizer anywhere and no way to download it, or a folder that does not load.
    """
    return _load_t5(_find_t5_folder(model_folder, tokenizer_cache_dir, subfolder))


def _holds_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_MARKERS)


def _find_t5_folder(model_folder: Path | None, tokenizer_cache_dir: str | Path | None, subfolder: str) -> Path:
    candidates = [model_folder / subfolder] if model_folder is not None else []
    user_dir = Path(tokenizer_cache_dir).expanduser() if tokenizer_cache_dir else None
    if user_dir is not None:
        candidates += [user_dir, t5_cache_folder(user_dir)]
    found = next((folder for folder in candidates if _holds_tokenizer(folder)), None)
    if found is not None:
        return found
    cached = _downloaded(_model_cache())
    if cached is not None:
        return cached
    if is_offline():
        raise ModelLoadError(_offline_message(model_folder, user_dir, subfolder))
    return _download(user_dir or _model_cache())


def _model_cache() -> Path:
    from engine.models.tokenizers import cache_root

    return cache_root() / "models"


def _downloaded(cache_dir: Path) -> Path | None:
    """The model cache's T5 tokenizer folder when a finished download of it is there (its marker written last)."""
    from engine.caption.models import MARKER_NAME

    folder = t5_cache_folder(cache_dir)
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return folder if marker.get("repo_id") == T5_TOKENIZER_REPO and _holds_tokenizer(folder) else None


def _download(cache_dir: Path) -> Path:
    """Fetch the tokenizer files into ``t5_cache_folder(cache_dir)`` once, with the captioners' marker file."""
    from engine.caption.models import CaptionModelError, resolve_model

    try:
        return resolve_model(T5_TOKENIZER_REPO, cache_dir=cache_dir, allow_patterns=T5_TOKENIZER_FILES)
    except CaptionModelError as error:
        raise ModelLoadError(f"the T5 tokenizer ({T5_TOKENIZER_REPO}) is needed and could not be downloaded: "
                             f"{error}. {_how_to_bring_it()}") from error


def _load_t5(folder: Path) -> Any:
    from transformers import T5TokenizerFast

    try:
        if not (folder / "tokenizer.json").is_file() and (folder / "spiece.model").is_file():
            return _from_spiece(folder)
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, ImportError) as error:
        raise ModelLoadError(f"{folder}: cannot load the T5 tokenizer ({type(error).__name__}: {error}); it needs "
                             "tokenizer.json, or spiece.model with tokenizer_config.json") from error


def _from_spiece(folder: Path) -> Any:
    """The fast tokenizer built from ``spiece.model`` alone, as transformers' T5 converter builds it.

    ``google/t5-v1_1-xxl`` ships no ``tokenizer.json``, and transformers 5 converts ``spiece.model`` only with the
    ``sentencepiece`` package installed (else it tries tiktoken and fails). The file is a protobuf message, so it is
    read with protobuf (a transformers dependency) instead: the pieces with their scores, then the extra ids in
    reverse (``<extra_id_0>`` is the last id, 32099 for T5), and the normalizer's precompiled character map.
    """
    from transformers import T5TokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((folder / "spiece.model").read_bytes())
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    extra_ids = int(config.get("extra_ids", 100))
    extra = [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]
    vocab = [(piece.piece, piece.score) for piece in proto.pieces] + [(token, 0.0) for token in extra]
    return T5TokenizerFast(vocab=vocab, extra_ids=extra_ids, additional_special_tokens=extra,
                           _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap or None,
                           model_max_length=int(config.get("model_max_length", 512)))


def _how_to_bring_it() -> str:
    return (f"On a machine with network run `hf download {T5_TOKENIZER_REPO} spiece.model tokenizer_config.json "
            f"special_tokens_map.json --local-dir TOKENIZERS/{T5_TOKENIZER_REPO.replace('/', '_')}`, copy TOKENIZERS "
            "here and set model.tokenizer_cache_dir to it (a folder holding the tokenizer files directly works too)")


def _offline_message(model_folder: Path | None, user_dir: Path | None, subfolder: str) -> str:
    looked = [f"{model_folder / subfolder}" if model_folder is not None else "no diffusers model folder",
              f"model.tokenizer_cache_dir {user_dir} (and {t5_cache_folder(user_dir)})" if user_dir is not None
              else "model.tokenizer_cache_dir is not set",
              f"the model cache {t5_cache_folder(_model_cache())}"]
    return (f"the T5-XXL tokenizer ({T5_TOKENIZER_REPO}) was not found ({'; '.join(looked)}) and this machine is "
            f"offline (HF_HUB_OFFLINE=1), so it cannot be downloaded. {_how_to_bring_it()}")
