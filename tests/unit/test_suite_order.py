"""The suite starts its longest files first (tests/conftest.py, from tests/file_durations.json), keeping each file's
tests in their order, so two xdist workers end together; tools/test_durations.py records the figures."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Three light files, given in name order; the third is not in the table (a new file: estimated from its marks).
FILES = ["tests/unit/test_boundaries.py", "tests/unit/test_cli.py", "tests/unit/test_suite_order.py"]


def collected(*paths: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *paths],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_the_longest_recorded_file_is_collected_first_and_each_file_keeps_its_order():
    recorded = json.loads((REPO / "tests" / "file_durations.json").read_text(encoding="utf-8"))
    assert FILES[2] not in recorded
    assert recorded[FILES[1]] > recorded[FILES[0]] > 1.0  # so the order below is not the name order
    items = collected(*FILES)
    files = list(dict.fromkeys(item.split("::")[0] for item in items))
    assert files == [FILES[1], FILES[0], FILES[2]]
    for path in FILES:
        assert [item for item in items if item.startswith(path + "::")] == collected(path)


def test_durations_are_added_up_per_file(tmp_path):
    spec = importlib.util.spec_from_file_location("test_durations_tool", REPO / "tools" / "test_durations.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    log = """============================= slowest durations =============================
12.50s call     tests/browser/test_a.py::test_one
2.25s setup    tests/browser/test_a.py::test_one
0.75s teardown tests/unit/test_b.py::test_two[x-1]
(3 durations < 0.005s hidden.  Use -vv to show these durations.)
"""
    assert tool.file_seconds(log) == {"tests/browser/test_a.py": 14.75, "tests/unit/test_b.py": 0.75}
