"""Small file helpers shared by everything that writes user-visible files.

Every output is written under a temporary name in its own folder and renamed into place, so readers (and a run
that crashes mid-save) see either the old file or the new one, never half of one. Files get the user's normal
permissions (what `open()` would give under the current umask), not the private 0600 of temporary files: another
account, such as the one running A1111, must be able to read trained models.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def default_file_mode() -> int:
    """0o666 minus the process's umask: the mode a plainly created file would have."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that needs a file name (safetensors, torch.save, ...).

    When the block ends normally the file gets the default mode and replaces `path`; on an error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def replace_folder(source: Path, target: Path) -> None:
    """Move a completed folder into place; an existing `target` (an earlier save) is removed only afterwards."""
    if not target.exists():
        os.replace(source, target)
        return
    retired = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, retired)
    os.replace(source, target)
    shutil.rmtree(retired, ignore_errors=True)
