"""What the GUI's HTTP server answers, and to whom: one ASGI middleware in front of every Gradio route.

Gradio serves any file under its `allowed_paths` at `/gradio_api/file=<path>`, and the app needs the home folder
there (its galleries show images from it), so without this guard `~/.ssh/id_rsa` was one GET away. The guard
answers 403, with a plain message, to:

- a Host header that is not this app's (DNS rebinding: a web page whose name resolves to 127.0.0.1 would otherwise
  talk to the app with the user's browser). Loopback names and IP literals always pass (no DNS is involved in
  them); other names only when given with --allowed-host (or as --host itself);
- a request from another web origin: an Origin header that is not the page's own, or a browser's cross-site
  sub-request (Sec-Fetch-Site), on every route, websockets included. Gradio's own CORS middleware would grant
  `Access-Control-Allow-Credentials` to any origin under a name other than localhost; app.py disables it;
- an upload (the app has none: it reads folders by path);
- a file route (`file=`, `file/`, `proxy=`) for anything but an image file (by extension, checked on the path as
  asked and on where its symlinks lead) inside the allowed roots or Gradio's own upload/cache folder, with no
  hidden part (a name starting with '.') below that folder. Remote URLs are never fetched.

Pure ASGI and gradio-free, so each rule is tested on its own (tests/unit/test_security.py) and through a running
app (tests/test_http_security.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.data.images import is_image_file
from gui.browse import FileRoots

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost"})
# Every route of Gradio 6 that answers with a file named in the URL. Matched on the decoded path, as Starlette's
# router matches it; extra slashes are tolerated so that no spelling of the route slips past.
FILE_ROUTE = re.compile(r"^/+gradio_api/+(?P<route>file=|file/|proxy=)(?P<target>.*)$", re.DOTALL)
# Gradio's routes that take files from the browser. The app has no upload widget (its images are picked by path on
# the server), so an upload could only be a step of an attack: a file dropped where a later request points to it.
UPLOAD_ROUTE = re.compile(r"^/+gradio_api/+(upload|upload_progress|process_recording)/*$")
URL_LIKE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, file:, data: ... (what Gradio calls a protocol)
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# Sec-Fetch-Site values of requests the app's own page makes (or a person typing the address).
OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def _split_host(netloc: str) -> tuple[str, int | None]:
    """'Example.com:7860' -> ('example.com', 7860); '[::1]:80' -> ('::1', 80); ('', None) when it cannot be read."""
    try:
        parts = urlsplit(f"//{netloc}")
        return (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return "", None


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_names(host: str, port: int, allowed: Iterable[str] = ()) -> frozenset[tuple[str, int | None]]:
    """The (name, port) pairs the app answers to beyond IP literals and localhost, which always pass: every
    --allowed-host ('name' or 'name:port'; no port means the web's default, 80 or 443) and the --host value with the
    listening port when it is a name. The Host check reads only the names; an Origin must match name and port."""
    names = {_split_host(name.strip()) for name in allowed if name.strip()}
    if not is_ip_literal(host):
        names.add((host.lower().rstrip("."), port))
    return frozenset(name for name in names if name[0])


@dataclass(frozen=True)
class GuardPolicy:
    """What the guard lets through. roots: where images may be served from (FileRoots' own rule, hidden folders
    under home refused); cache_folders: Gradio's upload and cache folders (the copies galleries show);
    allowed_hosts: (name, port) pairs besides localhost and IP literals (see host_names)."""

    roots: FileRoots
    cache_folders: tuple[Path, ...] = ()
    allowed_hosts: frozenset[tuple[str, int | None]] = frozenset()

    def host_refusal(self, host: str | None) -> str | None:
        if not host:
            return "Forbidden: the request has no Host header."
        name, _ = _split_host(host)
        if name in LOOPBACK_NAMES or is_ip_literal(name) or any(name == allowed for allowed, _ in self.allowed_hosts):
            return None
        return (f"Forbidden: this app does not answer to the name {name or host!r} (a guard against DNS "
                f"rebinding). To reach it under that name (an SSH tunnel or a reverse proxy), start it with "
                f"--allowed-host {name or host}.")

    def origin_refusal(self, headers: dict[str, str]) -> str | None:
        """A request from a page of another origin, or a browser's cross-site sub-request: refused."""
        origin = headers.get("origin")
        if origin is not None and not self._is_own_origin(origin, headers.get("host", "")):
            return (f"Forbidden: a request from another web origin ({origin}). Open the app at its own address; "
                    "behind a reverse proxy that changes the Host header, start it with --allowed-host "
                    "<the public name>.")
        site, mode = headers.get("sec-fetch-site"), headers.get("sec-fetch-mode")
        if site is not None and site not in OWN_FETCH_SITES and mode != "navigate":
            return f"Forbidden: a {site} request from another web page."
        return None

    def _is_own_origin(self, origin: str, host: str) -> bool:
        """Origin names the address the request was sent to (the Host header, ports compared with the scheme's
        default filled in), or an allowed host with its port (a reverse proxy may rewrite Host)."""
        try:
            parts = urlsplit(origin)
            origin_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        origin_name = (parts.hostname or "").rstrip(".")
        if not origin_name or parts.scheme not in DEFAULT_PORTS:
            return False  # "null" (sandboxed frames, file: pages) and other schemes are never the app's page
        if (origin_name, origin_port) in self.allowed_hosts or (
                origin_port == DEFAULT_PORTS[parts.scheme] and (origin_name, None) in self.allowed_hosts):
            return True
        host_name, host_port = _split_host(host)
        return origin_name == host_name and origin_port == (host_port or DEFAULT_PORTS[parts.scheme])

    def file_refusal(self, route: str, target: str) -> str | None:
        """Why file route `route` may not serve `target` (a path as the URL gives it), or None when it may."""
        if route == "proxy=" or URL_LIKE.match(target):
            return "Forbidden: this app does not fetch URLs for the page."
        typed = Path(os.path.abspath(target))  # what Gradio serves: relative paths start at the working folder
        resolved = typed.resolve()
        if not (is_image_file(typed.name) and is_image_file(resolved.name)):
            return "Forbidden: only image files are served."
        folders = (*self.cache_folders, *(folder.resolve() for folder in self.cache_folders), *self.roots.folders)
        if _hidden_below(typed, folders) or _hidden_below(resolved, folders):
            return "Forbidden: hidden files and folders are not served."
        in_cache = any(_is_within(resolved, folder.resolve()) for folder in self.cache_folders)
        if not (in_cache or self.roots.allows(typed)):
            return "Forbidden: the file is outside the folders this app may use."
        return None


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _hidden_below(path: Path, folders: Iterable[Path]) -> bool:
    """Whether a name below the deepest of `folders` holding path starts with '.' (every name when none holds it):
    the folder itself may be hidden (--allow-path ~/.cache/models, a GRADIO_TEMP_DIR under ~/.cache), what lies
    below it may not."""
    holders = [folder for folder in folders if _is_within(path, folder)]
    start = max(holders, key=lambda folder: len(folder.parts)) if holders else Path(path.anchor)
    return any(part.startswith(".") for part in path.relative_to(start).parts)


def file_route(path: str) -> tuple[str, str] | None:
    """(route, target) for a file-serving route, e.g. ('file=', '/home/me/a.png'); None for any other route."""
    found = FILE_ROUTE.match(path)
    return None if found is None else (found["route"], found["target"])


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers by lower-case name; of a repeated header, the first value (the one Starlette reads)."""
    found: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return found


class HttpGuard:
    """ASGI middleware: refuses (403, plain text) what GuardPolicy refuses, before any route runs."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    def refusal(self, scope: Scope) -> str | None:
        headers = _headers(scope)
        refusal = self.policy.host_refusal(headers.get("host")) or self.policy.origin_refusal(headers)
        if refusal is None and scope["type"] == "http":
            path = scope.get("path", "")
            if UPLOAD_ROUTE.match(path):
                return "Forbidden: this app takes no uploads; give it the path of a folder on this machine."
            asked = file_route(path)
            if asked is not None:
                refusal = self.policy.file_refusal(*asked)
        return refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        refusal = self.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": refusal[:120]})  # a 403 to the handshake
        else:
            await _send_text(send, 403, refusal, head=scope.get("method") == "HEAD")


async def _send_text(send: Send, status: int, text: str, *, head: bool = False) -> None:
    body = f"{text}\n".encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": b"" if head else body})


def hidden_entries(roots: FileRoots, keep: Iterable[Path] = ()) -> list[Path]:
    """The hidden entries directly in home and the runs folder (~/.ssh, ~/.config ...), for Gradio's blocked_paths:
    a second layer under the guard. Left out: the --allow-path roots (the user named them) and any entry holding a
    root or a `keep` folder (Gradio's cache under ~/.cache must stay servable)."""
    kept = [*roots.folders, *(Path(folder).resolve() for folder in keep)]
    found = []
    for root in roots.folders:
        if root in roots.explicit:
            continue
        try:
            names = [entry.name for entry in os.scandir(root) if entry.name.startswith(".")]
        except OSError:
            continue
        found += [root / name for name in names if not any(_is_within(folder, root / name) for folder in kept)]
    return sorted(found)
