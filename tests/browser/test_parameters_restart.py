"""The Parameters form and the user's presets survive a page reload and an app restart (two starts of the real app
on the same folders), clicked through in Chromium."""

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from app_helpers import free_port, wait_for_http
from conftest import REPO, fill, open_section
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
WAIT = 30_000


@contextmanager
def running_app(runs_dir: Path, presets_dir: Path) -> Iterator[str]:
    """The app on its own port with these folders, stopped at the end."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--port", str(port), "--runs-dir", str(runs_dir),
         "--presets-dir", str(presets_dir), "--allow-path", str(runs_dir.parent)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def open_parameters(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#app-header")
    page.get_by_role("tab", name="Parameters", exact=True).first.click()
    page.wait_for_selector("#validation-status")
    return page


def dim_box(page):
    return page.locator("#field-network-network_dim input[type=number]")


def test_the_form_and_my_presets_survive_a_reload_and_a_restart(browser, tmp_path):
    runs, presets = tmp_path / "runs", tmp_path / "my presets"
    runs.mkdir()
    with running_app(runs, presets) as url:
        page = open_parameters(browser, url)
        open_section(page, "Network")
        fill(page, "field-network-network_dim", "24")
        expect(page.locator("#toml-preview")).to_contain_text("network_dim = 24", timeout=WAIT)
        fill(page, "preset-title", "Rank 24")
        page.locator("#preset-save").click()
        expect(page.locator("#preset-message")).to_contain_text("Saved", timeout=WAIT)
        other = open_parameters(browser, url)  # another page sees the new preset without a restart
        other.locator("#preset-choice input").click()
        expect(other.get_by_role("option", name="my: Rank 24", exact=True)).to_be_visible(timeout=WAIT)
        other.context.close()
        page.reload()
        page.wait_for_selector("#app-header")
        page.get_by_role("tab", name="Parameters", exact=True).first.click()
        expect(page.locator("#preset-message")).to_contain_text("Restored your last form", timeout=WAIT)
        open_section(page, "Network")
        expect(dim_box(page)).to_have_value("24")
        page.context.close()
    assert (runs / ".atelier" / "form-local.json").is_file()

    with running_app(runs, presets) as url:  # a restart
        page = open_parameters(browser, url)
        expect(page.locator("#preset-message")).to_contain_text("Restored your last form", timeout=WAIT)
        open_section(page, "Network")
        expect(dim_box(page)).to_have_value("24")
        expect(page.locator("#toml-preview")).to_contain_text("network_dim = 24", timeout=WAIT)
        page.locator("#preset-choice input").click()
        expect(page.get_by_role("option", name="my: Rank 24", exact=True)).to_be_visible(timeout=WAIT)
        page.context.close()
