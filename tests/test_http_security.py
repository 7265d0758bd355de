"""What the GUI's HTTP server gives to whoever can reach its port, tried with a plain HTTP client against the real app
(app.py in a subprocess), as a script on the same machine or a web page (through DNS rebinding) would.

The home folder is a temp folder holding what an attacker wants (~/.ssh/id_rsa, ~/.config) beside what the app
shows (an image) and what it must not hand out (model weights, settings). On the old main every one of these files
was served by `/gradio_api/file=`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from app_helpers import free_port, wait_for_http
from PIL import Image

from gui.security import AUTH_ENV

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (30, 120, 200)).save(path, format="PNG")
    return path


def _make_home(base: Path) -> Path:
    home = base / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (home / ".config" / "atelier").mkdir(parents=True)
    (home / ".config" / "atelier" / "settings.toml").write_text("token = 'secret'\n")
    _png(home / ".config" / "atelier" / "avatar.png")
    _png(home / "pics" / "a.png")
    _png(home / "pics" / ".hidden.png")
    (home / "pics" / "model.safetensors").write_bytes(b"weights")
    (home / "pics" / "train.toml").write_text("[model]\n")
    (home / "pics" / "notes.txt").write_text("notes\n")
    (home / "pics" / "key.png").symlink_to(home / ".ssh" / "id_rsa")  # an image by name, a key underneath
    return home


def _env(**extra: str) -> dict[str, str]:
    """This environment without a login of the test runner's, plus extra."""
    env = {name: value for name, value in os.environ.items() if name != AUTH_ENV}
    return {**env, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **extra}


def _start(base: Path, *args: str, **env: str) -> tuple[subprocess.Popen, str, Path]:
    """app.py on a free port with HOME = base/home and Gradio's upload folder in base; (process, url, home)."""
    home = _make_home(base)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--port", str(port), "--runs-dir", str(home / "runs"), *args],
        cwd=REPO, env=_env(HOME=str(home), GRADIO_TEMP_DIR=str(base / "gradio"), **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, f"http://127.0.0.1:{port}", home


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("http")
    process, url, home = _start(base, "--allowed-host", "atelier.example.org")
    try:
        wait_for_http(url + "/", process)
        with httpx.Client(base_url=url, timeout=30) as client:
            yield {"url": url, "home": home, "cache": base / "gradio", "client": client}
    finally:
        _stop(process)


def _file(app: dict[str, Any], path: Path | str, route: str = "file=", **headers: str) -> httpx.Response:
    return app["client"].get(f"/gradio_api/{route}{path}", headers=headers)


@pytest.mark.slow
def test_an_image_in_the_home_folder_is_served(app):
    response = _file(app, app["home"] / "pics" / "a.png")
    assert response.status_code == 200
    assert response.content == (app["home"] / "pics" / "a.png").read_bytes()


def test_an_image_in_gradios_own_folder_is_served_but_nothing_else(app):
    """Gradio copies every image a gallery shows into its upload folder and the page loads it from there."""
    image = _png(app["cache"] / "0123abcd" / "copy.png")
    (image.parent / "copy.txt").write_text("not an image\n")
    assert _file(app, image).status_code == 200
    assert _file(app, image.parent / "copy.txt").status_code == 403


@pytest.mark.parametrize("name", [".ssh/id_rsa", ".ssh", ".config/atelier/settings.toml", ".config/atelier/avatar.png",
                                  "pics/.hidden.png", "pics/model.safetensors", "pics/train.toml", "pics/notes.txt",
                                  "pics/key.png", "pics/../.ssh/id_rsa"])
@pytest.mark.parametrize("route", ["file=", "file/"])
def test_secrets_dotfiles_and_non_images_are_refused(app, name, route):
    path = f"{app['home']}/{name}" if route == "file=" else f"{app['home']}/{name}".lstrip("/")
    response = _file(app, path, route)
    assert response.status_code == 403, response.text[:200]
    assert response.text.startswith("Forbidden")
    assert b"PRIVATE KEY" not in response.content and b"secret" not in response.content


def test_encoded_and_head_requests_are_refused_too(app):
    key = f"{app['home']}/.ssh/id_rsa"
    assert _file(app, quote(key, safe="")).status_code == 403
    assert _file(app, key.replace(".ssh", "%2e%73%73%68")).status_code == 403
    assert app["client"].head(f"/gradio_api/file={key}").status_code == 403


def test_files_outside_the_home_folder_and_urls_are_refused(app):
    assert _file(app, "/etc/passwd").status_code == 403
    assert _file(app, REPO / "app.py").status_code == 403
    assert _file(app, "http://169.254.169.254/latest/meta-data").status_code == 403
    assert _file(app, "https://example.org/a.png", route="proxy=").status_code == 403


def test_uploads_are_refused(app):
    response = app["client"].post("/gradio_api/upload", files={"files": ("optimizer.pt", b"\x80\x04K.")})
    assert response.status_code == 403
    assert not list(app["cache"].rglob("optimizer.pt"))


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:7860", "localhost.evil.example.com"])
def test_a_foreign_host_header_is_refused_on_every_route(app, host):
    """DNS rebinding: a page at evil.example.com whose name now resolves to 127.0.0.1 sends Host: evil.example.com."""
    for method, route in [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"),
                          ("POST", "/gradio_api/queue/join"), ("GET", f"/gradio_api/file={app['home']}/pics/a.png")]:
        response = app["client"].request(method, route, headers={"Host": host})
        assert response.status_code == 403, (method, route)
        assert "--allowed-host" in response.text


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "atelier.example.org"])
def test_own_host_names_are_answered(app, host):
    port = app["url"].rsplit(":", 1)[1]
    assert app["client"].get("/config", headers={"Host": f"{host}:{port}"}).status_code == 200


