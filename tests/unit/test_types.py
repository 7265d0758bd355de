"""The config model and the run-directory contract stay type-clean under mypy (settings in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_mypy_finds_nothing_in_config_and_rundir():
    # The packages come from [tool.mypy] files; the cache (.mypy_cache/, ignored) makes a rerun take a fraction
    # of a second, a cold run about 3 s.
    result = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
