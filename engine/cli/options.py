"""Command-line options declared once, as the fields of a dataclass, for an engine tool and the GUI that runs it.

A tool's options dataclass (e.g. ``engine.cli.class_images_cmd.ClassImagesOptions``) holds one field per option,
made with :func:`option`: its type, default, help, choices and flags. From it :func:`add_arguments` adds the argparse
arguments, :func:`cli_options` lists the options (for a GUI's widgets and choices) and :func:`to_argv` turns values
into the command line, so the flags, their defaults and the command lines a GUI builds never drift apart.

Light on purpose (standard library only): the GUI imports it (tests/unit/test_boundaries.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass
from functools import cache
from types import UnionType
from typing import Any

_METADATA_KEY = "cli"


@dataclass(frozen=True)
class _Declared:
    """What :func:`option` stores in a field's metadata; the field's name, type and default complete it."""

    flags: tuple[str, ...]
    help: str | None
    choices: tuple[Any, ...] | None
    metavar: str | None
    nargs: str | None
    group: str | None
    negatable: bool
    positional: bool


@dataclass(frozen=True)
class CliOption:
    """One option of a tool, as its parser and a GUI both read it."""

    name: str  # the dataclass field, and the argparse dest
    flags: tuple[str, ...]  # empty for a positional argument
    kind: type  # bool, int, float, str or Path (of each value, for a list)
    default: Any  # dataclasses.MISSING: the option is required
    help: str | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    nargs: str | None = None
    group: str | None = None  # a key of add_arguments' `groups` (an argument group or a mutually exclusive one)
    negatable: bool = False  # a bool that also has --no-FLAG (argparse.BooleanOptionalAction)

    @property
    def flag(self) -> str:
        """The flag a command line uses: the first one declared (e.g. -o of -o/--output)."""
        return self.flags[0]

    @property
    def positional(self) -> bool:
        return not self.flags

    @property
    def required(self) -> bool:
        return self.default is MISSING


def option(default: Any = MISSING, *, flags: Sequence[str] = (), help: str | None = None,
           choices: Sequence[Any] | None = None, metavar: str | None = None, nargs: str | None = None,
           group: str | None = None, negatable: bool = False, positional: bool = False) -> Any:
    """A dataclass field that is a command-line option. No default: a required option.

    Args:
        default: the value when the option is not given.
        flags: the flags, the one command lines use first; default ``--`` + the field name with '-' for '_'.
        help, choices, metavar, nargs: as for ``argparse.ArgumentParser.add_argument``.
        group: the key of the argument group it goes into (see :func:`add_arguments`).
        negatable: a bool option that also takes ``--no-FLAG``; its default may then be None (not given).
        positional: a positional argument, named by the field.
    """
    declared = _Declared(tuple(flags), help, tuple(choices) if choices is not None else None, metavar, nargs, group,
                         negatable, positional)
    metadata = {_METADATA_KEY: declared}
    if default is MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _kind(annotation: Any) -> type:
    """The type each value is parsed to: `int | None` -> int, `list[str]` -> str."""
    if isinstance(annotation, UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) in (list, tuple):
        annotation = typing.get_args(annotation)[0]
    return annotation


@cache
def cli_options(options_type: type) -> tuple[CliOption, ...]:
    """The options a dataclass declares with :func:`option`, in declaration order."""
    hints = typing.get_type_hints(options_type)
    found = []
    for field in dataclasses.fields(options_type):
        declared: _Declared | None = field.metadata.get(_METADATA_KEY)
        if declared is None:
            continue
        flags = () if declared.positional else declared.flags or ("--" + field.name.replace("_", "-"),)
        found.append(CliOption(field.name, flags, _kind(hints[field.name]), field.default, declared.help,
                               declared.choices, declared.metavar, declared.nargs, declared.group,
                               declared.negatable))
    return tuple(found)


def cli_option(options_type: type, name: str) -> CliOption:
    """One option of `options_type` by field name.

    Raises:
        ValueError: the dataclass declares no such option.
    """
    for declared in cli_options(options_type):
        if declared.name == name:
            return declared
    known = ", ".join(declared.name for declared in cli_options(options_type))
    raise ValueError(f"{options_type.__name__} has no option {name!r}; it has {known}")


def _argparse_kwargs(declared: CliOption) -> dict[str, Any]:
    if declared.kind is bool:
        action = argparse.BooleanOptionalAction if declared.negatable else "store_true"
        default = declared.default if declared.default is not MISSING else None
        return {"action": action, "default": default, "help": declared.help}
    kwargs = {"type": declared.kind if declared.kind is not str else None, "choices": declared.choices,
              "metavar": declared.metavar, "nargs": declared.nargs, "help": declared.help}
    if not declared.positional:
        kwargs |= {"required": True} if declared.required else {"default": declared.default}
    return {key: value for key, value in kwargs.items() if value is not None or key == "default"}


def add_arguments(parser: argparse.ArgumentParser, options_type: type,
                  groups: Mapping[str, Any] | None = None) -> None:
    """Add every option of `options_type` to `parser`, or to the group its `group` names.

    Args:
        parser: the (sub)command's parser.
        options_type: a dataclass whose fields were made with :func:`option`.
        groups: group key -> ``parser.add_argument_group(...)`` or ``parser.add_mutually_exclusive_group(...)``.
    """
    for declared in cli_options(options_type):
        target = (groups or {})[declared.group] if declared.group else parser
        names = (declared.name,) if declared.positional else declared.flags
        dest = {} if declared.positional else {"dest": declared.name}
        target.add_argument(*names, **dest, **_argparse_kwargs(declared))


def value_text(value: Any) -> str:
    """A value as a command line writes it: a whole number without '.0' (8, not 8.0: a GUI number box sends
    floats), other numbers as short as they stay exact, text and paths as they are."""
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def option_tokens(declared: CliOption, value: Any, *, joined: bool = False) -> list[str]:
    """The command-line words of one option: none for None (not given) or an unset flag.

    Args:
        joined: ``--flag=value`` as one word, which keeps a value that starts with '-' from reading as a flag.
    """
    if value is None:
        return []
    if declared.kind is bool:
        if declared.negatable:
            return [declared.flag if value else "--no-" + declared.flag.removeprefix("--")]
        return [declared.flag] if value else []
    values = list(value) if isinstance(value, list | tuple) else [value]
    texts = [value_text(item) for item in values]
    if declared.positional:
        return texts
    if joined and len(texts) == 1:  # a long flag: argparse reads "-o=x" as -o with the value "=x"
        flag = next((flag for flag in declared.flags if flag.startswith("--")), declared.flag)
        return [f"{flag}={texts[0]}"]
    return [declared.flag, *texts]


def to_argv(options_type: type, values: Mapping[str, Any], *, joined: bool = False) -> list[str]:
    """The command line of `values` (field name -> value), in the order `values` gives them; None leaves an option
    out. The engine's parser reads it back to the same values (tests/unit/test_cli_options.py).

    Raises:
        ValueError: a name the dataclass does not declare (a GUI re-typing a flag that no longer exists).
    """
    argv: list[str] = []
    for name, value in values.items():
        argv += option_tokens(cli_option(options_type, name), value, joined=joined)
    return argv


def parsed_values(options_type: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values of `options_type`'s options in a parsed namespace (field name -> value)."""
    return {declared.name: getattr(args, declared.name) for declared in cli_options(options_type)}


__all__ = ["CliOption", "add_arguments", "cli_option", "cli_options", "option", "option_tokens",
           "parsed_values", "to_argv", "value_text"]
