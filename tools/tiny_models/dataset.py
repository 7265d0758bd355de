"""A small DreamBooth-style image folder: ``img/10_sks dog/`` (captioned) and ``reg/1_dog/`` (no captions).

Folder names follow kohya's ``<repeats>_<class tokens>`` convention. Images are flat-coloured shapes of a few
sizes (some non-square, so aspect-ratio bucketing has something to do), in both PNG and JPEG.
"""

from __future__ import annotations

from pathlib import Path

INSTANCE_FOLDER = "img/10_sks dog"
REGULARISATION_FOLDER = "reg/1_dog"

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

# (file stem, extension, (width, height), shape colour, shape, background colour)
INSTANCE_IMAGES = (
    ("01_red_square", "png", (64, 64), "red", "square", "white"),
    ("02_blue_circle", "jpg", (96, 64), "blue", "circle", "white"),
    ("03_green_triangle", "png", (64, 96), "green", "triangle", "white"),
    ("04_yellow_square", "jpg", (80, 80), "yellow", "square", "black"),
    ("05_red_circle", "png", (96, 72), "red", "circle", "black"),
    ("06_blue_triangle", "jpg", (72, 96), "blue", "triangle", "white"),
)
REGULARISATION_COUNT = 8


def _draw(size: tuple[int, int], colour: str, shape: str, background: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, COLOURS[background])
    width, height = size
    side = min(width, height) // 2
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(left, top + side), (left + side, top + side), (left + side // 2, top)], fill=COLOURS[colour])
    return image


def _save(image, path: Path) -> None:
    # Fixed JPEG settings: the same bytes on every build.
    options = {"quality": 90, "optimize": False} if path.suffix == ".jpg" else {}
    image.save(path, **options)


def caption_for(colour: str, shape: str, background: str) -> str:
    """The caption stored next to an instance image: trigger word + class, then what is drawn."""
    return f"sks dog, {colour} {shape}, {background} background"


def write_dataset(folder: Path) -> None:
    """Write the instance and regularisation images (and the instance captions) under ``folder``."""
    instance = folder / INSTANCE_FOLDER
    instance.mkdir(parents=True, exist_ok=True)
    for stem, extension, size, colour, shape, background in INSTANCE_IMAGES:
        _save(_draw(size, colour, shape, background), instance / f"{stem}.{extension}")
        (instance / f"{stem}.txt").write_text(caption_for(colour, shape, background) + "\n", encoding="utf-8")

    regularisation = folder / REGULARISATION_FOLDER
    regularisation.mkdir(parents=True, exist_ok=True)
    shapes, colours = ("square", "circle", "triangle"), ("red", "green", "blue", "yellow")
    for index in range(REGULARISATION_COUNT):
        image = _draw((64, 64), colours[index % 4], shapes[index % 3], "white" if index % 2 else "black")
        _save(image, regularisation / f"dog_{index:02d}.{'png' if index % 2 else 'jpg'}")
