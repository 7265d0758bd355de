"""What the Dataset tab shows, as plain functions: the concepts table, the balancing proposal, gallery thumbnails,
and the settings that point the doctor and the Parameters tab at a project folder.

The folder work itself (copying, converting, renaming) is engine.data.project; nothing here changes files. Every
folder typed into the tab passes `checked_folder` first (the GUI's one rule for paths, gui.browse.FileRoots.check).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageOps

from engine.data.images import is_image_file, to_rgb
from engine.data.project import Concept, ProjectError, list_concepts
from gui.browse import FileRoots, PathNotAllowed

CONCEPT_COLUMNS = ["folder", "images", "repeats", "samples/epoch"]
PROPOSAL_COLUMNS = ["folder", "images", "repeats now", "proposed repeats", "samples/epoch"]
GALLERY_LIMIT = 24
THUMBNAIL_SIDE = 256


PROJECT_LABEL = "Project folder"
SOURCE_LABEL = "Images folder"


def checked_folder(text: str, label: str, roots: FileRoots) -> Path:
    """A folder typed into the tab, with ~ expanded, once the app may use it.

    Raises:
        ProjectError: with the message of every GUI path field (outside the roots, or hidden, and the flag to use).
    """
    try:
        return roots.check(text.strip(), label)
    except PathNotAllowed as error:
        raise ProjectError(str(error)) from None


def project_path(text: str | None, roots: FileRoots) -> Path:
    """The project folder typed by the user, or a ProjectError saying what to fill in or why it may not be used."""
    if not (text or "").strip():
        raise ProjectError("choose a project folder first (a new folder, or one made here before)")
    return checked_folder(text, PROJECT_LABEL, roots)


def source_path(text: str | None, roots: FileRoots) -> str:
    """The images folder to copy from, checked like the project folder; '' stays '' (the import says to fill it)."""
    return str(checked_folder(text, SOURCE_LABEL, roots)) if (text or "").strip() else ""


def _shown_name(concept: Concept) -> str:
    """'img/10_sks dog': the part of the path that tells training and regularization concepts apart."""
    return f"{concept.folder.parent.name}/{concept.folder.name}"


def concepts_frame(concepts: list[Concept]) -> pd.DataFrame | None:
    """One row per concept folder; None (an empty table) when there are none."""
    if not concepts:
        return None
    return pd.DataFrame([[_shown_name(c), c.images, c.repeats, c.samples_per_epoch] for c in concepts],
                        columns=CONCEPT_COLUMNS)


def overview_markdown(project: Path, concepts: list[Concept]) -> str:
    """A line above the table: how many images of each kind and the samples they give per epoch."""
    if not (project / "img").is_dir():
        return f"`{project}` is not a project yet: press **Create project**."
    train = [c for c in concepts if not c.is_reg]
    reg = [c for c in concepts if c.is_reg]
    text = (f"**{len(train)} training concept(s)**, {sum(c.images for c in train)} images → "
            f"{sum(c.samples_per_epoch for c in train)} samples per epoch.")
    if reg:
        text += (f" {len(reg)} regularization concept(s), {sum(c.images for c in reg)} images (training draws as "
                 f"many of them as it has training samples).")
    return text


def proposal_frame(concepts: list[Concept], proposal: Mapping[Path, int]) -> pd.DataFrame:
    """The balancing proposal beside the current repeats, for the user to confirm."""
    rows = [[_shown_name(c), c.images, c.repeats, proposal[c.folder], c.images * proposal[c.folder]]
            for c in concepts if c.folder in proposal]
    return pd.DataFrame(rows, columns=PROPOSAL_COLUMNS)


def proposal_markdown(concepts: list[Concept], proposal: Mapping[Path, int], target: int) -> str:
    if not proposal:
        return "No training concept has images to balance."
    changes = sum(1 for c in concepts if c.folder in proposal and proposal[c.folder] != c.repeats)
    if not changes:
        return f"The repeats already give each concept about {target} samples per epoch; nothing to rename."
    return (f"To give each training concept about {target} samples per epoch, {changes} folder(s) would be "
            f"renamed. Regularization folders keep their repeats. Confirm below to rename them.")


def renames_markdown(renames: list[tuple[Path, Path]]) -> str:
    if not renames:
        return "Nothing to rename."
    return "Renamed " + ", ".join(f"`{old.name}` → `{new.name}`" for old, new in renames) + "."


def doctor_overrides(project: Path, concepts: list[Concept]) -> dict[str, Any]:
    """Point the doctor's config at the project's folders, clearing any other way of naming a dataset (a dataset
    TOML or inline datasets would otherwise take precedence over the folders)."""
    has_reg = any(concept.is_reg for concept in concepts)
    return {"dataset": {"config_file": "", "datasets": [], "in_json": "", "train_data_dir": str(project / "img"),
                        "reg_data_dir": str(project / "reg") if has_reg else ""}}


def parameters_patch(project: Path, concepts: list[Concept]) -> dict[str, str]:
    """The Parameters fields that make a run train on this project and write into its model/ and log/."""
    dataset = doctor_overrides(project, concepts)["dataset"]
    return {"dataset.train_data_dir": dataset["train_data_dir"], "dataset.reg_data_dir": dataset["reg_data_dir"],
            "saving.output_dir": str(project / "model"), "logging.logging_dir": str(project / "log")}


def gallery_items(project: Path, limit: int = GALLERY_LIMIT) -> list[tuple[Image.Image, str]]:
    """Thumbnails of the first `limit` images of the project (training concepts first), captioned with their
    folder. Thumbnails, not the files: the page stays light and serves no file path. The project must have passed
    project_path."""
    items: list[tuple[Image.Image, str]] = []
    for concept in list_concepts(project):
        for path in sorted(p for p in concept.folder.iterdir() if p.is_file() and is_image_file(p)):
            if len(items) >= limit:
                return items
            picture = thumbnail(path)
            if picture is not None:
                items.append((picture, f"{concept.folder.name}/{path.name}"))
    return items


def thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> Image.Image | None:
    """An upright RGB thumbnail, or None for a file that cannot be read (the doctor reports those)."""
    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (side * 2, side * 2))  # JPEG decodes at a fraction of its size: much faster
            picture = to_rgb(ImageOps.exif_transpose(opened))
    except Exception:  # a preview skips what it cannot show; PIL raises many types for damaged files
        return None
    picture.thumbnail((side, side))
    return picture
