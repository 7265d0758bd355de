"""Finding and reading the caption file of an image (spec §1.7), as sd-scripts' DreamBooth loader does.

Where sd-scripts stops with an assert or a bare UnicodeDecodeError we raise CaptionError with a message that names
the file and says what to do, or return "" and let the dataset doctor explain it.
"""

from __future__ import annotations

from pathlib import Path

from engine.config.choices import dotted_caption_extension

# sd-scripts' face-crop tool names its outputs `<stem>_<4 numbers>`; with >= 5 `_`-tokens the last 4 are dropped.
_FACE_CROP_SUFFIX_TOKENS = 4


class CaptionError(Exception):
    """A caption file that cannot be used; the message names the file and what to do about it."""


def caption_candidates(image_path: Path, caption_extension: str) -> list[Path]:
    """The caption files sd-scripts tries for an image, in order: `<stem><ext>`, then the face-crop variant.

    Raises:
        ValueError: `caption_extension` is not a text extension of engine.config.choices.CAPTION_EXTENSIONS (the
            config refuses those already; this is the last line before a file is touched).
    """
    # sd-scripts accepts `caption_extension = "txt"` and adds the dot; so does this.
    extension = dotted_caption_extension(caption_extension)
    stem = image_path.stem
    candidates = [image_path.with_name(stem + extension)]
    tokens = stem.split("_")
    # sd-scripts splits the whole path without extension on "_", so underscores in folder names count too; we
    # split the file stem only, as the spec describes, so a folder like `5_my_chara_a_b` cannot redirect lookups.
    if len(tokens) > _FACE_CROP_SUFFIX_TOKENS:
        face_stem = "_".join(tokens[:-_FACE_CROP_SUFFIX_TOKENS])
        candidates.append(image_path.with_name(face_stem + extension))
    return candidates


def find_caption_file(image_path: Path, caption_extension: str) -> Path | None:
    """The first caption candidate that exists as a file, or None when the image has no caption file."""
    for candidate in caption_candidates(Path(image_path), caption_extension):
        if candidate.is_file():
            return candidate
    return None


def _decode(path: Path, data: bytes) -> str:
    try:
        # utf-8-sig drops a leading BOM, which sd-scripts would otherwise keep as an invisible first character.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(
            f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); re-save it as UTF-8"
        ) from exc


def read_caption_file(path: Path, *, enable_wildcard: bool) -> str:
    """The caption stored in `path`: the first line (stripped), or with wildcards every non-empty line joined by "\\n".

    An empty file gives "" (sd-scripts asserts; the dataset doctor reports it instead).

    Raises:
        CaptionError: the file cannot be read or is not UTF-8.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaptionError(f"cannot read caption file {path} ({exc.strerror or exc}); check that it exists and is "
                           "readable") from exc
    # Python's text mode (which sd-scripts reads with) turns \r\n and \r into \n; do the same, no other breaks.
    lines = _decode(path, data).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()
