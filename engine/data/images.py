"""Reading training images: which files count, their displayed size from the header alone, and a decode to RGB.

The size recorded at scan time and the pixels decoded at training time must agree, or an image lands in the
wrong bucket. Both therefore take the EXIF orientation from one function, `_read_header`, instead of trusting
two libraries (imagesize and PIL) to interpret the metadata the same way. sd-scripts ignores orientation
entirely; we honour it, because a phone photo that shows upright everywhere else should train upright.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import imagesize
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

# EXIF orientation -> the transpose that shows the image upright (the same table as PIL's ImageOps.exif_transpose).
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_PNG_CHUNKS = 256  # metadata chunks before IDAT; a bound so a damaged file cannot make us walk forever

StrPath = str | PathLike[str]


class UnreadableImage(Exception):
    """An image file that cannot be used; the message names the file and says what is wrong."""

    def __init__(self, path: StrPath, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def is_image_file(path: StrPath) -> bool:
    """True when the name has one of the image extensions, in any letter case (the name only; nothing is read)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class _Header:
    size: tuple[int, int]  # (width, height) as stored, before orientation
    orientation: int  # EXIF orientation 1..8 (1 = as stored)


def read_image_size(path: StrPath) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation, read from the header without decoding pixels."""
    header = _read_header(path)
    width, height = header.size
    return (height, width) if header.orientation in _SWAPS_SIDES else (width, height)


def load_rgb_image(path: StrPath) -> Image.Image:
    """Decode fully to an upright 8-bit RGB image; transparency is composited on white."""
    return _decoded(path, to_rgb)[0]


def load_mask(path: StrPath, *, alpha: bool) -> Image.Image:
    """A loss mask as an upright 8-bit "L" image of the file's displayed size (255 = trained, 0 = ignored).

    Args:
        alpha: True for the alpha channel of `path` (255 everywhere when it has none, as sd-scripts); False for
            the red channel of a mask image (what sd-scripts reads from conditioning_data_dir).
    """
    return _decoded(path, _alpha_channel if alpha else _red_channel)[0]


def load_rgb_and_alpha(path: StrPath) -> tuple[Image.Image, Image.Image]:
    """`load_rgb_image` and `load_mask(alpha=True)` of one file from a single decode."""
    rgb, alpha = _decoded(path, to_rgb, _alpha_channel)
    return rgb, alpha


def _decoded(path: StrPath, *conversions: Callable[[Image.Image], Image.Image]) -> list[Image.Image]:
    """Decode once and apply each conversion; the results are turned upright by the EXIF orientation."""
    orientation = _read_header(path).orientation
    try:
        with Image.open(path) as image:
            image.load()
            converted = [conversion(image) for conversion in conversions]
    except Exception as err:  # PIL signals damage with many types (OSError, SyntaxError, zlib.error, ...)
        raise UnreadableImage(path, _describe(err)) from err
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    return [each.transpose(transpose) for each in converted] if transpose is not None else converted


def _alpha_channel(image: Image.Image) -> Image.Image:
    if _has_transparency(image):
        return image.convert("RGBA").getchannel("A")
    return Image.new("L", image.size, 255)


def _red_channel(image: Image.Image) -> Image.Image:
    return to_rgb(image).getchannel("R")


def has_alpha_channel(path: StrPath) -> bool:
    """Whether the image carries transparency (an alpha channel or a colour key), from its header alone."""
    try:
        with Image.open(path) as image:  # lazy: PNG's tRNS and the mode are known before the pixels are read
            return _has_transparency(image)
    except Exception as err:
        raise UnreadableImage(path, _describe(err)) from err


def verify_image(path: StrPath) -> None:
    """Decode the whole image (for the doctor) and check that the header size matches the pixels."""
    expected = read_image_size(path)
    decoded = load_rgb_image(path).size
    if decoded != expected:
        raise UnreadableImage(path, f"the header says {expected[0]}x{expected[1]} but the pixels are "
                                    f"{decoded[0]}x{decoded[1]}; re-save the image")


# --- header ----------------------------------------------------------------------------------------------------


def _read_header(path: StrPath) -> _Header:
    """Stored size and orientation. PNG is parsed here (IHDR is at a fixed offset, and its eXIf chunk needs a
    chunk walk imagesize does not do); the rest goes to imagesize. Raw os.pread: a buffered open() costs about
    three times as much, which matters when a scan reads 10,000 headers."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return _parse_header(path, fd)
        finally:
            os.close(fd)
    except OSError as err:  # missing, a directory, no permission, an I/O error
        raise UnreadableImage(path, f"cannot be opened or read ({err.strerror or err})") from err


def _parse_header(path: StrPath, fd: int) -> _Header:
    head = os.pread(fd, 32, 0)
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return _checked(path, _Header((width, height), _png_orientation(fd)))
    return _checked(path, _header_by_imagesize(path, head, fd))


