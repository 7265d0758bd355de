"""What the server-side file browser shows: folder listings and path completion, limited to the allowed roots.

Pure and gradio-free, so every rule (roots, symlinks, hidden files, filters, caps) is tested on real folders without
a browser. gui/file_browser.py only lays these results out as components.

Every path is checked with `FileRoots.check` (or its yes/no form `allows`), which resolves symlinks: a link inside
the home folder that points to /etc is refused like /etc itself, and is left out of listings and completions. The
same check guards every path the GUI uses (dataset, captioning, regularization and tools fields, settings files,
the paths of a run started from the GUI), so one rule and one message hold everywhere; the CLI has no such limit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.data.images import is_image_file

KINDS = ("folder", "file")
SIZE_UNITS = ("B", "KB", "MB", "GB", "TB")
IMAGE_COUNT_CAP = 2000  # entries looked at per subfolder when counting its images; a longer folder shows "N+"
ALLOWED_FOLDERS = "your home folder, the runs folder and --allow-path folders"
OUTSIDE_ROOTS = ("{path} is outside the folders this app may use (" + ALLOWED_FOLDERS + "); start the app with "
                 "--allow-path {allow} to allow it")
HIDDEN_PATH = ("{path} is a hidden folder or file ({hidden}): this app does not use hidden folders under your home "
               "folder or the runs folder; start the app with --allow-path {hidden} to allow it")


class PathNotAllowed(ValueError):
    """A path the GUI may not use; the message names it (and the field) and says which flag allows it."""


def _is_within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _from_base(path: str | Path, base: str | Path | None) -> Path:
    """path with ~ expanded, made absolute against base (default the working folder); symlinks and '..' kept."""
    typed = Path(path).expanduser()
    return typed if typed.is_absolute() else Path(base or Path.cwd()) / typed


def _hidden_part(path: Path, root: Path) -> Path | None:
    """The first hidden folder or file (a name starting with '.') of path below root, or None."""
    below = root
    for part in path.relative_to(root).parts:
        below = below / part
        if part.startswith("."):
            return below
    return None


@dataclass(frozen=True)
class FileRoots:
    """The folders the GUI may use (and everything below them).

    Hidden folders and files (~/.ssh, ~/.config, ...) below a root are refused, except inside the `explicit` roots:
    the user named those with --allow-path, so `--allow-path ~/.cache/models` makes that folder usable.
    """

    folders: tuple[Path, ...]
    explicit: tuple[Path, ...] = ()  # the --allow-path folders (resolved), where hidden names are allowed too

    @classmethod
    def from_paths(cls, extra: Iterable[str | Path] = (), *, include_home: bool = True,
                   runs_dir: str | Path | None = None) -> FileRoots:
        """Home (unless include_home is False), the `extra` folders (given with --allow-path) and the runs folder."""
        explicit = tuple(dict.fromkeys(Path(path).expanduser().resolve() for path in extra))
        folders = [Path.home().resolve()] if include_home else []
        folders += [*explicit, *([Path(runs_dir).expanduser().resolve()] if runs_dir is not None else [])]
        return cls(tuple(dict.fromkeys(folders)), explicit)

    def refusal(self, path: str | Path, base: str | Path | None = None) -> str | None:
        """Why path may not be used (symlinks resolved; a relative path starts from base, default the working
        folder), or None when it may."""
        typed = _from_base(path, base)
        resolved = typed.resolve()
        hidden = None
        for root in self.folders:
            if not _is_within(resolved, root):
                continue
            found = None if root in self.explicit else _hidden_part(resolved, root)
            if found is None:
                return None
            hidden = hidden or found
        if hidden is not None:
            return HIDDEN_PATH.format(path=typed, hidden=hidden)
        # --allow-path takes folders: for a file, name the folder that holds it.
        return OUTSIDE_ROOTS.format(path=typed, allow=typed.parent if typed.is_file() else typed)

    def allows(self, path: str | Path, base: str | Path | None = None) -> bool:
        return self.refusal(path, base) is None

    def check(self, path: str | Path, label: str = "", base: str | Path | None = None) -> Path:
        """The path, with ~ expanded and made absolute against base (symlinks kept), when the GUI may use it.

        Raises:
            PathNotAllowed: "<label>: <path> is outside the folders this app may use ...; start the app with
                --allow-path ... to allow it" (or "... is a hidden folder or file ..."), the one message of every
                GUI path entry.
        """
        refusal = self.refusal(path, base)
        if refusal is not None:
            raise PathNotAllowed(f"{label}: {refusal}" if label else refusal)
        return _from_base(path, base)

    def check_location(self, value: str, label: str = "", base: str | Path | None = None) -> str:
        """A field that takes a local file or folder or a Hugging Face hub id (a base model, a VAE): a hub id is
        returned as it is (the engine finds it in the hub cache), a local path must pass `check`. It is read as the
        engine reads it: an existing file or folder first, then 'owner/name' as a hub id.

        Raises:
            PathNotAllowed: as `check`.
        """
        from engine.models.locations import looks_like_hub_id  # no torch: the regex and the model file suffixes

        text = value.strip()
        if looks_like_hub_id(text) and not _from_base(text, base).exists():
            return text
        self.check(text, label, base)
        return text


class BrowseError(Exception):
    """A folder that cannot be listed; the message names the path and says why, ready to show to the user."""


@dataclass(frozen=True)
class Entry:
    """One row of a listing. size is in bytes (files only); images counts images in a folder (folder kind only)."""

    name: str
    path: Path
    is_dir: bool
    size: int | None = None
    images: int | None = None
    images_partial: bool = False  # the count stopped early: there are at least `images`


@dataclass(frozen=True)
class Listing:
    """A folder's shown entries (folders first), its parent when the user may go up, and how many were cut off."""

    folder: Path
    parent: Path | None
    entries: tuple[Entry, ...]
    more: int = 0


