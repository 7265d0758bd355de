"""A kohya-style project folder made from a flat folder of images, and its concepts (folders) and their repeats.

The layout is the one kohya_ss's "prepare training data" makes and `dataset.train_data_dir` / `reg_data_dir` read:

    <project>/img/<repeats>_<identifier> <class>/   training images and their captions
    <project>/reg/<repeats>_<class>/                regularization images
    <project>/model/                                trained files
    <project>/log/                                  TensorBoard logs

The user's pictures are copied, never moved, and nothing already in the project is overwritten: a file with the
same name and the same bytes is skipped (so importing twice is harmless), a different file with the same name is
kept beside it under a new name. A file that cannot be read is reported by name and the rest still get copied.
"""

from __future__ import annotations

import filecmp
import io
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image

from engine.config.choices import CAPTION_EXTENSIONS
from engine.config.dataset import parse_legacy_folder_name
from engine.data.images import IMAGE_EXTENSIONS, UnreadableImage, is_image_file, load_rgb_image
from engine.files import atomic_output, atomic_write_bytes

PROJECT_FOLDERS = ("img", "reg", "model", "log")
# Copied as they are: every tool in the SD world (sd-scripts, captioners, A1111, browsers) reads these alike.
KEPT_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
# Converted to PNG. BMP is among them although training reads it: it is uncompressed (a folder of BMPs is several
# times the size) and its rarer variants trip other tools. Animated formats give their first frame.
CONVERTED_EXTENSIONS = frozenset({".bmp", ".dib", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jfif",
                                  ".jp2", ".j2k", ".qoi", ".tga", ".psd", ".ppm", ".pgm", ".pbm", ".pnm"})
# Pixel formats every tool decodes the same way. CMYK, 16-bit and float images are converted (when asked), because
# tools disagree on them (sd-scripts' convert("RGB") clips 16-bit grey to white), and the converted PNG holds
# exactly the pixels Atelier trains on: engine.data.images.load_rgb_image does the conversion.
_SOURCE_EXTENSIONS = IMAGE_EXTENSIONS | CONVERTED_EXTENSIONS
_PORTABLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
_INVALID_NAME_CHARACTERS = frozenset('/\\:*?"<>|')


class ProjectError(ValueError):
    """A request that cannot be carried out; the message names the path or value and says what to do."""


@dataclass
class ProjectReport:
    """What one import did. Names are the source files' names; `renamed_conflicts` holds (source, new name)."""

    concept_dir: Path
    copied: list[str] = field(default_factory=list)  # images copied as they are
    converted: list[str] = field(default_factory=list)  # images written as PNG
    captions: list[str] = field(default_factory=list)  # caption files copied
    skipped_existing: list[str] = field(default_factory=list)  # already in the project with the same bytes
    renamed_conflicts: list[tuple[str, str]] = field(default_factory=list)  # a different file had the name
    not_converted: list[str] = field(default_factory=list)  # formats training cannot read, with convert=False
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def summary(self) -> str:
        """One or two sentences a user reads after an import: counts, then each file that needs attention."""
        where = f"{self.concept_dir.parent.name}/{self.concept_dir.name}"
        parts = [f"{len(self.copied)} copied", f"{len(self.converted)} converted to PNG",
                 f"{len(self.captions)} caption file(s)"]
        if self.skipped_existing:
            parts.append(f"{len(self.skipped_existing)} already there")
        if self.renamed_conflicts:
            renamed = ", ".join(f"{source} as {name}" for source, name in self.renamed_conflicts)
            parts.append(f"{len(self.renamed_conflicts)} kept under a new name because a different file had "
                         f"the name ({renamed})")
        if self.not_converted:
            parts.append(f"{len(self.not_converted)} not copied because conversion is off "
                         f"({', '.join(self.not_converted)})")
        text = f"Images into {where}: {'; '.join(parts)}."
        if self.failed:
            failures = "; ".join(f"{name}: {reason}" for name, reason in self.failed)
            text += f" Left out {len(self.failed)} file(s) that could not be read: {failures}."
        return text


@dataclass(frozen=True)
class Concept:
    """One '<repeats>_<name>' folder of a project."""

    folder: Path
    repeats: int
    name: str  # the class tokens, e.g. 'sks dog'
    images: int
    is_reg: bool

    @property
    def samples_per_epoch(self) -> int:
        return self.images * self.repeats


# --- creating and importing --------------------------------------------------------------------------------


def create_project(project_dir: str | Path, *, source: str | Path, identifier: str, class_name: str = "",
                   repeats: int, convert: bool = True) -> ProjectReport:
    """Make img/, reg/, model/ and log/ in `project_dir` and copy `source`'s images into a first concept folder.

    An existing project folder is fine (nothing in it is overwritten); an existing concept of the same name is
    filled further. Raises ProjectError for a project path that is a file, a missing or image-less source, a
    name that cannot be a folder name, or repeats below 1.
    """
    project = Path(project_dir).expanduser()
    if project.exists() and not project.is_dir():
        raise ProjectError(f"the project folder {project} is a file; choose a new or existing folder instead")
    folder_name = concept_folder_name(repeats, identifier, class_name)
    images = _source_images(source)
    for name in PROJECT_FOLDERS:
        (project / name).mkdir(parents=True, exist_ok=True)
    return _import(images, _concept_dir(project / "img", folder_name), convert)


