"""CLIP tokenizers built offline from the BPE vocabulary shipped with the package.

SD1's CLIP ViT-L, SD2's OpenCLIP ViT-H and both SDXL encoders share one vocabulary: OpenAI's CLIP BPE
(``configs/bpe_simple_vocab_16e6.txt.gz``, 49408 tokens). The file holds a header line and then the merges in rank
order; CLIP uses the first 48894 of them. The vocabulary is the 256 byte symbols, the same with the end-of-word
mark ``</w>``, one token per merge, and the two specials (stack-notes §2, method 2) - the exact ids of
openai/clip-vit-large-patch14.

What differs between encoders is the tokenizer config: CLIP-L pads with ``<|endoftext|>``; SD2's encoder and SDXL's
second pad with ``"!"`` (id 0), as the diffusers repositories declare and as OpenCLIP was trained. Each family's
``tokenizer_config.json`` ships in ``configs/<family>/tokenizer*/``.

Tokenizer folders are written once into a cache folder (:func:`cache_root`) named by a hash of their content, and
reused; a folder appears atomically (written under a temporary name, then renamed), so concurrent processes never
read a half-written one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.models.configs import CONFIG_ROOT, shipped_configs

__all__ = [
    "BOS_TOKEN",
    "BPE_FILE",
    "EOS_TOKEN",
    "VOCAB_SIZE",
    "bytes_to_unicode",
    "cache_root",
    "cached_folder",
    "clip_vocab",
    "content_key",
    "load_tokenizer",
    "tokenizer_folder",
    "write_tokenizer_files",
]

BPE_FILE = CONFIG_ROOT / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
_MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2  # every token that is neither a byte symbol nor a special is a merge
_FORMAT = "1"  # bump when the files written into cache folders change


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table: the BPE alphabet, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return {byte: table[byte] for byte in [*printable, *(b for b in range(256) if b not in printable)]}


@lru_cache(maxsize=1)
def _merges() -> tuple[str, ...]:
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    return tuple(lines[1 : 1 + _MERGE_COUNT])  # line 0 is the file's header


@lru_cache(maxsize=1)
def clip_vocab() -> dict[str, int]:
    """Token → id of CLIP's vocabulary (49408 entries)."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), *(m.replace(" ", "") for m in _merges())]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


@lru_cache(maxsize=1)
def _bpe_digest() -> str:
    return hashlib.sha256(BPE_FILE.read_bytes()).hexdigest()


def write_tokenizer_files(folder: Path, tokenizer_config: dict[str, Any]) -> None:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``folder``.

    These three are what both transformers 4 (slow CLIPTokenizer) and 5 read; loading them takes ~0.1 s, faster than
    a ``tokenizer.json``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_merges()) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


def cache_root() -> Path:
    """Where generated files are kept: ``$ATELIER_CACHE_DIR``, else ``$XDG_CACHE_HOME/atelier``, else
    ``~/.cache/atelier``; a folder in the temp dir when that cannot be created (read-only home)."""
    configured = os.environ.get("ATELIER_CACHE_DIR")
    if configured:
        root = Path(configured).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atelier"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"atelier-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able ``parts`` plus the vocabulary: the name of a cache folder."""
    text = json.dumps([_FORMAT, _bpe_digest(), *parts], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def cached_folder(kind: str, key: str, write: Callable[[Path], None]) -> Path:
    """``cache_root()/kind/key``, written by ``write(folder)`` the first time and reused afterwards.

    The folder is built under a temporary name beside its final place and renamed into it, which is atomic: a
    reader sees a complete folder or none. When two processes build the same folder, the second rename fails and
    that process uses the winner's (identical) folder.
    """
    target = cache_root() / kind / key
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        write(building)
        os.rename(building, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def tokenizer_folder(family: str, subfolder: str = "tokenizer") -> Path:
    """A cached folder ``CLIPTokenizer.from_pretrained`` reads: ``family``'s shipped config for ``subfolder``
    ("tokenizer", or "tokenizer_2" for SDXL's second encoder) with the CLIP vocabulary."""
    configs = shipped_configs(family)
    if subfolder not in configs or not subfolder.startswith("tokenizer"):
        raise ValueError(f"{family} has no {subfolder!r}; expected one of "
                         f"{', '.join(name for name in configs if name.startswith('tokenizer'))}")
    config = configs[subfolder]
    return cached_folder("tokenizers", content_key(config), lambda folder: write_tokenizer_files(folder, config))


def load_tokenizer(family: str, subfolder: str = "tokenizer") -> Any:
    """The ``CLIPTokenizer`` of ``family``'s encoder ``subfolder``, built from the shipped files (no hub)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_folder(family, subfolder)), local_files_only=True)
