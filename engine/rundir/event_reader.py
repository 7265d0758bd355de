"""The one reader of event files (JSON lines; engine.events writes them): whole, or incrementally while the
writer is still appending.

A reader may look at any moment, also while a line is half written: only complete lines (ending in a newline)
are read, and a line still being written is read on a later look once it is complete. A line that is no JSON
object (cut short by a crash) is skipped. Unknown event types and fields are passed on; readers ignore what they
do not know (docs/events.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:  # Gradio's JSON parser: a long run's first read (100k events) takes a third of the time json needs
    import orjson

    _fast_loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # an engine installed without the GUI may lack it; json reads the same events
    _fast_loads = json.loads

Event = dict[str, Any]


def tail_events(path: str | Path, since: int) -> tuple[list[Event], int]:
    """Events in complete lines after byte offset `since`, and the offset to ask from next time.

    A line still being written waits for the next call. A file shorter than `since` was replaced: read it anew.
    A missing file has no events yet.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    since = 0 if size < since else since
    with path.open("rb") as stream:
        stream.seek(since)
        data = stream.read(size - since)
    complete = data[: data.rfind(b"\n") + 1]
    return parse_event_lines(complete), since + len(complete)


def read_events(path: str | Path) -> list[Event]:
    """Every complete event in a file ([] when there is none yet)."""
    return tail_events(path, 0)[0]


class EventTail:
    """Follows one events file: each `read()` returns the events appended since the previous one."""

    def __init__(self, path: str | Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset  # bytes read so far, always at a line's end

    def read(self) -> list[Event]:
        events, self.offset = tail_events(self.path, self.offset)
        return events


def parse_event_lines(data: bytes) -> list[Event]:
    """The JSON objects in `data`, one a line; a line that is none (cut short by a crash) is skipped."""
    events = []
    for line in data.split(b"\n"):
        event = _parse_line(line) if line.strip() else None
        if isinstance(event, dict):
            events.append(event)
    return events


def _parse_line(line: bytes) -> Any:
    try:
        return _fast_loads(line)
    except ValueError:  # NaN or Infinity (json writes them, orjson refuses them), bad UTF-8, a line cut short
        try:
            return json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            return None
