"""Small file helpers shared by everything that writes user-visible files.

Every output is written under a temporary name in its own folder and renamed into place, so readers (and a run
that crashes mid-save) see either the old file or the new one, never half of one. Files get the user's normal
permissions (what `open()` would give under the current umask), not the private 0600 of temporary files: another
account, such as the one running A1111, must be able to read trained models.

Temporaries are hidden names beside their target that carry the writing process's id: `.NAME.tmp-PID[-X]` (being
written), `.NAME.old-PID` (a folder's previous version during a swap) and `.NAME.del-PID` (being deleted). A
process that is killed mid-save leaves them behind; :func:`clean_stale_temporaries` removes those of dead processes
(and restores an `.old` folder whose target is missing: the crash came between the two renames of a swap).
A save that fails for lack of space raises :class:`DiskFullError`, which names the folder and the space needed.
:func:`resolve_path` is the one rule for a path written in a config file (here because every layer reads it and
this module imports nothing of the engine's).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Room left beyond the bytes a save is known to write: headers, metadata, file-system blocks, the event log.
SPACE_MARGIN_BYTES = 1 << 20
SPACE_MARGIN_FRACTION = 0.02
# Errors that mean the disk (or the user's quota) is full, and the words writers that are not OSErrors use for it
# (safetensors' Rust writer says "StorageFull", torch.save's zip writer only "file write failed").
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_WORDS = ("no space left", "storagefull", "disk quota", "file write failed", "file too large")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?")


class DiskFullError(OSError):
    """A save that does not fit on its disk; the message names the folder (and, when known in advance, the space
    needed) and `hint` says what to do."""

    def __init__(self, folder: str | Path, needed: int | None = None, free: int | None = None, reason: str = ""):
        self.folder, self.needed, self.free = Path(folder), needed, free
        if needed is not None:
            text = (f"{folder}: not enough free space to save ({human_size(needed)} needed, "
                    f"{human_size(free or 0)} free)")
        else:
            text = f"{folder}: the disk is full" + (f" ({reason})" if reason else "")
        super().__init__(errno.ENOSPC, text)
        self.hint = ("free some space on that disk, or set saving.output_dir to a folder on a disk with more room; "
                     "saving.resume continues from the last state that was saved")

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def as_disk_full(error: BaseException, folder: str | Path) -> DiskFullError | None:
    """`error` as a DiskFullError if it (or an error it came from) says the disk or quota is full, else None.

    The folder is the one a DiskFullError in the chain names, else that of the file an OSError names, else
    `folder` (what the caller was writing to).
    """
    chain = _chain(error)
    if not any(_says_disk_full(item) for item in chain):
        return None
    for item in chain:
        if isinstance(item, DiskFullError):
            return item
    named = next((item.filename for item in chain if isinstance(item, OSError) and item.filename), None)
    where = Path(os.fsdecode(named)).parent if named else Path(folder)
    reason = next((item.strerror for item in chain if isinstance(item, OSError) and item.strerror), "")
    return DiskFullError(where, reason=reason or "no space left on device")


def human_size(count: int) -> str:
    """`count` bytes for people: "734 bytes", "1.5 MiB", "12.0 GiB"."""
    if count < 1024:
        return f"{count} bytes"
    size, unit = count / 1024, "KiB"
    for larger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{size:.1f} {unit}"


def free_space(folder: str | Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent, for a folder not made yet)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free_space(folder: str | Path, needed: int) -> None:
    """Refuse a save of `needed` bytes into `folder` before anything is written when the disk cannot hold it.

    Raises:
        DiskFullError: naming the folder and the space needed (with the margin).
    """
    wanted = int(needed * (1 + SPACE_MARGIN_FRACTION)) + SPACE_MARGIN_BYTES
    available = free_space(folder)
    if available < wanted:
        raise DiskFullError(folder, wanted, available)


@contextmanager
def disk_full_named(folder: str | Path) -> Iterator[None]:
    """Re-raise an error inside the block that says the disk is full as a DiskFullError naming `folder` (or the
    file's folder), chained to it: a writer's own error (safetensors' "StorageFull", torch's "file write failed")
    says neither where nor what to do."""
    try:
        yield
    except Exception as error:
        full = as_disk_full(error, folder)
        if full is None or full is error:
            raise
        raise full from error


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _says_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    return any(words in str(error).lower() for words in _DISK_FULL_WORDS)


def _process_umask() -> int:
    """The umask, read without changing it where Linux shows it (setting it to read it, even for an instant, would
    give a file another thread creates meanwhile the mode 0o666)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _process_umask()  # at import, while one thread runs


def default_file_mode() -> int:
    """0o666 minus the process's umask: the mode a plainly created file would have."""
    return 0o666 & ~_UMASK


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that needs a file name (safetensors, torch.save, ...).

    When the block ends normally the file gets the default mode and replaces `path`; on an error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new, never a half-written file."""
    with atomic_output(path) as temporary, open(temporary, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_new_file(path: str | Path, data: bytes) -> None:
    """Write a new file whole or not at all, never over another: raises FileExistsError when `path` exists, also
    when it appears while writing (the finished temporary file is hard-linked into place, which never replaces)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, default_file_mode())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links (FAT, some network shares): exclusive create instead
            with open(path, "xb") as stream:
                stream.write(data)
    finally:
        temporary.unlink(missing_ok=True)


