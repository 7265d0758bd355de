"""Caption processing per training step (spec §1.11), tag frequency (spec §1.7) and a token-count estimate.

Follows sd-scripts' `BaseDataset.process_caption` step by step and in its order, except that every random draw goes
through a caller-supplied `random.Random`, so a seed reproduces a caption exactly. No torch here: the dataset
doctor and the GUI use this module too.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from engine.data.caption_files import CaptionError, caption_candidates, find_caption_file, read_caption_file

__all__ = [
    "CaptionError",
    "CaptionOptions",
    "approximate_token_count",
    "caption_candidates",
    "find_caption_file",
    "folder_tag_frequency",
    "process_caption",
    "read_caption_file",
    "tag_frequency",
]

_WILDCARD = re.compile(r"\{([^}]+)\}")  # sd-scripts' pattern: `{a|b|c}`, no nesting
_JOINER = ", "  # sd-scripts re-joins tags with this literal, whatever caption_separator is


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings of one subset; defaults are those of engine/config/dataset_keys.py."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: int | float = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CaptionOptions:
        """Options from a resolved subset's params; other keys are ignored, missing or None keys take the default."""
        given = {f.name: params[f.name] for f in fields(cls) if params.get(f.name) is not None}
        return cls(**given)

    @property
    def splits_tags(self) -> bool:
        """Whether the caption is split into tags at all (sd-scripts skips splitting otherwise)."""
        return self.shuffle_caption or self.token_warmup_step > 0 or self.caption_tag_dropout_rate > 0

    @property
    def changes_per_step(self) -> bool:
        """Whether the processed caption may differ between steps, so text-encoder outputs must not be cached.

        Stricter than sd-scripts, which ignores wildcards and every-n-epochs dropout when deciding (spec §1.11.6).
        """
        return (
            self.splits_tags
            or self.enable_wildcard
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
        )


def process_caption(
    caption: str,
    options: CaptionOptions,
    *,
    rng: random.Random,
    epoch: int = 0,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """The caption used for one training step, as sd-scripts' `process_caption` builds it.

    Args:
        caption: The raw caption (first line, or every line joined by "\\n" with wildcards).
        options: The subset's caption settings.
        rng: Source of every random choice; the same seed and arguments give the same caption.
        epoch: The training epoch counted from 1, as sd-scripts counts it; 0 means "not training" (a preview).
        step: The global step counted from 0, for token warm-up.
        max_train_steps: The run's length, for a fractional token_warmup_step.
    """
    caption = _add_prefix_suffix(caption, options)
    if _drops_caption(options, rng, epoch):
        return ""
    caption = _expand_wildcards(caption, rng) if options.enable_wildcard else caption.split("\n")[0]
    if options.splits_tags:
        caption = _process_tags(caption, options, rng, step, max_train_steps)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def _add_prefix_suffix(caption: str, options: CaptionOptions) -> str:
    # Applied to the whole raw caption, as sd-scripts does: with several wildcard lines the prefix lands on the
    # first line only and the suffix on the last (the dataset doctor may warn about that combination).
    if options.caption_prefix:
        caption = options.caption_prefix + " " + caption
    if options.caption_suffix:
        caption = caption + " " + options.caption_suffix
    return caption


def _drops_caption(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    # Draw only when the rate is set, as sd-scripts does, so enabling nothing consumes no randomness.
    if options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate:
        return True
    every = options.caption_dropout_every_n_epochs
    # sd-scripts sets the epoch to index + 1, so with n = 2 the 2nd, 4th, ... epochs are dropped. Its formula would
    # also drop epoch 0, which it only sees by accident (the collator sets the epoch after the first batch is
    # fetched); we treat epoch 0 as "outside training" so previews with the default epoch are not emptied.
    return every > 0 and epoch > 0 and epoch % every == 0


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # `{{` and `}}` stand for literal braces: park them under markers that cannot occur in the caption.
    open_marker, close_marker = "⦅", "⦆"
    while open_marker in caption or close_marker in caption:
        open_marker += "⦅"
        close_marker += "⦆"
    caption = caption.replace("{{", open_marker).replace("}}", close_marker)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_marker, "{").replace(close_marker, "}")


def _split(text: str, separator: str) -> list[str]:
    return [token.strip() for token in text.split(separator) if token.strip()]


def _partition_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed prefix, flexible middle, fixed suffix) tags."""
    marker, separator = options.keep_tokens_separator, options.caption_separator
    if marker and marker in caption:
        fixed_part, flex_part = caption.split(marker, 1)
        suffix_part = ""
        if marker in flex_part:
            flex_part, suffix_part = flex_part.split(marker, 1)
        return _split(fixed_part, separator), _split(flex_part, separator), _split(suffix_part, separator)
    # Unlike the marker form, sd-scripts keeps empty tags here (e.g. after a trailing separator); so do we.
    tokens = [token.strip() for token in caption.strip().split(separator)]
    keep = options.keep_tokens
    return tokens[:keep], tokens[keep:], []


def _warmup_steps(options: CaptionOptions, max_train_steps: int) -> int | float:
    warmup = options.token_warmup_step
    # Below 1 it is a fraction of the run (sd-scripts overwrites the subset's value with this on first use).
    return math.floor(warmup * max_train_steps) if warmup < 1 else warmup


def _process_tags(caption: str, options: CaptionOptions, rng: random.Random, step: int, max_train_steps: int) -> str:
    fixed, flex, fixed_suffix = _partition_tags(caption, options)
    warmup = _warmup_steps(options, max_train_steps)
    if warmup and step < warmup:
        minimum = options.token_warmup_min
        flex = flex[: math.floor(step * ((len(flex) - minimum) / warmup)) + minimum]
    if options.shuffle_caption:
        rng.shuffle(flex)
    if options.caption_tag_dropout_rate > 0:
        flex = [tag for tag in flex if rng.random() >= options.caption_tag_dropout_rate]
    return _JOINER.join(fixed + flex + fixed_suffix)


def tag_frequency(captions: Iterable[str], separator: str = ",") -> Counter[str]:
    """How often each tag occurs: split on `separator`, stripped, lower-cased, empty tags skipped (spec §1.7)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.strip().lower() for tag in caption.split(separator) if tag.strip())
    return counts


