"""Reading choices back out of type annotations, so lists of options are never typed twice."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal


def literal_values(annotation: Any) -> tuple[Any, ...]:
    """The allowed values of a Literal annotation, also inside Optional/Annotated; () when there are none."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return typing.get_args(annotation)
    if origin is typing.Annotated:
        return literal_values(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        values: tuple[Any, ...] = ()
        for member in typing.get_args(annotation):
            values += literal_values(member)
        return values
    return ()
