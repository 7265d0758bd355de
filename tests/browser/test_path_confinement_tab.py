"""In Chromium: Create project with a source folder outside the app's folders is refused with the one message every
path field gives (which flag allows it), and nothing is copied."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import fill, open_tab
from PIL import Image
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 30_000  # ms


@pytest.fixture
def outside_photos():
    """Pictures in a folder of /tmp outside the test's --allow-path folder (and outside home)."""
    folder = Path(tempfile.mkdtemp(prefix="atelier-outside-"))
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "a.png")
    yield folder
    shutil.rmtree(folder)


def test_create_project_refuses_a_source_outside_the_roots(app_page, work_dir, outside_photos):
    page = app_page
    project = work_dir / "project"
    open_tab(page, "Dataset")
    fill(page, "dataset-source", str(outside_photos))
    fill(page, "dataset-project", str(project))
    fill(page, "dataset-identifier", "sks")
    page.locator("#dataset-create").click()

    message = page.locator("#dataset-message")
    expect(message).to_contain_text("Nothing was copied", timeout=SLOW)
    expect(message).to_contain_text(f"Images folder: {outside_photos} is outside the folders this app may use")
    expect(message).to_contain_text(f"start the app with --allow-path {outside_photos} to allow it")
    assert not project.exists()
