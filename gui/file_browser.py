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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from gui.browse import (
    ALLOWED_FOLDERS,
    KINDS,
    BrowseError,
    Entry,
    FileRoots,
    Listing,
    browse_target,
    complete,
    count_images,
    entry_detail,
    followed_folder,
    list_folder,
    root_entries,
)

__all__ = ["FileRoots", "path_field"]

SUGGESTIONS = 12  # completions shown under the box
# Listing rows per page: Gradio pages a long table (its rows cannot scroll inside a box without custom CSS), and
# 15 rows keep the panel about as tall as half a screen. The listing itself stops at LISTING_LIMIT entries.
ROWS_PER_PAGE = 15
LISTING_LIMIT = 500
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|])")
# The path behind a '..' row that leads above an allowed folder: the list of the allowed folders themselves.
ROOTS_VIEW = ""
ROOTS_HEADING = (f"**Allowed folders** ({ALLOWED_FOLDERS}): choose one to open it. Start the app with "
                 "`--allow-path DIR` to add another.")


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
    """The table rows of a listing ('..' first: up one folder, or from an allowed folder to the list of them all)
    and the path behind each row."""
    up = ("up one folder", f"{listing.parent}/") if listing.parent is not None else ("allowed folders", ROOTS_VIEW)
    rows, paths = [[_cell(".."), _cell(up[0])]], [up[1]]
    return _add_entries(rows, paths, listing.entries)


def _add_entries(rows: list[list[str]], paths: list[str], entries: tuple[Entry, ...],
                 full_names: bool = False) -> tuple[list[list[str]], list[str]]:
    for entry in entries:
        name = str(entry.path) if full_names else entry.name
        rows.append([_cell(f"{name}/" if entry.is_dir else name), _cell(entry_detail(entry))])
        paths.append(f"{entry.path}/" if entry.is_dir else str(entry.path))
    return rows, paths


def _heading(spec: _Spec, folder: Path, listing: Listing | None, notes: list[str]) -> str:
    """The folder shown, with its own image count for a folder field (what a user picking a dataset wants to know),
    then what was cut off and any notes (such as why nothing is listed)."""
    title, lines = f"**Folder:** `{folder}`", []
    if listing is not None:
        title += _image_note(folder) if spec.kind == "folder" else ""
        if not listing.entries:
            lines.append(("No folders here." if spec.kind == "folder" else "Nothing to show here.")
                         + " Choose '..' to go up or to the other allowed folders, or type a path in the box.")
        if listing.more:
            lines.append(f"... and {listing.more} more not shown: type the start of a name in the box to narrow.")
    return "\n\n".join([title, *lines, *(f"**{_md(note)}**" for note in notes)])


def _image_note(folder: Path) -> str:
    counted = count_images(folder)
    if counted is None:
        return ""
    images, partial = counted
    return f" ({images}{'+' if partial else ''} images)"


def _view(heading: str, rows: list[list[str]], folder: str | None, paths: list[str]) -> dict:
    """What the panel shows, kept in its gr.State: the panel is rendered from this alone."""
    return {"heading": heading, "rows": rows, "folder": folder, "paths": paths}


def _show_roots(spec: _Spec, notes: list[str]) -> dict:
    """The list of allowed folders (the top of the browser)."""
    rows, paths = _add_entries([], [], root_entries(spec.roots, kind=spec.kind), full_names=True)
    heading = "\n\n".join([ROOTS_HEADING, *(f"**{_md(note)}**" for note in notes)])
    return _view(heading, rows, None, paths)


def _show(spec: _Spec, target: str | Path | None, show_hidden: bool, notes: list[str]) -> dict:
    """A folder's listing, or the list of allowed folders for None / ROOTS_VIEW."""
    if target is None or target == ROOTS_VIEW:
        return _show_roots(spec, notes)
    return _show_folder(spec, target, show_hidden, notes)


def _show_folder(spec: _Spec, folder: str | Path, show_hidden: bool, notes: list[str]) -> dict:
    """A folder's listing; a folder that cannot be listed shows why."""
    try:
        listing = spec.listing(folder, show_hidden)
    except BrowseError as error:
        return _view(_heading(spec, Path(folder), None, [*notes, str(error)]), [], None, [])
    rows, paths = _listing_view(listing)
    return _view(_heading(spec, listing.folder, listing, notes), rows, str(listing.folder), paths)


@dataclass(frozen=True)
class _Completion:
    """A path field's suggestions and the function that fills them from what is typed (wired by _add_listing,
    which answers the same keystrokes: one handler per field instead of two)."""

    suggestions: gr.Dataset
    offered: gr.State
    offer: Callable[[str], dict]


def _add_completion(box: gr.Textbox, spec: _Spec, elem_id: str) -> _Completion:
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

    box.submit(offer_none, outputs=[suggestions, offered], show_progress="hidden")
    suggestions.click(choose, inputs=[suggestions, offered], outputs=[box, suggestions, offered],
                      show_progress="hidden")
    return _Completion(suggestions, offered, offer)


_CLOSED = {"open": False, "hidden": False, **_view("", [], None, [])}