def _absolute(text: str | Path) -> Path:
    """The path as typed, with ~ expanded and .. folded, but symlinks kept (so the user sees the path they typed)."""
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise BrowseError(f"{text} is not a full path: start it with / or ~")
    return Path(os.path.normpath(path))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def _normal_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions)


def _dir_entries(folder: Path, roots: FileRoots, *, kind: str, extensions: tuple[str, ...],
                 show_hidden: bool) -> Iterator[os.DirEntry]:
    """The entries a user may see in folder: no dot files unless asked (and only where the roots allow hidden names),
    no links leading out of the roots, only folders for kind 'folder', and only files with one of the extensions
    (when given) for kind 'file'."""
    try:
        with os.scandir(folder) as scan:
            for entry in scan:
                hidden = entry.name.startswith(".")
                if hidden and not show_hidden:
                    continue
                if (hidden or entry.is_symlink()) and not roots.allows(entry.path):
                    continue
                if _is_dir(entry) or (kind == "file" and _matches(entry, extensions)):
                    yield entry
    except PermissionError as error:
        raise BrowseError(f"{folder} cannot be read: permission denied") from error


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a broken link or a vanished entry
        return False


def _matches(entry: os.DirEntry, extensions: tuple[str, ...]) -> bool:
    try:
        is_file = entry.is_file()
    except OSError:
        return False
    return is_file and (not extensions or Path(entry.name).suffix.lower() in extensions)


def count_images(folder: str | Path, cap: int = IMAGE_COUNT_CAP) -> tuple[int, bool] | None:
    """Images directly in folder, by name (nothing is opened), and whether there may be more: at most cap entries
    are looked at, so a huge folder stays cheap. None when the folder cannot be read."""
    count = looked = 0
    try:
        with os.scandir(folder) as scan:
            for looked, entry in enumerate(scan, start=1):
                count += is_image_file(entry.name)
                if looked >= cap:
                    break
    except OSError:
        return None
    return count, looked >= cap


def _entry(dir_entry: os.DirEntry, kind: str) -> Entry:
    is_dir = _is_dir(dir_entry)
    path = Path(dir_entry.path)
    if is_dir:
        counted = count_images(path) if kind == "folder" else None
        return Entry(dir_entry.name, path, True, images=counted[0] if counted else None,
                     images_partial=bool(counted and counted[1]))
    try:
        size = dir_entry.stat().st_size
    except OSError:
        size = None
    return Entry(dir_entry.name, path, False, size=size)


def _sort_key(entry: os.DirEntry) -> tuple[bool, str, str]:
    return not _is_dir(entry), entry.name.casefold(), entry.name


def _parent(folder: Path, roots: FileRoots) -> Path | None:
    """Where '..' leads: the parent folder, unless that is above every root."""
    parent = folder.parent
    return parent if parent != folder and roots.allows(parent) else None


def list_folder(path: str | Path, roots: FileRoots, *, kind: str, extensions: Iterable[str] = (),
                show_hidden: bool = False, limit: int = 500) -> Listing:
    """The entries of folder `path` to show, folders first then files (kind 'file'), each group by name.

    Raises BrowseError (with a message for the user) for a path outside the roots, a missing folder, a file, or an
    unreadable folder. At most `limit` entries are returned; `Listing.more` says how many were left out.
    """
    _check_kind(kind)
    folder = _absolute(path)
    refusal = roots.refusal(folder)
    if refusal is not None:
        raise BrowseError(refusal)
    if not folder.exists():
        raise BrowseError(f"{folder} does not exist")
    if not folder.is_dir():
        raise BrowseError(f"{folder} is a file, not a folder")
    found = sorted(_dir_entries(folder, roots, kind=kind, extensions=_normal_extensions(extensions),
                                show_hidden=show_hidden), key=_sort_key)
    entries = tuple(_entry(entry, kind) for entry in found[:limit])
    return Listing(folder, _parent(folder, roots), entries, more=max(0, len(found) - limit))


