"""Hand-made tokenizer vocabularies, so no tokenizer ever has to be fetched from a hub.

The CLIP one is a real byte-level BPE (same file format and special tokens as openai/clip-vit-large-patch14) with
just enough merges to turn a few prompt words into single tokens; any other text still tokenizes, byte by byte.
"""

from __future__ import annotations

import json
from pathlib import Path

# Words that become single tokens; the prompts and captions used by the tests are made of them.
CLIP_WORDS = (
    "a", "an", "the", "of", "in", "on", "and", "with", "photo", "picture", "painting", "style", "sks", "dog", "cat",
    "person", "red", "green", "blue", "yellow", "white", "black", "square", "circle", "triangle", "background",
    "shape", "simple", "high", "quality", "low", "blurry",
)  # fmt: skip

BERT_WORDS = (
    "a", "an", "the", "of", "in", "on", "and", "with", "is", "photo", "picture", "dog", "cat", "red", "green",
    "blue", "yellow", "white", "black", "square", "circle", "triangle", "background", "shape", "small", "large",
)  # fmt: skip

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table (the BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Merges that build ``word`` left to right; CLIP marks the last symbol of a word with ``</w>``."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    merges, current = [], symbols[0]
    for symbol in symbols[1:]:
        merges.append((current, symbol))
        current += symbol
    return merges


def write_clip_bpe(folder: Path, words: tuple[str, ...] = CLIP_WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for a tiny CLIP BPE tokenizer into ``folder``.

    Returns:
        ``folder``, ready for ``CLIPTokenizer.from_pretrained(folder)``.
    """
    alphabet = list(bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for word in words:
        merges.extend(pair for pair in _word_merges(word) if pair not in merges)
    tokens = alphabet + [char + "</w>" for char in alphabet]
    tokens += [left + right for left, right in merges if left + right not in tokens]
    tokens += [CLIP_BOS, CLIP_EOS]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_bert_vocab(path: Path, words: tuple[str, ...] = BERT_WORDS) -> Path:
    """Write a WordPiece ``vocab.txt`` (specials, characters, ``##`` suffixes, whole words) and return its path."""
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    tokens = [*BERT_SPECIALS, *letters, *"0123456789", *".,!?'-:;()", *(f"##{c}" for c in letters)]
    tokens += [word for word in words if word not in tokens]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path
