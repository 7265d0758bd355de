"""The file browser component in Chromium: Browse, enter a folder, use it; pick a file; complete a typed path; and a
path outside the allowed folders is refused with a message.

The component is what is under test, so the test builds a tiny page with two path fields (a folder and a file one)
over a temporary root instead of relying on which tab of the app has a path field today.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from conftest import free_port, open_tab
from playwright.sync_api import expect

from gui.file_browser import FileRoots, path_field

pytestmark = pytest.mark.browser
WAIT = 15_000  # ms


def _tree(root: Path) -> None:
    (root / "photos" / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "notes.txt"):
        (root / "photos" / name).write_bytes(b"x")
    (root / "models").mkdir()
    (root / "models" / "model.safetensors").write_bytes(b"\0" * 2048)
    (root / "models" / "readme.md").write_text("not a model")
    (root / ".cache").mkdir()


@pytest.fixture(scope="module")
def field_page(browser, tmp_path_factory):
    base = tmp_path_factory.mktemp("file_browser")
    root, outside = base / "root", base / "outside"
    _tree(root)
    outside.mkdir()
    roots = FileRoots.from_paths([root], include_home=False)
    with gr.Blocks(analytics_enabled=False) as demo:
        path_field("Image folder", roots, kind="folder", elem_id="fb-folder")
        path_field("Model file", roots, kind="file", elem_id="fb-file", extensions=(".safetensors",))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, footer_links=[])
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    try:
        yield page, f"http://127.0.0.1:{port}/", root.resolve(), outside.resolve()
    finally:
        context.close()
        demo.close()


@pytest.fixture
def fresh(field_page):
    page, url, root, outside = field_page
    page.goto(url)
    page.wait_for_selector("#fb-folder-browse")
    return page, root, outside


def _box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _row(page, elem_id: str, name: str):
    return page.locator(f"#{elem_id}-entries").get_by_text(name, exact=True)


def test_browse_enter_a_folder_and_use_it(fresh, screenshot):
    page, root, _ = fresh
    page.locator("#fb-folder-browse").click()
    listing = page.locator("#fb-folder-listing")
    expect(listing).to_be_visible(timeout=WAIT)
    expect(page.locator("#fb-folder-folder")).to_contain_text(str(root), timeout=WAIT)
    entries = page.locator("#fb-folder-entries")
    expect(entries).to_contain_text("photos/")
    expect(entries.get_by_role("row").filter(has_text="photos/")).to_contain_text("2 images")  # not notes.txt
    expect(entries).not_to_contain_text(".cache")  # hidden by default
    expect(entries).not_to_contain_text("..")  # the root is as high as the browser goes
    _row(page, "fb-folder", "photos/").click()
    expect(page.locator("#fb-folder-folder")).to_contain_text(f"{root / 'photos'} (2 images)", timeout=WAIT)
    expect(entries).to_contain_text("sub/")
    expect(entries).not_to_contain_text("a.png")  # a folder field lists folders only
    screenshot(page, "file-browser-listing")
    page.locator("#fb-folder-use").click()
    expect(_box(page, "fb-folder")).to_have_value(str(root / "photos"), timeout=WAIT)
    expect(listing).to_be_hidden(timeout=WAIT)


def test_a_file_field_lists_only_matching_files_and_a_click_picks_one(fresh):
    page, root, _ = fresh
    page.locator("#fb-file-browse").click()
    expect(page.locator("#fb-file-entries")).to_contain_text("models/", timeout=WAIT)
    _row(page, "fb-file", "models/").click()
    entries = page.locator("#fb-file-entries")
    expect(entries).to_contain_text("model.safetensors", timeout=WAIT)
    expect(entries).to_contain_text("2.0 KB")
    expect(entries).not_to_contain_text("readme.md")
    _row(page, "fb-file", "..").click()
    expect(entries).to_contain_text("photos/", timeout=WAIT)
    _row(page, "fb-file", "models/").click()
    _row(page, "fb-file", "model.safetensors").click()
    expect(_box(page, "fb-file")).to_have_value(str(root / "models" / "model.safetensors"), timeout=WAIT)
    expect(page.locator("#fb-file-listing")).to_be_hidden(timeout=WAIT)


def test_typing_offers_completions_and_choosing_one_fills_the_box(fresh, screenshot):
    page, root, _ = fresh
    box = _box(page, "fb-folder")
    box.click()
    box.press_sequentially(f"{root}/ph", delay=20)
    suggestions = page.locator("#fb-folder-suggestions")
    expect(suggestions).to_contain_text(f"{root}/photos/", timeout=WAIT)
    expect(suggestions).not_to_contain_text("models")
    screenshot(page, "file-browser-completion")
    suggestions.get_by_text(f"{root}/photos/", exact=True).click()
    expect(box).to_have_value(f"{root}/photos/", timeout=WAIT)
    expect(suggestions).to_contain_text(f"{root}/photos/sub/", timeout=WAIT)  # the chosen folder's own entries


def test_a_path_outside_the_allowed_folders_is_refused(fresh):
    page, root, outside = fresh
    _box(page, "fb-folder").fill(str(outside))
    page.locator("#fb-folder-browse").click()
    heading = page.locator("#fb-folder-folder")
    expect(heading).to_contain_text(f"{outside} is outside the folders this app may use", timeout=WAIT)
    expect(heading).to_contain_text(str(root))  # it shows the first allowed folder instead
    expect(page.locator("#fb-folder-entries")).to_contain_text("photos/")


def test_the_apps_first_path_field_refuses_a_folder_outside_its_roots(app_page):
    """The same refusal in the real app (home folder and --allow-path roots), on the Dataset tab's first field."""
    open_tab(app_page, "Dataset")
    browse = app_page.locator("button[id$='-browse']:visible").first
    expect(browse).to_be_visible(timeout=WAIT)
    elem_id = browse.get_attribute("id").removesuffix("-browse")
    outside = Path("/etc")
    if Path.home().resolve() == Path("/"):
        pytest.skip("the home folder is / here, so every folder may be browsed")
    _box(app_page, elem_id).fill(str(outside))
    browse.click()
    heading = app_page.locator(f"#{elem_id}-folder")
    expect(heading).to_contain_text(f"{outside} is outside the folders this app may use", timeout=WAIT)
    expect(heading).to_contain_text(str(Path.home().resolve()))  # it shows the home folder instead