def add_concept(project_dir: str | Path, *, source: str | Path, identifier: str, class_name: str = "",
                repeats: int, convert: bool = True, is_reg: bool = False) -> ProjectReport:
    """Copy `source`'s images into a new (or the same-named) concept of an existing project.

    A regularization concept (is_reg) goes to reg/ and is usually named by its class alone ('1_dog').
    """
    project = Path(project_dir).expanduser()
    if not (project / "img").is_dir():
        raise ProjectError(f"{project} is not a project folder (it has no img/ subfolder); create the project "
                           f"first")
    folder_name = concept_folder_name(repeats, identifier, class_name)
    images = _source_images(source)
    parent = project / ("reg" if is_reg else "img")
    parent.mkdir(exist_ok=True)
    return _import(images, _concept_dir(parent, folder_name), convert)


def concept_folder_name(repeats: int, identifier: str, class_name: str = "") -> str:
    """'<repeats>_<identifier> <class>' ('10_sks dog'), or '<repeats>_<identifier>' without a class."""
    _check_repeats(repeats)
    words = [_checked_name(identifier, "identifier"), _checked_name(class_name, "class")]
    tokens = " ".join(word for word in words if word)
    if not tokens:
        raise ProjectError("give an identifier (e.g. 'sks') or a class (e.g. 'dog') to name the concept folder")
    return f"{repeats}_{tokens}"


