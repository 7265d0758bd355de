"""Reading and writing config dicts by dotted path ('dataset.general.resolution', with [n] for list items)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Steps = Sequence[str | int]


def _steps(path: str | Steps) -> Steps:
    return path.split(".") if isinstance(path, str) else path


def _child(node: Any, step: str | int) -> tuple[bool, Any]:
    """(found, value) of one step down: a list item by index or a table entry by key."""
    if isinstance(step, int) and isinstance(node, list) and -len(node) <= step < len(node):
        return True, node[step]
    if isinstance(step, str) and isinstance(node, Mapping) and step in node:
        return True, node[step]
    return False, None


def get_path(data: Mapping[str, Any], path: str | Steps, default: Any = None) -> Any:
    """The value at `path`, or `default` when any part of it is missing."""
    node: Any = data
    for step in _steps(path):
        found, node = _child(node, step)
        if not found:
            return default
    return node


def set_path(data: dict[str, Any], path: str | Steps, value: Any) -> None:
    """Set the value at `path`, creating missing tables; None removes the key, since config files have no null.

    Raises:
        KeyError, IndexError, TypeError: when a list item along the path does not exist.
    """
    *parents, last = _steps(path)
    node: Any = data
    for step in parents:
        if isinstance(step, str) and isinstance(node, dict) and step not in node:
            node[step] = {}
        node = node[step]
    if value is None and isinstance(node, dict):
        node.pop(last, None)
    else:
        node[last] = value
