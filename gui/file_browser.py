"""The server-side file browser: a path textbox the user can type into, with completion and a folder listing.

No native dialogs (they open on the server's screen, or nowhere on a remote machine). Browsing is limited to the
user's home folder and the folders given with --allow-path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr


@dataclass(frozen=True)
class FileRoots:
    """The folders the browser may show (and everything below them)."""

    folders: tuple[Path, ...]

    @classmethod
    def from_paths(cls, extra: Iterable[str | Path] = (), *, include_home: bool = True) -> FileRoots:
        folders = [Path.home()] if include_home else []
        folders += [Path(path).expanduser() for path in extra]
        return cls(tuple(dict.fromkeys(folder.resolve() for folder in folders)))

    def allows(self, path: str | Path) -> bool:
        resolved = Path(path).expanduser().resolve()
        return any(resolved == root or resolved.is_relative_to(root) for root in self.folders)


def path_field(label: str, roots: FileRoots, *, kind: str = "folder", elem_id: str, value: str = "",
               info: str | None = None, placeholder: str | None = None) -> gr.Textbox:
    """A path input with a browser. kind is 'folder' or 'file'. Returns the textbox holding the path; use it as
    an input or output like any textbox."""
    return gr.Textbox(label=label, value=value, info=info, placeholder=placeholder, elem_id=elem_id)