def folder_tag_frequency(records: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """sd-scripts' `ss_tag_frequency` shape, {folder: {tag: count}}, from (folder name, raw caption) pairs.

    The folder name is used as given; sd-scripts uses the image folder's basename. Like sd-scripts, a folder whose
    captions hold no tags still gets an (empty) entry, and tags are always split on ",".
    """
    counts: dict[str, Counter[str]] = {}
    for folder, caption in records:
        counts.setdefault(folder, Counter()).update(tag_frequency([caption]))
    return {folder: dict(counter) for folder, counter in counts.items()}


# CLIP's pre-tokenizer splits into letter runs, single digits and runs of other symbols; we count every symbol
# separately to stay on the high side.
_PRETOKEN = re.compile(r"[^\W\d_]+|\d|[^\w\s]|_")
_CHARS_PER_WORD_TOKEN = 6  # long or rare words split into several BPE pieces; most pieces are shorter than this


def approximate_token_count(caption: str) -> int:
    """A cheap estimate of the CLIP tokens in `caption`, not counting the start and end tokens.

    It is an estimate, not the tokenizer's answer: each digit and punctuation mark counts as one token, each
    non-ASCII letter as one, and each ASCII word as one token per started 6 letters. It errs on the high side for
    ordinary English captions (most common words are a single token), so the doctor can warn about captions longer
    than max_token_length without loading a tokenizer; unusual words (names, made-up trigger words) and non-Latin
    scripts may still take more tokens than estimated.
    """
    return sum(_piece_tokens(piece) for piece in _PRETOKEN.findall(caption))


def _piece_tokens(piece: str) -> int:
    if not piece.isascii():
        return len(piece)  # CLIP's byte-level BPE rarely merges non-Latin characters into multi-character tokens
    if piece.isalpha():
        return math.ceil(len(piece) / _CHARS_PER_WORD_TOKEN)
    return 1
