"""The GUI's security rules on their own: where the login comes from, which Host names and origins the server answers,
and which files its file routes may serve (gui/security.py, gui/http_guard.py). Through a running app:
tests/test_http_security.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from pathlib import Path

import pytest
from PIL import Image

from gui.browse import FileRoots
from gui.http_guard import GuardPolicy, HttpGuard, file_route, hidden_entries, host_names
from gui.security import AUTH_ENV, UnsafeListenError, check_listen, parse_auth, read_auth_file, resolve_auth

# --- the login ---------------------------------------------------------------------------------------------------


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_auth_file_gives_the_login_of_its_first_line(tmp_path):
    assert read_auth_file(_secret(tmp_path / "auth", "\nme:s3cret:with:colons\nignored\n")) == (
        "me", "s3cret:with:colons")


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_auth_file_others_can_read_is_refused_with_the_fix(tmp_path, mode):
    path = _secret(tmp_path / "auth", "me:pw\n", mode)
    with pytest.raises(ValueError, match=rf"--auth-file {path} can be read or changed by other users .*chmod 600"):
        read_auth_file(path)


@pytest.mark.parametrize(("text", "message"), [("", "is empty"), ("\n\n", "is empty"),
                                                ("nopassword\n", "must look like user:password"),
                                                (":pw\n", "must look like user:password")])
def test_auth_file_without_a_login_names_the_file(tmp_path, text, message):
    path = _secret(tmp_path / "auth", text)
    with pytest.raises(ValueError, match=f"--auth-file {path} {message}"):
        read_auth_file(path)


def test_missing_auth_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="--auth-file .*missing does not exist"):
        read_auth_file(tmp_path / "missing")


def test_login_comes_from_the_flag_the_file_or_the_environment(tmp_path):
    path = _secret(tmp_path / "auth", "file:pw\n")
    env = {AUTH_ENV: "env:pw"}
    assert resolve_auth("cli:pw", None, env) == ("cli", "pw")
    assert resolve_auth(None, path, env) == ("file", "pw")
    assert resolve_auth(None, None, env) == ("env", "pw")
    assert resolve_auth(None, None, {}) is None
    with pytest.raises(ValueError, match="either --auth or --auth-file"):
        resolve_auth("cli:pw", path, env)
    with pytest.raises(ValueError, match=f"the {AUTH_ENV} environment variable must look like user:password"):
        resolve_auth(None, None, {AUTH_ENV: "nocolon"})


def test_wider_listening_needs_a_login():
    check_listen("127.0.0.1", None)
    check_listen("0.0.0.0", parse_auth("me:pw"))
    with pytest.raises(UnsafeListenError, match=f"--auth-file FILE .* {AUTH_ENV}=user:password"):
        check_listen("0.0.0.0", None)


# --- Host and origin ---------------------------------------------------------------------------------------------

POLICY = GuardPolicy(FileRoots(()), allowed_hosts=host_names("127.0.0.1", 7860, ["atelier.example.org", "box:8443"]))


@pytest.mark.parametrize("host", ["127.0.0.1:7860", "localhost:7860", "[::1]:7860", "localhost", "LOCALHOST:1",
                                  "localhost.:7860", "192.168.1.5:7860", "atelier.example.org", "box:8443"])
def test_loopback_names_ip_literals_and_allowed_hosts_pass(host):
    assert POLICY.host_refusal(host) is None


@pytest.mark.parametrize("host", ["evil.example.com:7860", "localhost.evil.example.com:7860", "127.0.0.1.nip.io",
                                  "sub.atelier.example.org", "", None])
def test_other_host_names_are_refused_with_the_flag_that_allows_them(host):
    refusal = POLICY.host_refusal(host)
    assert refusal is not None and refusal.startswith("Forbidden")
    if host:
        assert f"--allowed-host {host.split(':')[0]}" in refusal


def test_a_host_name_given_as_host_is_answered_on_its_port():
    policy = GuardPolicy(FileRoots(()), allowed_hosts=host_names("MyHost.lan", 7860))
    assert policy.host_refusal("myhost.lan:7860") is None
    assert policy.origin_refusal({"origin": "http://myhost.lan:7860", "host": "myhost.lan:7860"}) is None
    # Another server on the same machine is another origin, even under an allowed name.
    assert policy.origin_refusal({"origin": "http://myhost.lan:8080", "host": "myhost.lan:7860"})


@pytest.mark.parametrize(("origin", "host"), [
    ("http://127.0.0.1:7860", "127.0.0.1:7860"), ("http://localhost:7860", "localhost:7860"),
    ("http://[::1]:7860", "[::1]:7860"), ("https://atelier.example.org", "127.0.0.1:7860"),
    ("https://box:8443", "127.0.0.1:7860"), ("http://10.0.0.2", "10.0.0.2"), ("https://10.0.0.2", "10.0.0.2:443")])
def test_the_pages_own_origin_passes(origin, host):
    assert POLICY.origin_refusal({"origin": origin, "host": host}) is None


@pytest.mark.parametrize(("origin", "host"), [
    ("http://evil.example.com", "127.0.0.1:7860"), ("null", "127.0.0.1:7860"),
    ("http://localhost:8080", "localhost:7860"),  # another local server's page
    ("http://127.0.0.1:7860", "localhost:7860"), ("file://", "127.0.0.1:7860"), ("http://10.0.0.2", "10.0.0.2:81"),
    ("https://atelier.example.org:8443", "127.0.0.1:7860"), ("https://box", "127.0.0.1:7860")])
def test_another_origin_is_refused(origin, host):
    assert POLICY.origin_refusal({"origin": origin, "host": host}).startswith("Forbidden: a request from another")


def test_cross_site_sub_requests_are_refused_but_navigation_passes():
    host = {"host": "127.0.0.1:7860"}
    assert POLICY.origin_refusal({**host, "sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"})
    assert POLICY.origin_refusal({**host, "sec-fetch-site": "same-site", "sec-fetch-mode": "cors"})
    assert POLICY.origin_refusal({**host, "sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}) is None
    assert POLICY.origin_refusal({**host, "sec-fetch-site": "same-origin", "sec-fetch-mode": "cors"}) is None
    assert POLICY.origin_refusal(host) is None  # scripts and curl send neither


# --- files -------------------------------------------------------------------------------------------------------


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path, format="PNG")
    return path


@pytest.fixture
def world(tmp_path):
    """A home folder with secrets and images, an --allow-path folder inside a hidden one, a runs folder, an image
    outside every root and a Gradio cache folder."""
    home, cache, outside = tmp_path / "home", tmp_path / "gradio", tmp_path / "outside"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY\n")
    _png(home / ".config" / "app" / "icon.png")
    _png(home / "pics" / "a.png")
    _png(home / "pics" / ".secret.png")
    _png(home / "pics" / "Upper.JPG")
    for name in ("model.safetensors", "config.toml", "notes.txt", "id_rsa"):
        (home / "pics" / name).write_text("x")
    (home / "pics" / "key.png").symlink_to(home / ".ssh" / "id_rsa")
    (home / "pics" / "out.png").symlink_to(_png(outside / "b.png"))
    _png(home / ".cache" / "models" / "m.png")
    _png(home / ".cache" / "models" / ".git" / "m.png")
    _png(cache / "0a1b" / "a.png")
    (cache / "0a1b" / "up.txt").write_text("uploaded")
    roots = FileRoots((home, home / ".cache" / "models", home / "runs"), explicit=(home / ".cache" / "models",))
    return {"home": home, "cache": cache, "outside": outside, "policy": GuardPolicy(roots, (cache,))}


@pytest.mark.parametrize("name", ["pics/a.png", "pics/Upper.JPG", ".cache/models/m.png", "pics/../pics/a.png"])
def test_images_inside_the_roots_are_served(world, name):
    assert world["policy"].file_refusal("file=", str(world["home"] / name)) is None


def test_images_in_gradios_cache_are_served(world):
    assert world["policy"].file_refusal("file=", str(world["cache"] / "0a1b" / "a.png")) is None


@pytest.mark.parametrize(("name", "why"), [
    (".ssh/id_rsa", "only image"), (".config/app/icon.png", "hidden"),
    ("pics/.secret.png", "hidden"), (".cache/models/.git/m.png", "hidden"),
    ("pics/model.safetensors", "only image"), ("pics/config.toml", "only image"), ("pics/notes.txt", "only image"),
    ("pics/id_rsa", "only image"), ("pics/key.png", "only image"), ("pics/out.png", "outside the folders"),
    ("pics", "only image")])
def test_secrets_hidden_paths_and_non_images_are_refused(world, name, why):
    assert why in world["policy"].file_refusal("file=", str(world["home"] / name))


def test_outside_the_roots_and_non_images_in_the_cache_are_refused(world):
    policy = world["policy"]
    assert "outside the folders" in policy.file_refusal("file=", str(world["outside"] / "b.png"))
    assert "only image" in policy.file_refusal("file=", str(world["cache"] / "0a1b" / "up.txt"))
    assert "outside the folders" in policy.file_refusal("file=", "a.png")  # relative: from the working folder


@pytest.mark.parametrize(("route", "target"), [("file=", "http://169.254.169.254/a.png"), ("file=", "file:/a.png"),
                                               ("proxy=", "https://example.org/a.png"), ("proxy=", "/a.png")])
def test_urls_and_proxies_are_never_fetched(route, target):
    assert "does not fetch URLs" in POLICY.file_refusal(route, target)


@pytest.mark.parametrize(("path", "expected"), [
    ("/gradio_api/file=/home/me/a.png", ("file=", "/home/me/a.png")),
    ("//gradio_api//file=/home/me/a.png", ("file=", "/home/me/a.png")),
    ("/gradio_api/file/home/me/a.png", ("file/", "home/me/a.png")),
    ("/gradio_api/proxy=https://x", ("proxy=", "https://x")), ("/gradio_api/file=", ("file=", "")),
    ("/gradio_api/upload", None), ("/config", None), ("/file=/etc/passwd", None)])
def test_file_routes_are_recognised(path, expected):
    assert file_route(path) == expected


def test_hidden_entries_of_home_are_blocked_except_those_holding_a_root_or_the_cache(world, tmp_path):
    home = world["home"]
    (home / ".gnupg").mkdir()
    _png(home / ".local" / "gradio" / "x.png")
    assert hidden_entries(FileRoots((home,)), keep=[home / ".local" / "gradio"]) == [
        home / ".cache", home / ".config", home / ".gnupg", home / ".ssh"]
    roots = FileRoots((home, home / ".cache" / "models"), explicit=(home / ".cache" / "models",))
    assert hidden_entries(roots) == [home / ".config", home / ".gnupg", home / ".local", home / ".ssh"]


# --- the middleware ----------------------------------------------------------------------------------------------


async def _downstream(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _call(guard: HttpGuard, scope: dict) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    # In a thread of its own: in a process whose browser tests keep Playwright's event loop running in the main
    # thread (the suite without workers), asyncio.run there would refuse to start a second loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, guard(scope, receive, send)).result()
    return sent


def _scope(kind: str = "http", path: str = "/", **headers: str) -> dict:
    return {"type": kind, "method": "GET", "path": path,
            "headers": [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]}


def test_guard_answers_403_in_plain_text_before_any_route(world):
    guard = HttpGuard(_downstream, world["policy"])
    refused = _call(guard, _scope(path=f"/gradio_api/file={world['home']}/.ssh/id_rsa", host="127.0.0.1:7860"))
    assert refused[0]["status"] == 403
    assert dict(refused[0]["headers"])[b"content-type"].startswith(b"text/plain")
    assert refused[1]["body"].startswith(b"Forbidden: only image files")
    served = _call(guard, _scope(path=f"/gradio_api/file={world['home']}/pics/a.png", host="127.0.0.1:7860"))
    assert served[0]["status"] == 200
    assert _call(guard, _scope(host="evil.example.com"))[0]["status"] == 403


def test_guard_closes_a_foreign_websocket_and_passes_lifespan(world):
    guard = HttpGuard(_downstream, world["policy"])
    closed = _call(guard, _scope("websocket", host="127.0.0.1:7860", origin="http://evil.example.com"))
    assert closed == [{"type": "websocket.close", "code": 1008, "reason": closed[0]["reason"]}]
    assert _call(guard, {"type": "lifespan"})[0]["status"] == 200  # not inspected