def _check_repeats(repeats: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ProjectError(f"repeats must be a whole number of at least 1, not {repeats!r}")


def _checked_name(value: str, what: str) -> str:
    value = (value or "").strip()
    bad = sorted({char for char in value if char in _INVALID_NAME_CHARACTERS or ord(char) < 32})
    if bad:
        shown = " ".join(repr(char) for char in bad)
        raise ProjectError(f"the {what} {value!r} contains {shown}, which cannot be part of a folder name; use "
                           f"letters, digits, spaces, '_' or '-'")
    if value.endswith("."):
        raise ProjectError(f"the {what} {value!r} ends with '.', which some systems drop from folder names; "
                           f"remove the dot")
    return value


def _concept_dir(parent: Path, folder_name: str) -> Path:
    """The concept folder, refusing a second folder for the same concept under another repeat count."""
    tokens = folder_name.split("_", 1)[1]
    for existing in (entry for entry in parent.iterdir() if entry.is_dir() and entry.name != folder_name):
        parsed = parse_legacy_folder_name(existing.name)
        if parsed is not None and parsed.class_tokens == tokens:
            raise ProjectError(f"the concept '{tokens}' already exists as {existing}; use {parsed.repeats} "
                               f"repeats to add to it, or change its repeats with Balance first")
    target = parent / folder_name
    target.mkdir(exist_ok=True)
    return target


def _source_images(source: str | Path) -> list[Path]:
    folder = Path(source).expanduser()
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ProjectError(f"the images folder {folder} {what}; choose the folder that holds your pictures")
    images = sorted(entry for entry in folder.iterdir() if entry.is_file() and not entry.name.startswith(".")
                    and entry.suffix.lower() in _SOURCE_EXTENSIONS)
    if not images:
        kinds = " ".join(sorted(_SOURCE_EXTENSIONS))
        raise ProjectError(f"the images folder {folder} holds no images ({kinds}); subfolders are not searched, "
                           f"so choose the folder the pictures are in")
    return images


def _import(images: list[Path], target: Path, convert: bool) -> ProjectReport:
    report = ProjectReport(target)
    taken = {entry.stem.casefold() for entry in target.iterdir()}
    for image in images:
        try:
            _import_one(image, target, convert, taken, report)
        except UnreadableImage as error:
            report.failed.append((image.name, error.reason))
        except OSError as error:  # a full disk or a permission problem on one file should not stop the rest
            report.failed.append((image.name, f"could not be copied ({error.strerror or error})"))
    return report


def _import_one(image: Path, target: Path, convert: bool, taken: set[str], report: ProjectReport) -> None:
    suffix = image.suffix.lower()
    if not convert and suffix not in IMAGE_EXTENSIONS:
        report.not_converted.append(image.name)
        return
    mode, pixels = _inspect(image)
    if convert and (suffix not in KEPT_EXTENSIONS or mode not in _PORTABLE_MODES):
        buffer = io.BytesIO()
        pixels.save(buffer, format="PNG")
        data = buffer.getvalue()
        placed, state = _place(target, image.stem, ".png", taken, lambda path: path.read_bytes() == data)
        if state != "same":
            atomic_write_bytes(placed, data)
            report.converted.append(image.name)
    else:
        placed, state = _place(target, image.stem, image.suffix, taken,
                               lambda path: filecmp.cmp(image, path, shallow=False))
        if state != "same":
            with atomic_output(placed) as temporary:
                shutil.copy2(image, temporary)
            report.copied.append(image.name)
    if state == "same":
        report.skipped_existing.append(image.name)
    elif state == "renamed":
        report.renamed_conflicts.append((image.name, placed.name))
    _copy_captions(image, placed, report)


def _inspect(image: Path) -> tuple[str, Image.Image]:
    """The stored pixel mode and the pixels as training sees them. Decoding the whole image now reports a damaged
    file at import, not hours later; the decoded pixels are what a conversion writes."""
    register_optional_formats()
    try:
        pixels = load_rgb_image(image)
    except UnreadableImage as error:
        if image.suffix.lower() in {".heic", ".heif"}:
            raise UnreadableImage(image, f"{error.reason} (install pillow-heif to read HEIC photos)") from error
        raise
    with Image.open(image) as opened:
        return opened.mode, pixels


@cache
def register_optional_formats() -> None:
    """HEIC (iPhone photos) needs the optional pillow-heif plugin; use it when it is installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


def _place(target: Path, stem: str, suffix: str, taken: set[str],
           same: Callable[[Path], bool]) -> tuple[Path, str]:
    """Where an incoming image goes: ('same' when it is already there), its own name, or '<stem>-N' beside a
    different file. A stem is free only when no file at all has it, so a caption never pairs with a stranger."""
    existing = target / f"{stem}{suffix}"
    if existing.is_file() and same(existing):
        return existing, "same"
    candidate, number = stem, 1
    while candidate.casefold() in taken:
        number += 1
        candidate = f"{stem}-{number}"
    taken.add(candidate.casefold())
    return target / f"{candidate}{suffix}", "new" if candidate == stem else "renamed"


def _copy_captions(image: Path, placed: Path, report: ProjectReport) -> None:
    """Copy the image's caption files ('<stem>.txt', '<stem>.caption', any allowed caption extension) beside the
    placed image, under its stem. One that is already there stays: it may have been edited in the project since the
    last import."""
    for extension in CAPTION_EXTENSIONS:
        caption = image.with_suffix(extension)
        destination = placed.with_suffix(extension)
        if caption.is_file() and not destination.exists():
            with atomic_output(destination) as temporary:
                shutil.copy2(caption, temporary)
            report.captions.append(caption.name)


# --- concepts and balancing --------------------------------------------------------------------------------


def list_concepts(project_dir: str | Path) -> list[Concept]:
    """The valid '<repeats>_<name>' folders under img/ then reg/ (others are the doctor's to report)."""
    project = Path(project_dir).expanduser()
    concepts = []
    for parent, is_reg in ((project / "img", False), (project / "reg", True)):
        if not parent.is_dir():
            continue
        for folder in sorted(entry for entry in parent.iterdir() if entry.is_dir()):
            parsed = parse_legacy_folder_name(folder.name)
            if parsed is None or parsed.repeats < 1:
                continue
            count = sum(1 for entry in folder.iterdir() if entry.is_file() and is_image_file(entry))
            concepts.append(Concept(folder, parsed.repeats, parsed.class_tokens, count, is_reg))
    return concepts


def balance_repeats(concepts: list[Concept], target_samples_per_epoch: int) -> dict[Path, int]:
    """Repeats giving each training concept about `target_samples_per_epoch` samples (images x repeats), at least 1.

    Regularization concepts are left alone: training draws only as many regularization samples as there are
    training samples, so their repeats only decide how many distinct images can be drawn. Empty folders too.
    """
    if target_samples_per_epoch < 1:
        raise ProjectError(f"the target samples per epoch must be at least 1, not {target_samples_per_epoch}")
    return {concept.folder: max(1, math.floor(target_samples_per_epoch / concept.images + 0.5))
            for concept in concepts if not concept.is_reg and concept.images}


def apply_repeats(project_dir: str | Path, new_repeats: Mapping[str | Path, int]) -> list[tuple[Path, Path]]:
    """Rename concept folders to new repeat counts ('10_sks dog' -> '5_sks dog'); returns (old, new) per rename.

    Everything is checked before anything is renamed, so a refusal leaves the project as it was.
    """
    project = Path(project_dir).expanduser().resolve()
    renames = []
    for folder, repeats in new_repeats.items():
        folder = Path(folder).expanduser().resolve()
        if folder.parent not in (project / "img", project / "reg") or not folder.is_dir():
            raise ProjectError(f"{folder} is not a concept folder of {project}; reload the concepts and try again")
        parsed = parse_legacy_folder_name(folder.name)
        if parsed is None:
            raise ProjectError(f"the folder name '{folder.name}' has no repeat count in front; rename it like "
                               f"'10_{folder.name}' first")
        _check_repeats(repeats)
        target = folder.with_name(f"{repeats}_{parsed.class_tokens}")
        if target != folder:
            renames.append((folder, target))
    targets = [target for _, target in renames]
    for target in targets:
        if target.exists() or targets.count(target) > 1:
            raise ProjectError(f"cannot rename to {target.name}: a folder of that name already exists in "
                               f"{target.parent}; merge or rename it first")
    for folder, target in renames:
        folder.rename(target)
    return renames
