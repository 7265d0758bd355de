"""The server-side file browser: a path textbox the user can type into, with completion and a folder listing.

No native dialogs (they open on the server's screen, or nowhere on a remote machine). Browsing is limited to the
user's home folder, the runs folder and the folders given with --allow-path, without the hidden folders of the first
two (~/.ssh, ~/.config, ...); what may be listed is decided in gui/browse.py (FileRoots), which this module only lays
out as Gradio components. The handlers that use a path check it again with FileRoots.check: a textbox can hold
anything.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from gui.browse import (
    KINDS,
    BrowseError,
    FileRoots,
    Listing,
    complete,
    count_images,
    entry_detail,
    list_folder,
    start_folder,
)

__all__ = ["FileRoots", "path_field"]

SUGGESTIONS = 12  # completions shown under the box
# Listing rows per page: Gradio pages a long table (its rows cannot scroll inside a box without custom CSS), and
# 15 rows keep the panel about as tall as half a screen. The listing itself stops at LISTING_LIMIT entries.
ROWS_PER_PAGE = 15
LISTING_LIMIT = 500
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|])")


def _md(text: str) -> str:
    """Text shown literally in Markdown: paths may hold * or _ that would otherwise turn into emphasis."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _cell(text: str) -> str:
    """A table cell shown whole and left-aligned: Gradio cuts 'textbox' example cells at 60 characters, and long
    paths must stay readable, so cells are escaped HTML."""
    return f'<span style="display:block;text-align:left">{html.escape(text)}</span>'


@dataclass(frozen=True)
class _Spec:
    """What one path field browses: its roots, folders or files, and the file extensions shown (any when empty)."""

    roots: FileRoots
    kind: str
    extensions: tuple[str, ...]

    def listing(self, folder: str | Path, show_hidden: bool) -> Listing:
        return list_folder(folder, self.roots, kind=self.kind, extensions=self.extensions,
                           show_hidden=show_hidden, limit=LISTING_LIMIT)

    def complete(self, text: str) -> list[str]:
        return complete(text, self.roots, kind=self.kind, extensions=self.extensions, limit=SUGGESTIONS)


def _listing_view(listing: Listing) -> tuple[list[list[str]], list[str]]:
    """The table rows of a listing ('..' first when the user may go up) and the path behind each row."""
    rows, paths = [], []
    if listing.parent is not None:
        rows.append([_cell(".."), _cell("up one folder")])
        paths.append(f"{listing.parent}/")
    for entry in listing.entries:
        rows.append([_cell(f"{entry.name}/" if entry.is_dir else entry.name), _cell(entry_detail(entry))])
        paths.append(f"{entry.path}/" if entry.is_dir else str(entry.path))
    return rows, paths


def _heading(spec: _Spec, folder: Path, listing: Listing | None, notes: list[str]) -> str:
    """The folder shown, with its own image count for a folder field (what a user picking a dataset wants to know),
    then what was cut off and any notes (such as why nothing is listed)."""
    title, lines = f"**Folder:** `{folder}`", []
    if listing is not None:
        title += _image_note(folder) if spec.kind == "folder" else ""
        if not listing.entries:
            lines.append("No folders here." if spec.kind == "folder" else "Nothing to show here.")
        if listing.more:
            lines.append(f"... and {listing.more} more not shown: type the start of a name in the box to narrow.")
    return "\n\n".join([title, *lines, *(f"**{_md(note)}**" for note in notes)])


def _image_note(folder: Path) -> str:
    counted = count_images(folder)
    if counted is None:
        return ""
    images, partial = counted
    return f" ({images}{'+' if partial else ''} images)"


def _show_folder(spec: _Spec, folder: str | Path, show_hidden: bool, notes: list[str]) -> tuple[str, Any, dict]:
    """The heading, the table and the panel state for folder; a folder that cannot be listed shows why."""
    try:
        listing = spec.listing(folder, show_hidden)
    except BrowseError as error:
        heading = _heading(spec, Path(folder), None, [*notes, str(error)])
        return heading, gr.Dataset(samples=[]), {"folder": None, "paths": []}
    rows, paths = _listing_view(listing)
    return (_heading(spec, listing.folder, listing, notes), gr.Dataset(samples=rows),
            {"folder": str(listing.folder), "paths": paths})


