"""What every tab is built with: the app's folders, the paths the file browser may show, and the shared states
through which tabs talk to each other without importing one another.

- `config` holds the Parameters tab's current form as a config dict (None while it has problems), also before a
  page opens that tab (the user's last form is restored into it when the page opens: gui/tabs/parameters_page.py).
  The Train tab starts runs from it; the Dataset, Regularization and Tools tabs read settings (resolution, model)
  from it.
- `config_patch` is written by other tabs to set Parameters fields, always through `config_patch_value`: the
  {field path: config value} dict (e.g. {"dataset.train_data_dir": "/home/me/proj/img"}) with a fresh sequence
  number, because a gr.State set to an equal value fires no `.change` (a second "Use in Parameters" did nothing).
  The Parameters tab applies it to the page's form (and its widgets, once built) and revalidates.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gui.file_browser import FileRoots

_PATCH_SEQUENCE = itertools.count(1)


def config_patch_value(values: dict[str, Any]) -> dict[str, Any]:
    """What a tab writes into `config_patch`: the fields to set, under a number no earlier patch had, so that the
    Parameters tab sees every press even when the fields are the same as last time."""
    return {"sequence": next(_PATCH_SEQUENCE), "values": dict(values)}


@dataclass
class TabContext:
    runs_dir: Path
    presets_dir: Path | None
    roots: FileRoots
    config: Any = None  # gr.State: the current config dict, or None
    config_patch: Any = None  # gr.State: config_patch_value({field path: value}) for the Parameters tab to apply
    app: Any = None  # the gr.Blocks being built, for page-load events
