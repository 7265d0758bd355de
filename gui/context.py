"""What every tab is built with: the app's folders, the paths the file browser may show, and the shared states
through which tabs talk to each other without importing one another.

- `config` holds the Parameters tab's current form as a config dict (None while it has problems). The Train tab
  starts runs from it; the Dataset, Regularization and Tools tabs read settings (resolution, model) from it.
- `config_patch` is written by other tabs to set Parameters fields: a dict {field path: config value}, e.g.
  {"dataset.train_data_dir": "/home/me/proj/img"}. The Parameters tab applies it to its widgets and revalidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gui.file_browser import FileRoots


@dataclass
class TabContext:
    runs_dir: Path
    presets_dir: Path | None
    roots: FileRoots
    config: Any = None  # gr.State: the current config dict, or None
    config_patch: Any = None  # gr.State: {field path: value} for the Parameters tab to apply