def _header_by_imagesize(path: StrPath, head: bytes, fd: int) -> _Header | None:
    try:
        # Bytes, not str: imagesize treats a str starting with "http://" as a URL, and bytes skip its (slow)
        # file-object protocol check. exif_rotation=False: we swap the sides ourselves, with the orientation that
        # load_rgb_image applies. imagesize reports the orientation of JPEG (and TIFF) only.
        info = imagesize.get_info(os.fsencode(path), dpi=False, colors=False, exif_rotation=False, channels=False)
    except (ValueError, struct.error, IndexError, OSError):
        return None
    orientation = info.rotation
    if not 1 <= orientation <= 8:
        webp_exif = head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and head[20] & 0x08
        orientation = _webp_orientation(fd) if webp_exif else 1  # the VP8X flag says an EXIF chunk exists
    return _Header((info.width, info.height), orientation)


def _checked(path: StrPath, header: _Header | None) -> _Header:
    if header is None or min(header.size) <= 0:
        return _header_from_pil(path)
    return header


def _header_from_pil(path: StrPath) -> _Header:
    """Slow path for headers we cannot parse: PIL either reads them or says what is wrong."""
    try:
        with Image.open(path) as image:
            return _Header(image.size, 1)
    except Exception as err:
        raise UnreadableImage(path, _describe(err)) from err


def _png_orientation(fd: int) -> int:
    # The PNG spec puts eXIf before the image data; stopping at IDAT keeps this cheap for big files.
    offset = 8
    for _ in range(_MAX_PNG_CHUNKS):
        chunk = os.pread(fd, 8, offset)
        if len(chunk) < 8:
            return 1
        length, kind = struct.unpack(">I4s", chunk)
        if kind in (b"IDAT", b"IEND"):
            return 1
        if kind == b"eXIf":
            return _orientation_from_exif(os.pread(fd, length, offset + 8))
        offset += 12 + length  # length, type, payload, CRC
    return 1


def _webp_orientation(fd: int) -> int:
    offset = 12
    while chunk := os.pread(fd, 8, offset):
        if len(chunk) < 8:
            return 1
        kind, length = struct.unpack("<4sI", chunk)
        if kind == b"EXIF":
            return _orientation_from_exif(os.pread(fd, length, offset + 8))
        offset += 8 + length + (length & 1)  # RIFF chunks are padded to an even length
    return 1


def _orientation_from_exif(data: bytes) -> int:
    exif = Image.Exif()
    try:
        exif.load(data)  # accepts the payload with or without the "Exif\0\0" prefix
    except Exception:
        return 1  # unreadable metadata does not make the pixels unreadable
    value = exif.get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


class _UnsupportedMode(ValueError):
    """A pixel format PIL decodes but cannot convert to RGB (e.g. LAB); turned into UnreadableImage."""


# --- decoding --------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image: transparency (alpha or colour key) onto white, 16-bit scaled.

    The one conversion used by training, caching and every captioner, so an image looks the same everywhere.

    Raises:
        ValueError: for a pixel format PIL cannot convert to RGB (e.g. LAB).
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    if _has_transparency(image):
        return _on_white(image.convert("RGBA"))
    if mode == "RGB":
        return image.copy()  # detach from the file so the caller owns an independent image
    try:
        return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX...
    except ValueError as err:
        raise _UnsupportedMode(mode) from err


def _has_transparency(image: Image.Image) -> bool:
    mode = image.mode
    return mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info)  # palette/colour-key transparency (tRNS)


def _on_white(rgba: Image.Image) -> Image.Image:
    # White, not black: transparent backgrounds of cut-outs and logos are meant to be "nothing", and a model
    # trained on black halos learns them. (sd-scripts' convert("RGB") keeps whatever colour hides under alpha 0.)
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale: scale to 8 bits (PIL's convert("L") would clip at 255)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0  # float images conventionally hold 0..1
    elif image.mode != "F":
        values = np.clip(values, 0, 65535) / 257.0  # 65535 -> 255, 32768 -> 127.5 -> 128
    gray = np.clip(np.nan_to_num(values) + 0.5, 0, 255).astype(np.uint8)  # round half up
    return Image.fromarray(gray, mode="L").convert("RGB")


def _describe(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, _UnsupportedMode):
        return f"unsupported colour mode {text!r}; re-save the image as RGB"
    if isinstance(err, UnidentifiedImageError):
        return "not an image file, or a format Pillow cannot read"
    if isinstance(err, Image.DecompressionBombError):
        return f"too many pixels to decode safely ({text})"
    if isinstance(err, EOFError) or "truncated" in text.lower():
        return f"the file is truncated ({text or 'unexpected end of file'}); re-export or re-download it"
    if isinstance(err, OSError) and err.strerror:
        return f"cannot be read ({err.strerror})"
    if isinstance(err, SyntaxError | zlib.error | struct.error | ValueError | OSError):
        return f"corrupt image data ({text or type(err).__name__})"
    return f"cannot be decoded ({type(err).__name__}: {text})"
