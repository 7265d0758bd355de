"""The Parameters form kept on the server, per user, so that it survives a page reload and an app restart.

One JSON file per user beside the runs (`<runs_dir>/.atelier/form-<user>.json`), holding the form's widget values
by field path; written atomically on each edit, read when a page opens. The user is the name the page logged in with
(--auth), or "local" without auth. No gradio here, so it is tested directly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.files import atomic_write_text

LOCAL_USER = "local"
STATE_FOLDER = ".atelier"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def user_name(username: str | None) -> str:
    """The user a form belongs to: the logged-in name, or "local" without auth."""
    return username or LOCAL_USER


def _file_part(user: str) -> str:
    """A file-name-safe form of a user name; a name that had to change gets a hash, so two names never share."""
    safe = _UNSAFE.sub("-", user).strip(".-") or "user"
    if safe != user:
        safe += "-" + hashlib.sha256(user.encode()).hexdigest()[:8]
    return safe


class FormStore:
    """Each user's last Parameters form ({field path: widget value}) under `<runs_dir>/.atelier/`."""

    def __init__(self, runs_dir: Path):
        self.folder = Path(runs_dir) / STATE_FOLDER
        self._written: dict[str, str] = {}  # user -> the text last written, so an unchanged form is not rewritten

    def path(self, user: str) -> Path:
        return self.folder / f"form-{_file_part(user)}.json"

    def save(self, user: str, values: Mapping[str, Any]) -> str:
        """Keep the user's form; returns '' or why it could not be kept (a read-only or full disk): the form goes
        on working without it, so the caller shows the reason instead of failing."""
        text = json.dumps(dict(values), indent=1, sort_keys=True) + "\n"
        if self._written.get(user) == text and self.path(user).exists():
            return ""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path(user), text)
        except OSError as error:
            return (f"Your form could not be kept on the server ({error.strerror or error}) in {self.folder}; it "
                    "stays in this page until it is reloaded.")
        self._written[user] = text
        return ""

    def load(self, user: str, paths: set[str] | None = None) -> dict[str, Any]:
        """The user's saved form, only the `paths` still in the form; {} when there is none or it cannot be read
        (a damaged file is not worth stopping the page for: the form opens with the defaults)."""
        try:
            values = json.loads(self.path(user).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(values, dict):
            return {}
        return {path: value for path, value in values.items() if paths is None or path in paths}
