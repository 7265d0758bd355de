"""The Parameters tab's memory plan: `python -m engine plan --json` on the form's config, in an engine process.

The plan traces a training step with fake tensors, which needs torch; the GUI never imports it, so the engine
command is the interface: the config goes to a temporary TOML (its relative paths still start from the GUI's working
folder, through --base-dir, as for Start and the doctor), and the report comes back as JSON. Kept free of gradio so
it is tested directly.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config.errors import ConfigError
from engine.config.io import config_to_toml
from engine.rundir.launch import engine_command, engine_environment
from gui.browse import FileRoots, PathNotAllowed
from gui.train_start import confined_config

# The plan takes a few seconds to a quarter of a minute (it loads the model's configs and traces one step), and
# --fit makes a plan per change it tries; a plan process silent after this long is stopped.
PLAN_TIMEOUT_S = 300.0
EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 3  # engine/cli/plan_cmd.py: 0 fits (or no GPU known), 3 does not, 2 bad input
_OUTPUT_TAIL = 1500  # characters of a failed plan's output shown in the message


class PlanFailed(Exception):
    """No plan: the form has problems, names paths the app may not use, or the plan process gave no report."""


def plan_arguments(config_path: str | Path, base: str | Path, gpu_memory: str = "", *, fit: bool = False) -> list[str]:
    """The engine's arguments: `plan CONFIG --json --base-dir BASE [--gpu-memory SIZE] [--fit]`; an empty size plans
    for the detected GPU."""
    size = (gpu_memory or "").strip()
    return ["plan", str(config_path), "--json", "--base-dir", str(base), *(["--gpu-memory", size] if size else []),
            *(["--fit"] if fit else [])]


def plan_report(config_dict: Mapping[str, Any] | None, roots: FileRoots, base: Path, gpu_memory: str = "", *,
                fit: bool = False, timeout: float = PLAN_TIMEOUT_S) -> dict[str, Any]:
    """The plan (with `fit`, the fit's report) of the form's config, its relative paths from `base`.

    Raises:
        PlanFailed: why there is no plan, as markdown for the page.
    """
    if config_dict is None:
        raise PlanFailed("the settings have problems; they are listed at the top of the Parameters tab.")
    try:
        config = confined_config(config_dict, roots, base, check_packages=False)
    except PathNotAllowed as error:
        raise PlanFailed(str(error)) from None
    except ConfigError as error:
        listed = "\n".join(f"- `{problem.path}`: {problem.message}" for problem in error.problems)
        raise PlanFailed(f"the settings need changes:\n{listed}") from None
    with tempfile.TemporaryDirectory(prefix="atelier-plan-") as folder:
        config_path = Path(folder) / "config.toml"
        config_path.write_text(config_to_toml(config), encoding="utf-8")
        command = engine_command(plan_arguments(config_path, base, gpu_memory, fit=fit))
        try:
            done = subprocess.run(command, env=engine_environment(), capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise PlanFailed(f"the memory plan did not finish within {timeout:g} s and was stopped; run "
                             "`python -m engine plan` on the settings to see how far it gets.") from None
        except OSError as error:
            raise PlanFailed(f"the memory plan could not start: {error}") from None
    return report_from(done, fit=fit)


def report_from(done: subprocess.CompletedProcess[str], *, fit: bool = False) -> dict[str, Any]:
    """The JSON a plan process printed (it exits 0 or 3 with one).

    Raises:
        PlanFailed: it stopped without one; the message holds the end of what it wrote (e.g. a size it refused).
    """
    try:
        report = json.loads(done.stdout) if done.returncode in (EXIT_FITS, EXIT_DOES_NOT_FIT) else None
    except json.JSONDecodeError:
        report = None
    if isinstance(report, dict) and ("changes" if fit else "items") in report:
        return report
    output = (done.stderr.strip() or done.stdout.strip())[-_OUTPUT_TAIL:]
    raise PlanFailed(f"the memory plan stopped (exit code {done.returncode}) without a report:\n```\n{output}\n```")
