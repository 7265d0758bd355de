"""WD14 tag selection: the options, ``selected_tags.csv``, and turning one score vector into ordered tags.

Follows sd-scripts' ``tag_images_by_wd14_tagger.py`` for the SmilingWolf format (spec §4.3), with two
deliberate differences:

* ``tag_replacements`` work (sd-scripts' ``--tag_replacement`` never applies: a shadowed variable).
* Names given by the user (undesired, replacement sources, always-first) match a tag in its csv form
  (``long_hair``) as well as in its output form (``long hair``), so they keep working when ``remove_underscore``
  is switched on or off.

Kept as in sd-scripts: either rating flag adds the rating, character tags put first are inserted at index 0 one at
a time (their relative order is reversed), and the always-first tag listed last ends up first.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from engine.caption.base import CaptionOutput

RATING, GENERAL, CHARACTER = "9", "0", "4"  # category column of selected_tags.csv
CSV_HEADER = ("tag_id", "name", "category", "count")
# Stand-ins for the escaped separators while splitting; control characters never occur in tag names.
_ESCAPED_COMMA, _ESCAPED_SEMICOLON = "\x00", "\x01"


@dataclass(frozen=True)
class Wd14Options:
    """Options of the WD14 tagger; names and defaults follow sd-scripts' flags (spec §4.3)."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35  # > 1 disables character tags (scores are sigmoids, never above 1)
    use_rating_tags: bool = False
    rating_tags_last: bool = False  # also adds the rating, like sd-scripts' --use_rating_tags_as_last_tag
    character_tags_first: bool = False
    always_first_tags: tuple[str, ...] = ()
    undesired_tags: tuple[str, ...] = ()
    tag_replacements: tuple[tuple[str, str], ...] = ()  # (source, target); an empty target drops the tag
    remove_underscore: bool = False  # only in tags longer than 3 characters, so ^_^ and >_< survive
    caption_separator: str = ", "
    character_tag_expand: bool = False  # name_(series) -> name, series
    batch_size: int = 1  # a fixed batch dimension in the model overrides this

    def __post_init__(self) -> None:
        # Accept lists (from JSON/TOML configs) but store tuples, so the options stay hashable and immutable.
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                object.__setattr__(self, field.name, value)
        if self.general_threshold < 0 or self.character_threshold < 0:
            raise ValueError("WD14 thresholds must be >= 0 (a value above 1 disables the category)")
        if self.batch_size < 1:
            raise ValueError(f"WD14 batch_size must be >= 1, got {self.batch_size}")
        if not self.caption_separator:
            raise ValueError("WD14 caption_separator must not be empty")

    @property
    def adds_rating(self) -> bool:
        return self.use_rating_tags or self.rating_tags_last


def parse_tag_list(text: str | None, separator: str = ",") -> tuple[str, ...]:
    """Split a user's tag list on the stripped separator, as sd-scripts does; blanks and repeats are dropped."""
    if not text:
        return ()
    splitter = separator.strip() or separator
    tags = (tag.strip() for tag in text.split(splitter))
    return tuple(dict.fromkeys(tag for tag in tags if tag))


def parse_tag_replacement(text: str | None) -> tuple[tuple[str, str], ...]:
    r"""Parse sd-scripts' ``src,dst;src2,dst2`` form, where ``\,`` and ``\;`` stand for a literal comma/semicolon.

    Raises:
        ValueError: a pair that is not exactly ``source,target``, or an empty source.
    """
    if not text:
        return ()
    escaped = text.replace("\\,", _ESCAPED_COMMA).replace("\\;", _ESCAPED_SEMICOLON)
    pairs = []
    for piece in escaped.split(";"):
        if not piece.strip():
            continue  # tolerate a trailing ";"
        parts = [_unescape(part).strip() for part in piece.split(",")]
        if len(parts) != 2 or not parts[0]:
            raise ValueError(f"tag replacement must be `source,target` pairs separated by `;`: {_unescape(piece)!r}")
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


def _unescape(text: str) -> str:
    return text.replace(_ESCAPED_COMMA, ",").replace(_ESCAPED_SEMICOLON, ";")


@dataclass(frozen=True)
class TagTable:
    """The rows of ``selected_tags.csv``: one name and category per model output, in output order."""

    names: tuple[str, ...]
    categories: tuple[str, ...]

    @classmethod
    def from_csv(cls, path: str | Path) -> TagTable:
        """Read ``selected_tags.csv``; the header must start ``tag_id,name,category`` (as sd-scripts asserts).

        Raises:
            ValueError: a different header, or a row without a name and category.
        """
        with Path(path).open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header = tuple(cell.strip() for cell in rows[0]) if rows else ()
        if header[:3] != CSV_HEADER[:3]:
            raise ValueError(f"{path}: expected the header {','.join(CSV_HEADER)}, found {','.join(header)!r}")
        body = [row for row in rows[1:] if row]
        if any(len(row) < 3 for row in body):
            raise ValueError(f"{path}: every row needs tag_id, name and category")
        return cls(tuple(row[1] for row in body), tuple(row[2].strip() for row in body))

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, category: str) -> np.ndarray:
        """Output positions of one category, in csv order (the csv is read as it is, not assumed to be sorted)."""
        return np.array([i for i, c in enumerate(self.categories) if c == category], dtype=np.int64)


