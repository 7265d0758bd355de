"""The Dataset tab's "Prepare fine-tune metadata" panel, apart from Gradio: the form checked into a
engine.data.finetune_metadata.PrepareRequest, the result as the page shows it, and the Parameters fields that make a
run fine-tune on the file.

The work itself (merge caption and tag files, clean, write a new JSON) is engine.data.finetune_metadata, run
in-process: it reads small text files and writes one JSON, nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config.choices import dotted_caption_extension
from engine.data.finetune_metadata import (
    CAPTION,
    DEFAULT_EXTENSIONS,
    TAGS,
    MetadataWriteError,
    PrepareReport,
    PrepareRequest,
    prepare_metadata,
)
from gui.browse import FileRoots, PathNotAllowed

FOLDER_LABEL, IN_LABEL, OUT_LABEL = "Images folder", "Merge into", "New metadata file"
CAPTION_DEFAULT, TAGS_DEFAULT = DEFAULT_EXTENSIONS[CAPTION], DEFAULT_EXTENSIONS[TAGS]


class MetadataViewError(ValueError):
    """A form value that cannot be used; the message names the field and says what to do."""


@dataclass(frozen=True)
class MetadataForm:
    """What the panel's widgets hold."""

    folder: str = ""
    output: str = ""
    in_json: str = ""
    captions: bool = True
    caption_extension: str = CAPTION_DEFAULT
    tags: bool = True
    tags_extension: str = TAGS_DEFAULT
    clean: bool = False
    full_path: bool = False
    recursive: bool = False


def _extension(text: str | None, default: str, label: str) -> str:
    try:
        return dotted_caption_extension((text or "").strip() or default)
    except ValueError as error:
        raise MetadataViewError(f"{label}: {error}.") from None


def _path(text: str | None, label: str, roots: FileRoots, what: str) -> Path:
    if not (text or "").strip():
        raise MetadataViewError(f"{label}: choose {what} first.")
    try:
        return roots.check(text.strip(), label)
    except PathNotAllowed as error:
        raise MetadataViewError(str(error)) from None


def metadata_request(form: MetadataForm, roots: FileRoots) -> PrepareRequest:
    """The form as a request, every path checked against the folders the app may use.

    Raises:
        MetadataViewError: a field that is empty, not allowed, or has an extension that is not a caption extension.
    """
    if not form.captions and not form.tags:
        raise MetadataViewError("Tick Merge captions, Merge tags, or both.")
    folder = _path(form.folder, FOLDER_LABEL, roots, "the folder of the training images")
    output = _path(form.output, OUT_LABEL, roots, "a name for the new metadata file (e.g. meta_clean.json)")
    in_json = _path(form.in_json, IN_LABEL, roots, "") if (form.in_json or "").strip() else None
    return PrepareRequest(
        folder=folder, output=output, in_json=in_json,
        caption_extension=_extension(form.caption_extension, CAPTION_DEFAULT, "Caption extension")
        if form.captions else None,
        tags_extension=_extension(form.tags_extension, TAGS_DEFAULT, "Tags extension") if form.tags else None,
        clean=form.clean, full_path=form.full_path, recursive=form.recursive)


def write_metadata(form: MetadataForm, roots: FileRoots) -> tuple[dict[str, str] | None, str]:
    """Write the metadata the form describes: (the Parameters fields that train on it, the page's Markdown), or
    (None, why nothing was written)."""
    try:
        request = metadata_request(form, roots)
        report = prepare_metadata(request)
    except (MetadataViewError, MetadataWriteError) as error:
        return None, f"**Nothing was written:** {error}"
    except OSError as error:
        return None, f"**Nothing was written:** {error}. Check that the folder is writable."
    return parameters_patch(report, request.folder), report_markdown(report)


def report_markdown(report: PrepareReport) -> str:
    lines = report.lines()
    text = f"**Wrote {report.entries} entries to `{report.output}`.**"
    notes = [f"- {line}" for line in lines[:-1]]
    return "\n".join([text, *notes, "", "Press **Use in Parameters** to fine-tune on it "
                                          "(method finetune, this folder and this file)."])


def parameters_patch(report: PrepareReport, folder: Path) -> dict[str, str]:
    """The Parameters fields that make a run fine-tune on the written file: sd-scripts' train_data_dir + in_json
    (relative keys are read against the folder; regularization folders do not go with fine-tuning)."""
    return {"method": "finetune", "dataset.train_data_dir": str(folder), "dataset.reg_data_dir": "",
            "dataset.in_json": str(report.output)}
