"""Importers from other tools' config files into a RunConfig overlay.

Each importer reads one foreign format and returns an `ImportResult`: a partial config (overlaid on the defaults)
plus everything it could not carry over, so nothing is ever dropped silently. `IMPORTERS` maps a format name to
its (detector, importer) pair; `import_file` picks the first whose detector accepts the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Skipped:
    """A key of the source file that did not make it into the config, and why."""

    key: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r}: {self.reason}"


@dataclass
class ImportResult:
    """What an importer produced from one file."""

    format: str
    overlay: dict[str, Any] = field(default_factory=dict)  # partial RunConfig dict
    skipped: list[Skipped] = field(default_factory=list)  # keys with a value that could not be used
    unset: list[str] = field(default_factory=list)  # keys whose value was empty/off, so nothing was lost
    notes: list[str] = field(default_factory=list)  # decisions the user should know about
    mapped: dict[str, list[str]] = field(default_factory=dict)  # source key -> config paths it was mapped onto

    def accounted_keys(self) -> set[str]:
        """Top-level source keys that were mapped, skipped or unset ('network_args.conv_dim' counts as network_args)."""
        names = [*self.mapped, *(item.key for item in self.skipped), *self.unset]
        return {name.split(".")[0].split("[")[0] for name in names}


Detector = Callable[[Path, Mapping[str, Any]], bool]
Importer = Callable[[Mapping[str, Any]], ImportResult]
