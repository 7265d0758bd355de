"""The Parameters tab's memory plan: `python -m engine plan --json` on the form's config, in an engine process.

The plan traces a training step with fake tensors, which needs torch; the GUI never imports it, so the engine
command is the interface: the config goes to a temporary TOML (its relative paths still start from the GUI's working
folder, through --base-dir, as for Start and the doctor), and the report comes back as JSON. Kept free of gradio so
it is tested directly.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from engine.config.errors import ConfigError
from gui import engine_json
from gui.browse import FileRoots, PathNotAllowed
from gui.engine_json import JsonCommand, run_json_command
from gui.train_start import confined_config

# The plan takes a few seconds to a quarter of a minute (it loads the model's configs and traces one step), and
# --fit makes a plan per change it tries; a plan process silent after this long is stopped.
PLAN_TIMEOUT_S = 300.0
EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 3  # engine/cli/plan_cmd.py: 0 fits (or no GPU known), 3 does not, 2 bad input


class PlanFailed(Exception):
    """No plan: the form has problems, names paths the app may not use, or the plan process gave no report."""


def _plan_command(key: str) -> JsonCommand:
    return JsonCommand(title="the memory plan", exit_codes=(EXIT_FITS, EXIT_DOES_NOT_FIT),
                       report_key=lambda report: key in report, failure=PlanFailed,
                       timeout_advice="run `python -m engine plan` on the settings to see how far it gets.")


PLAN_COMMAND, FIT_COMMAND = _plan_command("items"), _plan_command("changes")


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
    arguments = partial(plan_arguments, base=base, gpu_memory=gpu_memory, fit=fit)
    return run_json_command(FIT_COMMAND if fit else PLAN_COMMAND, config, arguments, timeout=timeout)


def report_from(done: subprocess.CompletedProcess[str], *, fit: bool = False) -> dict[str, Any]:
    """The JSON a plan process printed (it exits 0 or 3 with one).

    Raises:
        PlanFailed: it stopped without one; the message holds the end of what it wrote (e.g. a size it refused).
    """
    return engine_json.report_from(FIT_COMMAND if fit else PLAN_COMMAND, done)