def test_cross_origin_requests_are_refused_without_granting_credentials(app):
    foreign = {"Origin": "http://evil.example.com"}
    for method, route in [("GET", "/config"), ("POST", "/gradio_api/queue/join"), ("POST", "/login"),
                          ("GET", f"/gradio_api/file={app['home']}/pics/a.png")]:
        response = app["client"].request(method, route, headers=foreign)
        assert response.status_code == 403, (method, route)
        assert "access-control-allow-credentials" not in response.headers
        assert "access-control-allow-origin" not in response.headers
    preflight = app["client"].options("/gradio_api/queue/join", headers={
        **foreign, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers
    sub_request = app["client"].get(f"/gradio_api/file={app['home']}/pics/a.png",
                                    headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
    assert sub_request.status_code == 403


def test_same_origin_requests_work(app):
    own = {"Origin": app["url"], "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    response = app["client"].get("/config", headers=own)
    assert response.status_code == 200 and response.json()["components"]
    assert "access-control-allow-credentials" not in response.headers
    assert _file(app, app["home"] / "pics" / "a.png", **own).status_code == 200
    assert app["client"].post("/gradio_api/reset", headers=own, json={"event_id": "x"}).status_code == 200


# --- the login: from the environment or a file, never only the command line ------------------------------------


def _requires_login(url: str, user: str, password: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/config").status_code == 401
        assert client.get("/gradio_api/info").status_code == 401
        assert client.post("/login", data={"username": user, "password": "wrong"}).status_code == 400
        assert client.post("/login", data={"username": user, "password": password}).status_code == 200
        assert client.get("/config").status_code == 200


@pytest.fixture(scope="module")
def login_apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two apps started at once: one with ATELIER_AUTH, one with --auth-file."""
    from_env = _start(tmp_path_factory.mktemp("env"), **{AUTH_ENV: "painter:from-env-pw"})
    base = tmp_path_factory.mktemp("file")
    secret = base / "login"
    secret.write_text("painter:from-file-pw\n")
    secret.chmod(0o600)
    from_file = _start(base, "--auth-file", str(secret))
    try:
        for process, url, _ in (from_env, from_file):
            wait_for_http(url + "/", process)
        yield {"env": from_env[1], "file": from_file[1]}
    finally:
        _stop(from_env[0])
        _stop(from_file[0])


@pytest.mark.slow
def test_login_from_the_environment(login_apps):
    _requires_login(login_apps["env"], "painter", "from-env-pw")


def test_login_from_a_file(login_apps):
    _requires_login(login_apps["file"], "painter", "from-file-pw")


def _run_app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "app.py"), *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_a_login_file_others_can_read_is_refused(tmp_path):
    secret = tmp_path / "login"
    secret.write_text("painter:pw\n")
    secret.chmod(0o644)
    result = _run_app("--auth-file", str(secret))
    assert result.returncode == 2
    assert f"--auth-file {secret} can be read or changed by other users" in result.stderr
    assert "chmod 600" in result.stderr


def test_listening_wider_without_a_login_is_refused():
    result = _run_app("--host", "0.0.0.0")
    assert result.returncode == 2
    assert "--auth-file" in result.stderr and AUTH_ENV in result.stderr
