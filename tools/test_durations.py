#!/usr/bin/env python
"""Record how long each test file takes, for the suite's file order (tests/conftest.py runs the longest first).

    bash tools/test.sh --durations=0 | tee suite.txt
    python tools/test_durations.py suite.txt [more.txt ...]

Reads pytest's duration lines ("12.34s call     tests/x.py::test_y") and writes tests/file_durations.json, the
seconds of each file's setup, calls and teardown added up. Files in the logs replace their old figures; files that
are not in them keep theirs, so a log of a few files (run alone) updates just those. The figures only decide the
order the files start in: an old figure makes the run slower, never wrong.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DURATIONS = Path(__file__).resolve().parents[1] / "tests" / "file_durations.json"
DURATION_LINE = re.compile(r"^(\d+(?:\.\d+)?)s (?:setup|call|teardown)\s+(\S+?\.py)::")


def file_seconds(text: str) -> dict[str, float]:
    """Seconds per test file in one pytest output."""
    seconds: dict[str, float] = {}
    for line in text.splitlines():
        match = DURATION_LINE.match(line.strip())
        if match:
            seconds[match[2]] = seconds.get(match[2], 0.0) + float(match[1])
    return seconds


# Never recorded: tests/unit/test_suite_order.py checks that a file the table does not hold is collected last, with
# itself as that file.
UNRECORDED = frozenset({"tests/unit/test_suite_order.py"})


def main(logs: list[str]) -> int:
    if not logs:
        print(__doc__, file=sys.stderr)
        return 2
    known = json.loads(DURATIONS.read_text(encoding="utf-8")) if DURATIONS.exists() else {}
    for log in logs:
        known.update({name: round(seconds, 1)
                      for name, seconds in file_seconds(Path(log).read_text(encoding="utf-8")).items()
                      if name not in UNRECORDED})
    ordered = dict(sorted(known.items(), key=lambda entry: (-entry[1], entry[0])))
    temporary = DURATIONS.with_suffix(".tmp")
    temporary.write_text(json.dumps(ordered, indent=1) + "\n", encoding="utf-8")
    temporary.replace(DURATIONS)
    print(f"{len(ordered)} files in {DURATIONS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
