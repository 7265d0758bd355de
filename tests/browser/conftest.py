"""Starts the real app on a free port and drives Debian's Chromium through Playwright."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_helpers import free_port, wait_for_http

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-output" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
# How long an `expect` waits for the page to show what it should. Playwright's 5 s is too short when the other
# test worker trains on the same two cores (a folder note once took longer in CI); a check still passes the moment
# the page shows the text, so this only lengthens a failing wait.
EXPECT_TIMEOUT_MS = 20_000


@pytest.fixture(autouse=True, scope="session")
def patient_expect() -> None:
    from playwright.sync_api import expect
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[dict]:
    # The tiny models are shared by the test workers, outside each worker's own temp folder: allow them too.
    models = Path(tiny_models["sd1"]).parent
    port = free_port()
    presets_dir = tmp_path_factory.mktemp("user_presets")
    runs_dir = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--port", str(port), "--runs-dir", str(runs_dir),
         "--presets-dir", str(presets_dir), "--allow-path", str(tmp_path_factory.getbasetemp()),
         "--allow-path", str(models)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, process)
        yield {"url": url, "presets_dir": presets_dir, "runs_dir": runs_dir}
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_tab(page, name: str) -> None:
    """Click one of the app's top-level tabs (exact name: 'Train' is also part of other labels)."""
    page.get_by_role("tab", name=name, exact=True).first.click()


def field(page, path: str):
    """A Parameters field's whole block (label, box, file browser), which hides when the family does not use it."""
    return page.locator(f"#field-{path.replace('.', '-')}")


def open_section(page, name: str) -> None:
    """A section of the Parameters tab (its tab id: the Dataset section shares its name with the Dataset tab)."""
    page.locator(f'button[role=tab][data-tab-id="section-{name.lower()}"]').click()


def open_advanced(page, section: str) -> None:
    """Open a Parameters section's Advanced accordion (left open when it already is)."""
    accordion = page.locator(f"#advanced-{section}")
    if accordion.get_by_role("button").first.get_attribute("aria-expanded") != "true":
        accordion.get_by_role("button").first.click()


def choose(page, path: str, option: str) -> None:
    """Pick `option` in a dropdown field."""
    page.locator(f"#field-{path.replace('.', '-')} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page, path: str, value: float) -> None:
    """Type a number into a number field and leave it."""
    box = page.locator(f"#field-{path.replace('.', '-')} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


@pytest.fixture(scope="module")
def sd35_medium_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny SD3.5 medium files (the SD3.5 medium preset's variant), in a folder the app may browse."""
    from sd3_tiny import tiny_sd3_files, write_tiny_sd3

    if os.environ.get("ATELIER_TINY_MODELS"):  # kept between sessions, beside the tiny SD models the app allows
        return tiny_sd3_files("5-medium")
    return write_tiny_sd3(tmp_path_factory.mktemp("sd3_5_medium"), "5-medium")


def fill(page, elem_id: str, text: str) -> None:
    """Type into a text field and leave it, as a user does (the field's blur event then runs)."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(text)
    box.press("Tab")


# Records every error toast Gradio shows (a handler that raised or returned the wrong shape). Our handlers report
# problems in the page's own text, so any such toast is a bug, even in a test that does not look for it.
RECORD_ERROR_TOASTS = """
window.__errorToasts = [];
new MutationObserver(() => {
  for (const toast of document.querySelectorAll('[data-testid="toast-body"].error')) {
    if (!toast.dataset.seen) { toast.dataset.seen = "1"; window.__errorToasts.push(toast.innerText); }
  }
}).observe(document, {childList: true, subtree: true});
"""


def error_toasts(page) -> list[str]:
    return page.evaluate("window.__errorToasts || []")


@pytest.fixture
def app_page(browser, app_server):
    """A fresh page on the shared app, on its first tab; fails the test if Gradio showed an error toast."""
    # The app keeps each user's Parameters form beside the runs (gui.form_store): each test starts from the defaults.
    (app_server["runs_dir"] / ".atelier" / "form-local.json").unlink(missing_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(RECORD_ERROR_TOASTS)
    page = context.new_page()
    page.goto(app_server["url"])
    page.wait_for_selector("#app-header")
    yield page
    toasts = error_toasts(page)
    context.close()
    assert not toasts, f"Gradio showed error toasts: {toasts}"


@pytest.fixture
def page(app_page):
    """A page on the Parameters tab."""
    open_tab(app_page, "Parameters")
    app_page.wait_for_selector("#validation-status")
    return app_page


@pytest.fixture
def work_dir(tmp_path_factory) -> Path:
    """A fresh folder inside the app's allowed paths (the file browser may show it)."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture
def screenshot():
    """Save a full-page screenshot under test-output/screenshots/ for a person to look at."""

    def take(page, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    return take