def _add_listing(box: gr.Component, browse: gr.Button, completion: _Completion | None, spec: _Spec,
                 elem_id: str) -> None:
    """The panel Browse opens: the folder's entries; a folder row enters it, a file row (kind 'file') or 'Use this
    folder' (kind 'folder') fills the box and closes the panel.

    The panel is rendered only while it is open (gr.render, from the state alone): a page has dozens of path fields,
    and their closed panels were most of the page's components and event handlers, which every page load and
    every app start paid for."""
    shown = gr.State(_CLOSED)

    @gr.render(inputs=shown, triggers=[shown.change], show_progress="hidden")
    def panel(state: dict) -> None:
        if state["open"]:
            _render_panel(box, shown, state, spec, elem_id)

    def open_panel(text: str, state: dict) -> dict:
        try:
            folder, note = browse_target(text or "", spec.roots)
        except BrowseError as error:
            view = _view(f"**{_md(str(error))}**", [], None, [])
        else:
            view = _show(spec, folder, state["hidden"], [note] if note else [])
        hide = {completion.suggestions: gr.Dataset(visible=False)} if completion is not None else {}
        return {shown: {**state, **view, "open": True}} | hide

    def on_type(text: str, state: dict) -> dict:
        """Completions for the text, and the open listing moved to the folder being typed."""
        updates = completion.offer(text) if completion is not None else {}
        folder = followed_folder(text or "", spec.roots) if state["open"] else None
        if folder is not None and str(folder) != state["folder"]:
            updates[shown] = {**state, **_show_folder(spec, folder, state["hidden"], [])}
        return updates or {shown: gr.skip()}  # not {}: Gradio reads an empty dict as a missing value

    suggestions = [completion.suggestions] if completion is not None else []
    offered = [completion.offered] if completion is not None else []
    browse.click(open_panel, inputs=[box, shown], outputs=[shown, *suggestions])
    box.input(on_type, inputs=[box, shown], outputs=[shown, *suggestions, *offered], trigger_mode="always_last",
              show_progress="hidden")


def _render_panel(box: gr.Component, shown: gr.State, state: dict, spec: _Spec, elem_id: str) -> None:
    """The open panel's components and their handlers, inside the field's gr.render."""
    with gr.Column(variant="panel", elem_id=f"{elem_id}-listing"):
        gr.Markdown(state["heading"], elem_id=f"{elem_id}-folder", padding=True)
        table = gr.Dataset(components=["html", "html"], headers=["Name", _detail_header(spec.kind)],
                           samples=state["rows"], type="index", layout="table", samples_per_page=ROWS_PER_PAGE,
                           show_label=False, elem_id=f"{elem_id}-entries")
        with gr.Row():
            use = gr.Button("Use this folder", variant="primary", visible=spec.kind == "folder",
                            elem_id=f"{elem_id}-use")
            show_hidden = gr.Checkbox(state["hidden"], label="Show hidden", elem_id=f"{elem_id}-hidden",
                                      info="inside --allow-path folders; never those of your home folder")
            close = gr.Button("Close", elem_id=f"{elem_id}-close")

    def pick(index: int | None, current: dict) -> dict:
        paths = current["paths"]
        if index is None or not 0 <= index < len(paths):
            return {box: gr.skip()}
        chosen = paths[index]
        if chosen == ROOTS_VIEW or chosen.endswith("/"):
            return {shown: {**current, **_show(spec, chosen, current["hidden"], [])}}
        return {box: chosen, shown: {**current, "open": False}}

    def refresh(current: dict, hidden: bool) -> dict:
        return {**current, **_show(spec, current["folder"], hidden, []), "hidden": hidden}

    def use_folder(current: dict) -> dict:
        if not current["folder"]:
            return {box: gr.skip()}
        return {box: current["folder"], shown: {**current, "open": False}}

    table.click(pick, inputs=[table, shown], outputs=[box, shown])
    show_hidden.input(refresh, inputs=[shown, show_hidden], outputs=shown)
    use.click(use_folder, inputs=shown, outputs=[box, shown])
    close.click(lambda current: {**current, "open": False}, inputs=shown, outputs=shown)


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
        _add_listing(box, browse, _add_completion(box, spec, elem_id), spec, elem_id)
    return box


def browse_button(target: gr.Component, roots: FileRoots, *, kind: str = "folder", elem_id: str,
                  extensions: tuple[str, ...] = ()) -> gr.Button:
    """A Browse button and its panel for a component that is not a path field's own textbox, such as a dropdown
    that also takes a typed local folder (the Captioning tab's model). Build it right after `target`, which must
    accept any string (a Dropdown needs allow_custom_value=True); the chosen path is written into it. Returns the
    button (elem_id '<elem_id>-browse'; the panel's ids start with elem_id as a path field's do)."""
    if kind not in KINDS:
        raise ValueError(f"browse_button {elem_id}: kind must be one of {KINDS}, not {kind!r}")
    browse = gr.Button("Browse", elem_id=f"{elem_id}-browse", scale=0, min_width=90)
    _add_listing(target, browse, None, _Spec(roots, kind, tuple(extensions)), elem_id)
    return browse