def start_folder(text: str, roots: FileRoots) -> tuple[Path, str | None]:
    """The folder the Browse button opens for what the textbox holds, and a note when that is not the path itself.

    An existing folder opens itself; a file opens its folder; a missing path opens its nearest existing parent
    (and says so); an empty, relative or disallowed path opens the first root.
    """
    if not roots.folders:
        raise BrowseError("No folders may be browsed: start the app with --allow-path DIR")
    first = roots.folders[0]
    if not text.strip():
        return first, None
    try:
        path = _absolute(text.strip())
    except BrowseError as error:
        return first, str(error)
    refusal = roots.refusal(path)
    if refusal is not None:
        return first, refusal
    if path.is_file():
        return path.parent, None
    folder = path
    while not folder.is_dir() and folder.parent != folder:
        folder = folder.parent
    if folder == path:
        return folder, None
    note = f"{path} does not exist; showing {folder}"
    return (folder, note) if roots.allows(folder) else (first, note)


def root_entries(roots: FileRoots, *, kind: str) -> tuple[Entry, ...]:
    """The allowed folders themselves, as the rows of the top listing (above them the browser cannot go): home,
    --allow-path folders and the runs folder, in that order; a folder field counts each one's images."""
    _check_kind(kind)
    entries = []
    for root in roots.folders:
        counted = count_images(root) if kind == "folder" else None
        entries.append(Entry(str(root), root, True, images=counted[0] if counted else None,
                             images_partial=bool(counted and counted[1])))
    return tuple(entries)


def browse_target(text: str, roots: FileRoots) -> tuple[Path | None, str | None]:
    """Where the Browse button opens for what the box holds, and a note when that is not the path itself; None is
    the list of allowed folders (`root_entries`): for an empty box, or for a path the app may not use (the note
    says why).

    An existing folder opens itself; a file opens its folder; a missing path opens its nearest existing parent.
    """
    if not roots.folders:
        raise BrowseError("No folders may be browsed: start the app with --allow-path DIR")
    if not text.strip():
        return None, None
    try:
        path = _absolute(text.strip())
    except BrowseError as error:
        return None, str(error)
    refusal = roots.refusal(path)
    if refusal is not None:
        return None, refusal
    return start_folder(text, roots)


def followed_folder(text: str, roots: FileRoots) -> Path | None:
    """The folder an open listing should show while the user types `text`: the typed folder itself when it exists
    ('/data/img' or '/data/img/'), else the folder the last name is being typed into ('/data/im' -> /data); None
    when neither is an allowed, existing folder (the listing then stays where it is)."""
    if not text.startswith(("/", "~")):
        return None
    typed = Path(os.path.normpath(os.path.expanduser(text)))
    for candidate in (typed, typed.parent):
        if candidate.is_dir() and roots.allows(candidate):
            return candidate
    return None


def _split(text: str) -> tuple[Path, str]:
    """The folder to look in and the start of the name being typed: '/a/b/ca' -> (/a/b, 'ca'), '/a/b/' -> (/a/b, '')."""
    expanded = os.path.expanduser(text)
    folder, _, prefix = expanded.rpartition("/")
    return Path(folder or "/"), prefix


def complete(text: str, roots: FileRoots, *, kind: str, extensions: Iterable[str] = (), limit: int = 50) -> list[str]:
    """Full paths that continue what was typed, folders ending in '/' (kind 'file' adds matching files).

    Names match case-insensitively. Dot entries are offered only once the typed name starts with a dot, and only
    where the roots allow them (then a root inside a hidden folder, such as ~/.cache/models, is offered too). Typing
    a path whose folder is not allowed (such as '/' or '/ho') offers the roots that start with it instead.
    """
    _check_kind(kind)
    if not text.strip():
        return [f"{root}/" for root in roots.folders][:limit]
    if not text.startswith(("/", "~")):
        return []
    folder, prefix = _split(text)
    if not (roots.allows(folder) and folder.is_dir()):
        typed = os.path.expanduser(text)
        return [f"{root}/" for root in roots.folders if f"{root}/".startswith(typed)][:limit]
    wanted = prefix.casefold()
    try:
        found = [entry for entry in _dir_entries(folder, roots, kind=kind, extensions=_normal_extensions(extensions),
                                                 show_hidden=prefix.startswith("."))
                 if entry.name.casefold().startswith(wanted)]
    except BrowseError:
        return []
    found.sort(key=_sort_key)
    offered = [str(folder / entry.name) + ("/" if _is_dir(entry) else "") for entry in found]
    if prefix.startswith("."):
        typed = os.path.expanduser(text)
        offered += [f"{root}/" for root in roots.folders if f"{root}/".startswith(typed)]
    return list(dict.fromkeys(offered))[:limit]


def format_size(size: int | None) -> str:
    """Bytes as a person reads them: 512 B, 1.5 KB, 12.0 MB."""
    if size is None:
        return ""
    value, unit = float(size), 0
    while value >= 1024 and unit < len(SIZE_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{size} B" if unit == 0 else f"{value:.1f} {SIZE_UNITS[unit]}"


def entry_detail(entry: Entry) -> str:
    """The second column of a listing row: a file's size, or a folder's image count when it was counted."""
    if not entry.is_dir:
        return format_size(entry.size)
    if entry.images is None:
        return "folder"
    plus = "+" if entry.images_partial else ""
    return f"{entry.images}{plus} image" + ("" if entry.images == 1 and not plus else "s")
