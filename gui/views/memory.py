"""The Parameters tab's Memory section, apart from its layout: the plan's JSON (engine/cli/plan_cmd.py) as a bar of
the GPU's need against the card and a breakdown, the fit's changes as a list, and those changes as form values to
apply and to undo."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from engine.config.describe import FieldSpec

GIB = 1024**3
DOES_NOT_FIT = "does not fit"
_WHERE = {"gpu": "GPU", "host": "system RAM"}
_BAR_FULL, _BAR_OVER, _BAR_NONE = "#2e7d32", "#c62828", "#607d8b"  # fits, does not fit, no card known


def gib(size: int | float) -> str:
    return f"{size / GIB:.2f} GiB"


def _bar_width(need: int, capacity: int | None) -> float:
    """The filled share of the bar, in percent: need against the card (full when over it, or when no card is known)."""
    if not capacity:
        return 100.0
    return round(min(need / capacity, 1.0) * 100, 1)


def _verdict(plan: Mapping[str, Any]) -> str:
    need, capacity = plan["gpu_needed_bytes"], plan.get("gpu_capacity_bytes")
    if capacity is None:
        return (f"It needs {gib(need)} of GPU memory; no GPU detected: type the card's size in GPU memory to check "
                "the fit")
    if plan.get("fits"):
        return f"It fits: needs {gib(need)} of the card's {gib(capacity)}"
    return f"It {DOES_NOT_FIT}: needs {gib(need)}, the card has {gib(capacity)}"


def plan_bar_html(plan: Mapping[str, Any]) -> str:
    """The GPU's need against the card as a bar (HTML and CSS, no image), its verdict written beside it."""
    need, capacity = plan["gpu_needed_bytes"], plan.get("gpu_capacity_bytes")
    colour = _BAR_NONE if capacity is None else _BAR_FULL if plan.get("fits") else _BAR_OVER
    state = "unknown" if capacity is None else "fits" if plan.get("fits") else "over"
    return (f'<div id="memory-bar" data-state="{state}">'
            '<div style="width:100%;height:1.4em;border:1px solid #888;border-radius:4px;overflow:hidden">'
            f'<div style="width:{_bar_width(need, capacity)}%;height:100%;background:{colour}"></div></div>'
            f'<p><strong>{html.escape(_verdict(plan))}.</strong></p></div>')


def plan_markdown(plan: Mapping[str, Any]) -> str:
    """The plan's totals, breakdown (part, GiB, where) and notes; the bar above it gives the verdict."""
    width, height = plan["resolution"]
    lines = [f"{plan['family']}, batch {plan['batch_size']} at {width}x{height}; architecture from "
             f"{plan['architecture_from']}.", "",
             f"Total: GPU peak (PyTorch's allocation) {gib(plan['gpu_peak_bytes'])}; with the CUDA context and the "
             f"allocator's slack {gib(plan['gpu_needed_bytes'])}; system RAM {gib(plan['host_bytes'])}.", "",
             "| Part | GiB | Where | Detail |", "|---|---:|---|---|"]
    lines += [f"| {item['name']} | {item['bytes'] / GIB:.3f} | {_WHERE.get(item['where'], item['where'])} | "
              f"{item.get('detail') or ''} |" for item in plan["items"]]
    notes = list(plan.get("notes") or [])
    lines += ["", *(f"- note: {note}" for note in notes)] if notes else []
    return "\n".join(lines)


def value_text(value: Any) -> str:
    """A change's new value as the config writes it (true, 1, "AdamW8bit")."""
    return json.dumps(value)


def fit_markdown(report: Mapping[str, Any]) -> str:
    """The fit's changes in order, each with the GPU memory needed once it and those before it are made, and
    whether they make the run fit."""
    changes, fits = report["changes"], report["fits"]
    if not changes:
        return "**No change needed: it fits as it is.**" if fits else \
            f"**It {DOES_NOT_FIT}, and no change this planner knows makes it fit:** a larger GPU, or a smaller " \
            "resolution."
    lines = ["Changes, in order (each keeps those before it):", "",
             "| # | Field | New value | Why | GPU needed after it |", "|---:|---|---|---|---:|"]
    lines += [f"| {number} | `{change['key']}` | `{value_text(change['value'])}` | {change['reason']} | "
              f"{gib(change['gpu_needed_bytes'])} |" for number, change in enumerate(changes, start=1)]
    lines += ["", "**These changes make it fit.** Apply them to the form with Apply changes." if fits else
              f"**Even with all of these it {DOES_NOT_FIT}:** a larger GPU, or a smaller resolution. Apply changes "
              "still sets them."]
    return "\n".join(lines)


def change_values(changes: Sequence[Mapping[str, Any]], specs: Mapping[str, FieldSpec],
                  to_widget: Callable[[FieldSpec, Any], Any]) -> tuple[dict[str, Any], list[str]]:
    """The fit's changes as form values ({path: widget value}, the later change of a field winning) and the keys
    the form has no field for."""
    values = {change["key"]: to_widget(specs[change["key"]], change["value"]) for change in changes
              if change["key"] in specs}
    return values, [change["key"] for change in changes if change["key"] not in specs]


def previous_values(new_values: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """What Undo puts back: the current value of each field the changes set."""
    return {path: current.get(path) for path in new_values}


def applied_markdown(new_values: Mapping[str, Any], current: Mapping[str, Any], unknown: Sequence[str]) -> str:
    """Which fields Apply changed (from what to what), and the changes the form has no field for."""
    changed = [path for path in new_values if current.get(path) != new_values[path]]
    lines = [f"**Changed in the form ({len(changed)}):**" if changed else "**The form already had these values.**"]
    lines += [f"- `{path}`: {current.get(path)!r} → {new_values[path]!r}" for path in changed]
    if unknown:
        lines.append(f"Not a field of the form, set by hand: {', '.join(f'`{key}`' for key in unknown)}.")
    return "\n".join(lines)


def undone_markdown(previous: Mapping[str, Any]) -> str:
    return f"**Undone:** {', '.join(f'`{path}`' for path in previous)} are back to what they were."
