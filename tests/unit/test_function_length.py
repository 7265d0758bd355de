"""No function in the app's own code (engine/, gui/, app.py) is longer than a reader takes in at once: about 80
lines, the limit issue 17 set for the GUI's tab builders. ruff's C901 and PLR0915 (pyproject.toml) bound branches
and statements; this bounds the length, docstring and comments included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 80


def long_functions(root: Path, limit: int) -> list[str]:
    found = []
    files = [*sorted((root / "engine").rglob("*.py")), *sorted((root / "gui").rglob("*.py")), root / "app.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_over_the_limit():
    assert long_functions(REPO, MAX_LINES) == []


def test_the_check_sees_a_long_function(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "gui").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "engine" / "long.py").write_text(f"def too_long():\n{body}\n")
    (tmp_path / "app.py").write_text("def short():\n    return 1\n")
    assert long_functions(tmp_path, MAX_LINES) == ["engine/long.py:1 too_long (81 lines)"]
