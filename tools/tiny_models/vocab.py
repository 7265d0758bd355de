"""A hand-made WordPiece vocabulary for the tiny captioners, so no tokenizer ever has to be fetched from a hub.

(The tiny SD models use the real CLIP vocabulary shipped with the package: ``engine.models.tokenizers``.)
"""

from __future__ import annotations

from pathlib import Path

BERT_WORDS = (
    "a", "an", "the", "of", "in", "on", "and", "with", "is", "photo", "picture", "dog", "cat", "red", "green",
    "blue", "yellow", "white", "black", "square", "circle", "triangle", "background", "shape", "small", "large",
)  # fmt: skip

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def write_bert_vocab(path: Path, words: tuple[str, ...] = BERT_WORDS) -> Path:
    """Write a WordPiece ``vocab.txt`` (specials, characters, ``##`` suffixes, whole words) and return its path."""
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    tokens = [*BERT_SPECIALS, *letters, *"0123456789", *".,!?'-:;()", *(f"##{c}" for c in letters)]
    tokens += [word for word in words if word not in tokens]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path
