"""The parameter reference (docs/parameters.md and `python -m engine schema`), generated from the config model."""

from __future__ import annotations

import json
from typing import Any

from engine.config.choices import family_label
from engine.config.describe import FieldSpec, iter_fields
from engine.config.schema import SECTIONS, RunConfig

_INTRO = """# Atelier parameters

Generated from the config model (`engine/config/`) by `python tools/gen_parameters_doc.py`; do not edit by hand.
A run config is a TOML file with the sections below. Keys follow sd-scripts' argument names wherever the concept
is the same. `[dataset]` uses sd-scripts' dataset-config schema: `[dataset.general]` here, plus optional inline
`[[dataset.datasets]]` and `[[dataset.datasets.subsets]]` tables with the same keys and precedence (subset, then
dataset, then general). Relative paths are relative to the folder of the config file. Override any key on the
command line with `--set section.key=value`.
"""


def _toml_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)


def _allowed(spec: FieldSpec) -> str:
    if spec.choices:
        return ", ".join(_toml_value(choice) for choice in spec.choices)
    bounds = spec.bounds
    parts = []
    for key, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        if key in bounds:
            parts.append(f"{symbol} {bounds[key]:g}" if isinstance(bounds[key], float) else f"{symbol} {bounds[key]}")
    return " and ".join(parts) or spec.kind


# How the reference marks a setting that the engine's training code does not read (base.UI_HINT_KEYS, "use").
_USE_NOTES = {
    "metadata": " *(metadata only: written into the saved file)*",
    "file": " *(read by the config loader)*",
    "planned": " *(not built yet: any value other than the default is refused)*",
}


def _row(spec: FieldSpec) -> str:
    name = spec.path.split(".", 1)[1] if spec.section else spec.path
    level = " *(advanced)*" if spec.advanced else ""
    if spec.families:
        level += f" *({', '.join(family_label(name) for name in spec.families)} only)*"
    level += _USE_NOTES.get(spec.use or "", "")
    description = spec.description.replace("|", "\\|")
    allowed = _allowed(spec).replace("|", "\\|")
    return f"| `{name}` | {_toml_value(spec.default)} | {allowed} | {description}{level} |"


def _table(specs: list[FieldSpec]) -> list[str]:
    return ["| key | default | allowed | meaning |", "|---|---|---|---|", *map(_row, specs)]


def parameters_markdown() -> str:
    """The whole reference as Markdown, one table per section."""
    specs = iter_fields()
    lines = [_INTRO, "## Top level", "", *_table([s for s in specs if not s.section]), ""]
    for section in SECTIONS:
        description = RunConfig.model_fields[section].description
        lines += [f"## [{section}]", "", description or "", "", *_table([s for s in specs if s.section == section]),
                  ""]
    return "\n".join(lines).rstrip() + "\n"
