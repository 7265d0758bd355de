"""Reading numbers out of ``network_args``: kohya passes them as "key=value" strings, a TOML table as numbers."""

from __future__ import annotations

from typing import Any

__all__ = ["arg_flag", "arg_non_negative", "arg_number"]


def arg_number(path: str, value: Any, wanted: str) -> float:
    """``value`` as a float; ValueError "<path> must be <wanted>, got <value>" for a bool, a non-number or text
    that is no number. Range checks are the caller's, with the same message."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{path} must be {wanted}, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{path} must be {wanted}, got {value!r}") from None


def arg_flag(path: str, value: Any) -> bool:
    """A true/false network_arg: a bool, or the text "true"/"false" in any case (kohya compares with "True"; lycoris
    would read "no" or "0" as true, so anything else is refused)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{path} must be true or false, got {value!r}")


def arg_non_negative(path: str, value: Any, wanted: str) -> float:
    """:func:`arg_number`, refusing values below 0 and nan with the same message."""
    number = arg_number(path, value, wanted)
    if not number >= 0:  # also refuses nan
        raise ValueError(f"{path} must be {wanted}, got {value!r}")
    return number
