"""Where the GUI may listen (loopback by default; anything wider only with a password) and where the password
comes from: --auth on the command line (where `ps` shows it to every user), --auth-file, or ATELIER_AUTH."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from pathlib import Path

AUTH_ENV = "ATELIER_AUTH"
AUTH_ON_COMMAND_LINE = ("note: --auth on the command line can be read by every user of this machine (ps, /proc); "
                        f"prefer --auth-file FILE (mode 600) or the {AUTH_ENV} environment variable.")


class UnsafeListenError(ValueError):
    """Listening on a non-loopback address without authentication."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything: treat as public


def parse_auth(text: str | None, source: str = "--auth") -> tuple[str, str] | None:
    """'user:password' -> (user, password); None when not given. source names where the text came from."""
    if not text:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise ValueError(f"{source} must look like user:password, both non-empty")
    return user, password


def read_auth_file(path: Path) -> tuple[str, str]:
    """The user:password on the first non-empty line of path, which other users must not be able to read.

    Raises:
        ValueError: naming the file: missing, unreadable, readable by others (with the chmod that fixes it), empty
            or not user:password.
    """
    source = f"--auth-file {path}"
    try:
        mode = path.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"{source} can be read or changed by other users (mode {stat.filemode(mode)}): run "
                             f"`chmod 600 {path}` and start again")
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise ValueError(f"{source} does not exist") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{source} cannot be read: {error}") from error
    auth = parse_auth(next((line for line in lines if line.strip()), ""), source)
    if auth is None:
        raise ValueError(f"{source} is empty: write one line user:password in it")
    return auth


def resolve_auth(cli: str | None, auth_file: Path | None, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The login the GUI asks for: from --auth or --auth-file (not both), else from ATELIER_AUTH; None for none.

    Raises:
        ValueError: naming the option or variable at fault.
    """
    if cli and auth_file is not None:
        raise ValueError("give either --auth or --auth-file, not both")
    if auth_file is not None:
        return read_auth_file(auth_file)
    if cli:
        return parse_auth(cli)
    return parse_auth(environ.get(AUTH_ENV), f"the {AUTH_ENV} environment variable")


def check_listen(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse to expose the GUI to other machines without a password.

    Raises:
        UnsafeListenError: with what to do instead.
    """
    if not is_loopback(host) and auth is None:
        raise UnsafeListenError(
            f"refusing to listen on {host} without a password: anyone who can reach this machine could start jobs "
            f"and read your files. Give a login with --auth-file FILE (one line user:password, mode 600) or the "
            f"{AUTH_ENV}=user:password environment variable, or keep the default --host 127.0.0.1 and use an SSH "
            "tunnel.")
