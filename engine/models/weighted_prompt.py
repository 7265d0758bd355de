"""Prompt weights in captions, as sd-scripts' ``--weighted_captions`` reads them (SD1.x, SD2.x and SDXL).

The syntax is the one image generators use (sd-scripts' ``TokenizeStrategy._get_weighted_input_ids``):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; brackets nest and multiply;
* ``(text:1.5)`` multiplies it by 1.5 (the number directly after the colon, then the closing parenthesis);
* ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; a bracket left open applies to the end.

Each piece of text is tokenized on its own and every token carries its piece's weight; BOS, EOS and padding weigh 1.
After encoding, the text encoder's output at each caption position is multiplied by that token's weight (the
pooled SDXL embedding is not), without any renormalisation, exactly as sd-scripts' ``encode_tokens_with_weights``.
A caption without brackets tokenizes to the same ids as without weighting, and all its weights are 1, so its
encoding is unchanged.

Where sd-scripts crashes on a weight that is not a number (``(word:1.2.3)``), the text is kept as written instead.
Pure Python except :func:`tokenize_weighted` and :func:`apply_token_weights` (torch, imported inside).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["BRACKET_DOWN", "BRACKET_UP", "apply_token_weights", "parse_prompt_attention", "tokenize_weighted",
           "weighted_ids"]

BRACKET_UP = 1.1  # (text)
BRACKET_DOWN = 1 / 1.1  # [text]

# One token of the syntax: an escaped character, a lone backslash, an opening bracket, ':<weight>)', a closing
# bracket, a run of plain text, or a colon that does not start a weight.
_TOKENS = re.compile(r"""
    \\[()\[\]\\]           # \( \) \[ \] \\ : the literal character
  | \\                     # a backslash before anything else: dropped, as in sd-scripts
  | [(\[]                  # opening bracket
  | :(?P<weight>[+-]?[.\d]+)\)   # ':1.5)' closes a '(' with that weight
  | [)\]]                  # closing bracket
  | [^\\()\[\]:]+          # plain text
  | :                      # a colon that is just text
""", re.VERBOSE)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (piece, weight) pairs; neighbouring pieces of equal weight are joined.

    >>> parse_prompt_attention("a (red:1.5) dog")
    [('a ', 1.0), ('red', 1.5), (' dog', 1.0)]
    >>> parse_prompt_attention("[small] \\\\(cat\\\\)")
    [('small', 0.9090909090909091), (' (cat)', 1.0)]
    """
    parser = _AttentionParser()
    for match in _TOKENS.finditer(text):
        parser.feed(match.group(0), _number(match.group("weight")))
    return parser.finish()


class _AttentionParser:
    """The state of :func:`parse_prompt_attention`: the pieces so far, each ``[text, weight]``, and the index of the
    first piece inside each bracket still open."""

    def __init__(self) -> None:
        self.pieces: list[list[Any]] = []
        self.open_round: list[int] = []
        self.open_square: list[int] = []

    def scale_from(self, start: int, factor: float) -> None:
        for piece in self.pieces[start:]:
            piece[1] *= factor

    def feed(self, token: str, weight: float | None) -> None:
        """One token of ``_TOKENS``; ``weight`` is the number of a ':<weight>)' token, if it is one."""
        if token.startswith("\\"):
            self.pieces.append([token[1:], 1.0])
        elif token == "(":
            self.open_round.append(len(self.pieces))
        elif token == "[":
            self.open_square.append(len(self.pieces))
        elif not self.close(token, weight):  # text, or a bracket/weight with nothing to close
            self.pieces.append([token, 1.0])

    def close(self, token: str, weight: float | None) -> bool:
        """Close the innermost open bracket ``token`` closes, scaling what it holds; False if it closes none."""
        if weight is not None and self.open_round:
            self.scale_from(self.open_round.pop(), weight)
        elif token == ")" and self.open_round:
            self.scale_from(self.open_round.pop(), BRACKET_UP)
        elif token == "]" and self.open_square:
            self.scale_from(self.open_square.pop(), BRACKET_DOWN)
        else:
            return False
        return True

    def finish(self) -> list[tuple[str, float]]:
        for start in self.open_round:  # unclosed brackets reach to the end
            self.scale_from(start, BRACKET_UP)
        for start in self.open_square:
            self.scale_from(start, BRACKET_DOWN)
        return _joined(self.pieces) or [("", 1.0)]


def _number(text: str | None) -> float | None:
    """The weight after a colon, or None when there is none or it is not a number (then it stays text)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _joined(pieces: list[list[Any]]) -> list[tuple[str, float]]:
    joined: list[tuple[str, float]] = []
    for piece, weight in pieces:
        if joined and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + piece, weight)
        else:
            joined.append((piece, weight))
    return joined


def weighted_ids(tokenizer: Any, caption: str, max_token_length: int) -> tuple[list[int], list[float]]:
    """Token ids and weights of one caption: BOS, at most ``max_token_length`` caption tokens, EOS, then padding to
    ``max_token_length + 2`` positions (the layout of the unweighted ``padding="max_length"`` tokenization)."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(caption):
        tokens = tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
        if len(ids) > max_token_length:
            break  # the rest would be cut off anyway
    ids, weights = ids[:max_token_length], weights[:max_token_length]
    padding = max_token_length - len(ids)
    return ([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * padding],
            [1.0, *weights, 1.0, *[1.0] * padding])


def tokenize_weighted(tokenizer: Any, captions: list[str], max_token_length: int) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """Ids [B, max_token_length + 2] and weights (float32, same shape) of ``captions``, before chunking."""
    import torch

    rows = [weighted_ids(tokenizer, caption, max_token_length) for caption in captions]
    return (torch.tensor([ids for ids, _ in rows], dtype=torch.long),
            torch.tensor([weights for _, weights in rows], dtype=torch.float32))


def apply_token_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale encoded captions by their token weights.

    Args:
        states: [B, n·75 + 2, D], the joined chunks (first BOS, every chunk's 75 inner positions, last EOS).
        weights: [B, n·75 + 2] from :func:`tokenize_weighted`: the weight of the token at each of those positions
            (BOS, EOS and padding weigh 1, as do the positions a chunk's own BOS/EOS would hold).
    """
    return states * weights.to(states.device, states.dtype).unsqueeze(-1)