def _add_completion(box: gr.Textbox, spec: _Spec, elem_id: str) -> gr.Dataset:
    """Suggestions under the box while the user types; clicking one fills the box (a folder then offers its own
    entries, like a shell's tab completion)."""
    suggestions = gr.Dataset(components=["html"], samples=[], type="index", layout="table", visible=False,
                             samples_per_page=SUGGESTIONS, show_label=False, elem_id=f"{elem_id}-suggestions")
    offered = gr.State([])

    def offer(text: str) -> dict:
        paths = spec.complete(text)
        return {suggestions: gr.Dataset(samples=[[_cell(path)] for path in paths], visible=bool(paths)), offered: paths}

    def choose(index: int | None, paths: list[str]) -> dict:
        if index is None or not 0 <= index < len(paths):
            return {box: gr.skip()}  # not {}: Gradio reads an empty dict as a missing value
        chosen = paths[index]
        return {box: chosen} | (offer(chosen) if chosen.endswith("/") else offer_none())

    def offer_none() -> dict:
        return {suggestions: gr.Dataset(samples=[], visible=False), offered: []}

    box.input(offer, inputs=box, outputs=[suggestions, offered], trigger_mode="always_last", show_progress="hidden")
    box.submit(offer_none, outputs=[suggestions, offered], show_progress="hidden")
    suggestions.click(choose, inputs=[suggestions, offered], outputs=[box, suggestions, offered],
                      show_progress="hidden")
    return suggestions


def _add_listing(box: gr.Textbox, browse: gr.Button, suggestions: gr.Dataset, spec: _Spec, elem_id: str) -> None:
    """The panel Browse opens: the folder's entries; a folder row enters it, a file row (kind 'file') or 'Use this
    folder' (kind 'folder') fills the box and closes the panel."""
    with gr.Column(visible=False, variant="panel", elem_id=f"{elem_id}-listing") as panel:
        heading = gr.Markdown(elem_id=f"{elem_id}-folder", padding=True)
        table = gr.Dataset(components=["html", "html"], headers=["Name", _detail_header(spec.kind)],
                           samples=[], type="index", layout="table", samples_per_page=ROWS_PER_PAGE,
                           show_label=False, elem_id=f"{elem_id}-entries")
        with gr.Row():
            use = gr.Button("Use this folder", variant="primary", visible=spec.kind == "folder",
                            elem_id=f"{elem_id}-use")
            show_hidden = gr.Checkbox(False, label="Show hidden", elem_id=f"{elem_id}-hidden",
                                      info="inside --allow-path folders; never those of your home folder")
            close = gr.Button("Close", elem_id=f"{elem_id}-close")
    shown = gr.State({"folder": None, "paths": []})
    view = [heading, table, shown]

    def open_panel(text: str, hidden: bool) -> dict:
        try:
            folder, note = start_folder(text or "", spec.roots)
        except BrowseError as error:
            return {panel: gr.Column(visible=True), heading: f"**{_md(str(error))}**"}
        return dict(zip(view, _show_folder(spec, folder, hidden, [note] if note else []), strict=True)) | {
            panel: gr.Column(visible=True), suggestions: gr.Dataset(visible=False)}

    def pick(index: int | None, state: dict, hidden: bool) -> dict:
        paths = state["paths"]
        if index is None or not 0 <= index < len(paths):
            return {box: gr.skip()}
        chosen = paths[index]
        if chosen.endswith("/"):
            return dict(zip(view, _show_folder(spec, chosen, hidden, []), strict=True))
        return {box: chosen, panel: gr.Column(visible=False)}

    def refresh(state: dict, hidden: bool) -> dict:
        return dict(zip(view, _show_folder(spec, state["folder"], hidden, []), strict=True)) if state["folder"] else {}

    def use_folder(state: dict) -> dict:
        return {box: state["folder"], panel: gr.Column(visible=False)} if state["folder"] else {}

    browse.click(open_panel, inputs=[box, show_hidden], outputs=[panel, suggestions, *view])
    table.click(pick, inputs=[table, shown, show_hidden], outputs=[box, panel, *view])
    show_hidden.input(refresh, inputs=[shown, show_hidden], outputs=view)
    use.click(use_folder, inputs=shown, outputs=[box, panel])
    close.click(lambda: gr.Column(visible=False), outputs=panel)


def _detail_header(kind: str) -> str:
    return "Images" if kind == "folder" else "Size"


def path_field(label: str, roots: FileRoots, *, kind: str = "folder", elem_id: str, value: str = "",
               info: str | None = None, placeholder: str | None = None,
               extensions: tuple[str, ...] = ()) -> gr.Textbox:
    """A path input with completion and a Browse panel, built in the current layout. kind is 'folder' or 'file';
    for 'file', extensions (such as ('.safetensors', '.ckpt')) limits the files listed. Returns the textbox
    holding the path; use it as an input or output like any textbox."""
    if kind not in KINDS:
        raise ValueError(f"path_field {elem_id}: kind must be one of {KINDS}, not {kind!r}")
    spec = _Spec(roots, kind, tuple(extensions))
    with gr.Column(elem_id=f"{elem_id}-field"):
        with gr.Row(equal_height=True):
            box = gr.Textbox(label=label, value=value, info=info, placeholder=placeholder, elem_id=elem_id, scale=8)
            browse = gr.Button("Browse", elem_id=f"{elem_id}-browse", scale=1, min_width=90)
        suggestions = _add_completion(box, spec, elem_id)
        _add_listing(box, browse, suggestions, spec, elem_id)
    return box
