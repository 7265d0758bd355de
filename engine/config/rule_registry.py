"""What every cross-field rule is built from: `Problem`, `RuleContext` and the `@rule` registry.

The rule modules (engine.config.rules and its rules_* siblings) register into `RULES` here; engine.config.rules
imports them all and runs them with `check()`. Kept apart so that the rule modules and the code that only reports
problems need not import the rules themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from engine.config.dataset import DatasetFile, ResolvedDataset

if TYPE_CHECKING:
    from engine.config.schema import RunConfig


@dataclass(frozen=True)
class Problem:
    """One finding about a config: the field path it concerns and what to do about it."""

    path: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class RuleContext:
    """What rules may look at besides the config itself."""

    check_packages: bool = True
    # The parsed dataset TOML named by dataset.config_file, once the caller has read it.
    dataset_file: DatasetFile | None = None
    dataset_file_name: str = ""
    datasets: list[ResolvedDataset] = field(default_factory=list)


Rule = Callable[["RunConfig", RuleContext], Iterable[Problem]]
RULES: list[Rule] = []


def rule(function: Rule) -> Rule:
    RULES.append(function)
    return function