class TagSelector:
    """Turns a model's score vector into ordered tags; names are transformed once, when it is built."""

    def __init__(self, table: TagTable, options: Wd14Options) -> None:
        self.table = table
        self.options = options
        self._rating = table.indices(RATING)
        self._general = table.indices(GENERAL)
        self._character = table.indices(CHARACTER)
        self._aliases: dict[str, str] = {}  # csv/intermediate form -> output form, for always_first_tags
        rows = zip(table.names, table.categories, strict=True)
        self._output_names = [self._transform(name, category) for name, category in rows]

    def select(self, probs: Sequence[float] | np.ndarray) -> CaptionOutput:
        """Tags of one image from its scores (one per csv row)."""
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        if probs.shape[0] != len(self.table):
            raise ValueError(f"the model gives {probs.shape[0]} scores but selected_tags.csv has {len(self.table)}")
        opts = self.options
        picked: list[tuple[str, int]] = []  # (tag, csv row), in output order
        for row_tags in self._rows_above(probs, self._general, opts.general_threshold):
            picked += row_tags
        for row_tags in self._rows_above(probs, self._character, opts.character_threshold):
            # sd-scripts inserts each character at 0 as found, so characters-first reverses their order.
            if opts.character_tags_first:
                picked[0:0] = row_tags
            else:
                picked += row_tags
        if opts.adds_rating and self._rating.size:
            best = int(self._rating[np.argmax(probs[self._rating])])
            rating = [(tag, best) for tag in self._output_names[best]]
            picked = picked + rating if opts.rating_tags_last else rating + picked
        return self._finish(picked, probs)

    def _rows_above(self, probs: np.ndarray, rows: np.ndarray, threshold: float) -> list[list[tuple[str, int]]]:
        if threshold > 1 or not rows.size:
            return []
        chosen = rows[probs[rows] >= threshold]
        return [[(tag, int(row)) for tag in self._output_names[row]] for row in chosen]

    def _finish(self, picked: list[tuple[str, int]], probs: np.ndarray) -> CaptionOutput:
        scores: dict[str, float] = {}
        for tag, row in picked:  # a replacement can merge two tags: keep the first place and the higher score
            scores[tag] = max(scores.get(tag, 0.0), float(probs[row]))
        tags = list(scores)
        for wanted in self.options.always_first_tags:
            tag = wanted if wanted in scores else self._aliases.get(wanted)
            if tag in scores:
                tags.remove(tag)
                tags.insert(0, tag)
        return CaptionOutput(text=self.options.caption_separator.join(tags), tags=tags, scores=scores)

    def _transform(self, name: str, category: str) -> tuple[str, ...]:
        """Output tags of one csv row: expand, remove underscores, replace, drop undesired (in that order)."""
        opts = self.options
        undesired = set(opts.undesired_tags)
        replacements = dict(opts.tag_replacements)
        if name in undesired:
            return ()
        if name in replacements:  # the whole csv name, e.g. a character before expansion
            return self._alias((name,), replacements[name], undesired)
        parts = _expand(name) if category == CHARACTER and opts.character_tag_expand else (name,)
        result: list[str] = []
        for part in parts:
            shown = part.replace("_", " ") if opts.remove_underscore and len(part) > 3 else part
            forms = (part, shown)
            target = next((replacements[f] for f in forms if f in replacements), shown)
            result += self._alias(forms, target, undesired)
        return tuple(result)

    def _alias(self, forms: Iterable[str], target: str, undesired: set[str]) -> list[str]:
        forms = tuple(forms)
        if not target or target in undesired or undesired.intersection(forms):
            return []
        for form in forms:
            self._aliases.setdefault(form, target)
        return [target]


def _expand(name: str) -> tuple[str, ...]:
    """``name_(series)`` -> (``name``, ``series``); ``name_(costume)_(series)`` -> (``name_(costume)``, ``series``)."""
    if not name.endswith(")") or "(" not in name:
        return (name,)
    head, _, series = name[:-1].rpartition("(")
    character = head[:-1] if head.endswith("_") else head
    return (character, series) if character and series else (name,)


def tag_frequency_summary(outputs: Iterable[CaptionOutput], top: int | None = 20) -> list[tuple[str, int]]:
    """The most frequent tags over many images: (tag, images carrying it), most frequent first, ties by name."""
    counts = Counter(tag for output in outputs for tag in dict.fromkeys(output.tags))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ranked if top is None else ranked[:top]
