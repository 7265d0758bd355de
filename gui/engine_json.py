"""Running an engine command that answers with one JSON report (`doctor --json`, `plan --json`) on the form's config.

The GUI never imports torch, so for work that needs it (the memory plan) or would hold the GUI process (the doctor on a
large dataset) the engine command is the interface: the config goes to a temporary TOML (its relative paths still
start from the GUI's working folder, through --base-dir), the command runs as an argument list under a timeout, and
its standard output is the report. Kept free of gradio so it is tested directly.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.io import config_to_toml
from engine.config.schema import RunConfig
from engine.rundir.launch import engine_command, engine_environment

_OUTPUT_TAIL = 1500  # characters of a failed command's output shown in the message


@dataclass(frozen=True)
class JsonCommand:
    """What the GUI knows of one engine command that prints a JSON report."""

    title: str  # for messages: "the dataset doctor"
    exit_codes: tuple[int, ...]  # the exit codes that come with a report
    report_key: Callable[[dict[str, Any]], bool]  # does a parsed object look like this command's report?
    failure: type[Exception]  # raised, with a message for the page, when there is no report
    timeout_advice: str  # what to do when it timed out


def run_json_command(spec: JsonCommand, config: RunConfig, arguments: Callable[[Path], list[str]], *,
                     timeout: float) -> dict[str, Any]:
    """Write `config` to a temporary TOML, run `python -m engine <arguments(that path)>` and return its report.

    Raises:
        spec.failure: it timed out, could not start, or printed no report.
    """
    with tempfile.TemporaryDirectory(prefix="atelier-json-") as folder:
        config_path = Path(folder) / "config.toml"
        config_path.write_text(config_to_toml(config), encoding="utf-8")
        try:
            done = subprocess.run(engine_command(arguments(config_path)), env=engine_environment(),
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise spec.failure(f"{spec.title} did not finish within {timeout:g} s and was stopped; "
                               f"{spec.timeout_advice}") from None
        except OSError as error:
            raise spec.failure(f"{spec.title} could not start: {error}") from None
    return report_from(spec, done)


def report_from(spec: JsonCommand, done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The report a finished command printed.

    Raises:
        spec.failure: it printed none; the message holds the end of what it wrote (e.g. a value it refused).
    """
    try:
        report = json.loads(done.stdout) if done.returncode in spec.exit_codes else None
    except json.JSONDecodeError:
        report = None
    if isinstance(report, dict) and spec.report_key(report):
        return report
    output = (done.stderr.strip() or done.stdout.strip())[-_OUTPUT_TAIL:]
    raise spec.failure(f"{spec.title} stopped (exit code {done.returncode}) without a report:\n```\n{output}\n```")