def temporary_path(target: Path, kind: str = "tmp") -> Path:
    """The hidden name beside `target` that this process uses while writing ("tmp") or swapping ("old") it."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}")


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree; nothing if it is gone already."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_folder(source: Path, target: Path) -> None:
    """Move a completed folder into place; an existing `target` (an earlier save) is removed only afterwards.

    Two renames: the old folder becomes `.NAME.old-PID`, then `source` becomes `target`. A crash between them
    leaves the complete old folder under the hidden name, which :func:`recover_folder` (called when a state is
    loaded, and at a run's start) renames back. The old folder is renamed once more before it is deleted, so an
    `.old` name only ever holds a complete folder.
    """
    if not target.exists():
        os.replace(source, target)
        return
    retired = temporary_path(target, "old")
    remove_path(retired)
    os.replace(target, retired)
    os.replace(source, target)
    doomed = temporary_path(target, "del")
    os.replace(retired, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _leftover_of_gone_process(pid: int) -> bool:
    """True when no live process has `pid`, or it is ours: callers run before this process writes anything, so
    a name with our id is an earlier process's (ids are reused, often at once in containers)."""
    if pid == os.getpid():
        return True
    try:
        import psutil  # installed with accelerate; os.kill(pid, 0) would terminate the process on Windows

        return not psutil.pid_exists(pid)
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def recover_folder(target: Path) -> bool:
    """Restore `target` from a `.NAME.old-PID` left by a swap that crashed between its renames; True if restored.

    Only a missing target is restored, from the newest such folder of a process that is gone.
    """
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return False
    retired = [entry for entry in target.parent.iterdir() if _is_leftover(entry, target.name, ("old",))]
    if not retired:
        return False
    newest = max(retired, key=lambda entry: entry.stat().st_mtime)
    os.replace(newest, target)
    return True


def retired_name(entry: str) -> str | None:
    """The name whose previous version a retired `.NAME.old-PID` folder holds (see replace_folder), else None."""
    match = _TEMPORARY.fullmatch(entry)
    return match["name"] if match is not None and match["kind"] == "old" else None


def _is_leftover(entry: Path, name: str, kinds: tuple[str, ...]) -> bool:
    match = _TEMPORARY.fullmatch(entry.name)
    return (match is not None and match["name"] == name and match["kind"] in kinds
            and _leftover_of_gone_process(int(match["pid"])))


def clean_stale_temporaries(folder: str | Path, owns: Callable[[str], bool]) -> list[Path]:
    """Remove the temporaries that dead processes left in `folder` for the names `owns` accepts.

    A retired `.NAME.old-PID` folder whose NAME is missing is restored instead (it is the last complete save).
    Call before this process saves anything. Returns what was removed or restored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    touched: list[Path] = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or not owns(match["name"]) or not _leftover_of_gone_process(int(match["pid"])):
            continue
        target = folder / match["name"]
        try:
            if match["kind"] == "old" and not os.path.lexists(target):
                if recover_folder(target):  # the swap was cut short: this is the last complete save
                    touched.append(target)
            elif os.path.lexists(entry):
                remove_path(entry)
                touched.append(entry)
        except OSError:
            continue  # not ours to remove after all (another account's, a read-only disk): leave it
    return touched


def resolve_path(value: str, base_dir: str | Path) -> Path:
    """A path from a config, made absolute against the folder of the file it was written in."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path
