"""Where the GUI may listen: loopback by default; anything wider only with a password."""

from __future__ import annotations

import ipaddress


class UnsafeListenError(ValueError):
    """Listening on a non-loopback address without authentication."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything: treat as public


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password); None when not given."""
    if not text:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise ValueError("--auth must look like user:password, both non-empty")
    return user, password


def check_listen(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse to expose the GUI to other machines without a password.

    Raises:
        UnsafeListenError: with what to do instead.
    """
    if not is_loopback(host) and auth is None:
        raise UnsafeListenError(
            f"refusing to listen on {host} without a password: anyone who can reach this machine could start jobs "
            "and read your files. Add --auth user:password, or keep the default --host 127.0.0.1 and use an SSH "
            "tunnel.")
