"""Loading the text encoders and tokenizers of a model (for caption encoding and the text-encoder cache), offline.

Sources:

* a diffusers pipeline folder: ``tokenizer/`` + ``text_encoder/`` (SD1/SD2), plus ``tokenizer_2/`` +
  ``text_encoder_2/`` (SDXL);
* a single-file checkpoint (``.safetensors``/``.ckpt``), through diffusers' ``from_single_file`` with a local
  ``config=`` folder: the configs embedded in the file or the family's shipped ones fitted to the file's shapes,
  with the shipped tokenizers (``engine.models.single_file``). Single files carry no tokenizer, and without
  ``config=`` diffusers goes to the hub (stack-notes §2, §8.5). ``config_dir`` (a local diffusers folder of the
  same family) overrides that choice.

The identity is a hash of the encoders' weights (as ``engine.models.vae.weights_identity``: every tensor, as
float32) plus a fingerprint of each tokenizer, so a text-encoder cache can tell which encoders made it whatever the
file format. Tensor names are taken without transformers' ``text_model.`` wrapper, which transformers 5.6 dropped
from ``CLIPTextModel`` (stack-notes §8.3), so the identity does not change with the transformers version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.ldm_checkpoint import FAMILIES
from engine.models.single_file import (
    SINGLE_FILE_SUFFIXES,
    ModelLoadError,
    check_family,
    diffusers_pipeline_of,
    load_single_file_pipeline,
    resolve_single_file,
)
from engine.models.vae import pipeline_family, weights_identity

if TYPE_CHECKING:
    import torch

__all__ = [
    "TEXT_COMPONENTS",
    "LoadedTextEncoders",
    "TextEncoderLoadError",
    "load_text_encoders",
    "ready_text_encoders",
    "text_encoders_identity",
]

# The components each family has, in the order encoders and tokenizers are listed.
TEXT_COMPONENTS = {"sd1": [("tokenizer", "text_encoder")], "sd2": [("tokenizer", "text_encoder")],
                   "sdxl": [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]}
_NOT_NEEDED = ("unet", "vae", "scheduler")


class TextEncoderLoadError(ModelLoadError):
    """The text encoders cannot be loaded; the message names the file or folder and says what to do."""


@dataclass
class LoadedTextEncoders:
    """Tokenizers and text encoders ready to encode: frozen, in eval mode, on their device and dtype.

    Attributes:
        family: "sd1", "sd2" or "sdxl".
        tokenizers: one ``CLIPTokenizer`` per encoder.
        encoders: ``[CLIPTextModel]`` for SD1/SD2; ``[CLIPTextModel, CLIPTextModelWithProjection]`` for SDXL.
        identity: sha256 (hex) of the weights and tokenizers (see :func:`text_encoders_identity`).
        source: the folder or file they came from.
    """

    family: str
    tokenizers: list[Any]
    encoders: list[Any]
    identity: str
    source: str


def load_text_encoders(model_path: str | Path, *, family: str = "auto", dtype: Any = None, device: str = "cpu",
                       config_dir: str | Path | None = None) -> LoadedTextEncoders:
    """Load the tokenizers and text encoders of ``model_path``.

    Args:
        model_path: a diffusers pipeline folder, or a single-file checkpoint.
        family: "sd1", "sd2", "sdxl", or "auto" to detect it (from ``model_index.json`` or the checkpoint's keys).
        dtype: torch dtype to encode in (default float32).
        device: where to put the encoders.
        config_dir: for a single file: a local diffusers folder of the same family (tokenizers and configs) to
            use instead of the embedded or shipped configs.

    Returns:
        The loaded encoders with their family and identity (computed on the float32 weights before any cast).

    Raises:
        TextEncoderLoadError: a missing path, a folder that is not a diffusers pipeline, a file that is not a base
            model (a LoRA), or a family that does not match.
    """
    if family != "auto" and family not in FAMILIES:
        raise TextEncoderLoadError(f"unknown model family {family!r}; use one of auto, {', '.join(FAMILIES)}")
    path = Path(model_path).expanduser()
    if path.is_dir():
        resolved = check_family(path, _folder_family(path), family, exact=False, what="model folder",
                                error=TextEncoderLoadError)
        tokenizers, encoders = _load_folder(path, resolved)
    elif path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        resolved, tokenizers, encoders = _load_single_file(path, family, config_dir)
    else:
        raise TextEncoderLoadError(f"model not found: {path} (expected a diffusers pipeline folder or a "
                                   ".safetensors/.ckpt checkpoint; a hub id must be downloaded to a folder first)")
    return ready_text_encoders(resolved, tokenizers, encoders, str(path), dtype=dtype, device=device)


def ready_text_encoders(family: str, tokenizers: list[Any], encoders: list[Any], source: str, *, dtype: Any = None,
                        device: str = "cpu") -> LoadedTextEncoders:
    """Wrap loaded float32 encoders: identity of their float32 weights, then cast, moved, frozen and in eval mode."""
    import torch

    identity = text_encoders_identity(encoders, tokenizers)
    for encoder in encoders:
        torch.nn.Module.to(encoder, device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedTextEncoders(family, tokenizers, encoders, identity, source)


def text_encoders_identity(encoders: list[Any], tokenizers: list[Any]) -> str:
    """sha256 over each encoder's :func:`weights_identity` (names without ``text_model.``) and tokenizer fingerprint.

    Hashing every weight costs what it costs for the VAE (about 1.4 GB/s on a 2-core CPU): ~0.35 s for SD1's
    CLIP-L, ~2.4 s for SDXL's two encoders. That is small next to loading them, so no subsampling is done.
    """
    digest = hashlib.sha256()
    for encoder in encoders:
        state = {name.removeprefix("text_model."): tensor for name, tensor in encoder.state_dict().items()}
        digest.update(f"encoder {type(encoder).__name__} {weights_identity(state)}\n".encode())
    for tokenizer in tokenizers:
        digest.update(f"tokenizer {_tokenizer_fingerprint(tokenizer)}\n".encode())
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    # The vocabulary, special ids and length decide the token ids. SD1's CLIP-L and SD2's OpenCLIP tokenizers share
    # the vocabulary and differ only in the pad token, so the special ids must be part of it.
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.model_max_length]
    return hashlib.sha256(json.dumps([vocab, specials], ensure_ascii=False).encode()).hexdigest()


# --- family ----------------------------------------------------------------------------------------------------


def _folder_family(folder: Path) -> str | None:
    if not (folder / "text_encoder" / "config.json").is_file():
        raise TextEncoderLoadError(f"{folder}: not a diffusers pipeline folder (no text_encoder/config.json); "
                                   "point model.pretrained_model_name_or_path at the pipeline folder or a checkpoint")
    return pipeline_family(folder) or ("sdxl" if (folder / "text_encoder_2").is_dir() else None)


# --- sources ---------------------------------------------------------------------------------------------------


def _encoder_class(name: str) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel


def _load_folder(folder: Path, family: str) -> tuple[list[Any], list[torch.nn.Module]]:
    from transformers import CLIPTokenizer

    tokenizers, encoders = [], []
    for tokenizer_name, encoder_name in TEXT_COMPONENTS[family]:
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(str(folder / tokenizer_name), local_files_only=True))
            encoder = _encoder_class(encoder_name).from_pretrained(str(folder / encoder_name), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise TextEncoderLoadError(f"{folder}: cannot load {tokenizer_name}/{encoder_name} ({error})") from error
        encoders.append(encoder.float())
    return tokenizers, encoders


def _load_single_file(path: Path, family: str, config_dir: str | Path | None) -> tuple[str, list[Any], list[Any]]:
    """Through diffusers' ``from_single_file`` with every component but the text encoders and tokenizers left out."""
    try:
        resolved, config = resolve_single_file(path, family)
    except ModelLoadError as error:
        raise TextEncoderLoadError(str(error)) from error
    if config_dir is not None:
        config = _checked_config_dir(Path(config_dir).expanduser(), path, resolved)
    pipe = load_single_file_pipeline(path, resolved, config, skip=_NOT_NEEDED, error=TextEncoderLoadError)
    names = TEXT_COMPONENTS[resolved]
    return resolved, [getattr(pipe, t) for t, _ in names], [getattr(pipe, e).float() for _, e in names]


def _checked_config_dir(config: Path, path: Path, family: str) -> Path:
    config_family = _folder_family(config)
    if config_family is not None and diffusers_pipeline_of(config_family) != diffusers_pipeline_of(family):
        raise TextEncoderLoadError(f"config_dir {config} is an {config_family} model folder, but {path} is an "
                                   f"{family} checkpoint; pass a folder of the same family")
    return config
