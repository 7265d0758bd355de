"""The file browser component in Chromium: Browse opens on the allowed folders, enter a folder, go up, use it; pick a
file; complete a typed path; the listing follows what is typed; and a path outside the allowed folders is refused
with a message. In the app, the base model and data folder fields of every tab have Browse.

The component is what is under test, so the test builds a tiny page with two path fields (a folder and a file one)
over a temporary root instead of relying on which tab of the app has a path field today.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from conftest import free_port, open_section, open_tab
from playwright.sync_api import expect

from gui.file_browser import FileRoots, browse_button, path_field

pytestmark = [pytest.mark.browser, pytest.mark.slow]
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
    root, outside, second = base / "root", base / "outside", base / "second"
    _tree(root)
    outside.mkdir()
    (second / "more").mkdir(parents=True)
    roots = FileRoots.from_paths([root, second], include_home=False)
    with gr.Blocks(analytics_enabled=False) as demo:
        path_field("Image folder", roots, kind="folder", elem_id="fb-folder")
        path_field("Model file", roots, kind="file", elem_id="fb-file", extensions=(".safetensors",))
        model = gr.Dropdown(["(a listed model)"], value="(a listed model)", allow_custom_value=True, label="Model",
                            elem_id="fb-model")
        browse_button(model, roots, kind="folder", elem_id="fb-model")
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


def _open_root(page, elem_id: str, root: Path) -> None:
    """Browse with an empty box opens on the allowed folders; choose `root` there."""
    page.locator(f"#{elem_id}-browse").click()
    expect(page.locator(f"#{elem_id}-folder")).to_contain_text("Allowed folders", timeout=WAIT)
    _row(page, elem_id, f"{root}/").click()
    expect(page.locator(f"#{elem_id}-folder")).to_contain_text(f"Folder: {root}", timeout=WAIT)


def test_browse_opens_on_the_allowed_folders_and_goes_up_to_them(fresh, screenshot):
    page, root, _ = fresh
    second = root.parent / "second"
    page.locator("#fb-folder-browse").click()
    heading, entries = page.locator("#fb-folder-folder"), page.locator("#fb-folder-entries")
    expect(heading).to_contain_text("Allowed folders", timeout=WAIT)
    expect(entries).to_contain_text(f"{root}/")
    expect(entries).to_contain_text(f"{second}/")
    screenshot(page, "file-browser-roots")
    _row(page, "fb-folder", f"{second}/").click()
    expect(heading).to_contain_text(f"Folder: {second}", timeout=WAIT)
    expect(entries).to_contain_text("more/")
    _row(page, "fb-folder", "..").click()  # above an allowed folder: the list of them
    expect(heading).to_contain_text("Allowed folders", timeout=WAIT)
    expect(entries).to_contain_text(f"{root}/")


def test_an_empty_folder_says_how_to_go_on(fresh):
    page, root, _ = fresh
    (root / "photos" / "sub").mkdir(exist_ok=True)
    _box(page, "fb-folder").fill(str(root / "photos" / "sub"))
    page.locator("#fb-folder-browse").click()
    heading = page.locator("#fb-folder-folder")
    expect(heading).to_contain_text("No folders here.", timeout=WAIT)
    expect(heading).to_contain_text("Choose '..' to go up or to the other allowed folders")
    expect(page.locator("#fb-folder-entries")).to_contain_text("up one folder")


def test_the_listing_follows_what_is_typed(fresh):
    page, root, _ = fresh
    _open_root(page, "fb-folder", root)
    box, heading = _box(page, "fb-folder"), page.locator("#fb-folder-folder")
    box.fill("")
    box.press_sequentially(f"{root}/photos/", delay=10)
    expect(heading).to_contain_text(f"Folder: {root / 'photos'}", timeout=WAIT)
    expect(page.locator("#fb-folder-entries")).to_contain_text("sub/")
    box.fill("")
    box.press_sequentially(f"{root}/mo", delay=10)  # a name being typed: its folder is shown
    expect(heading).to_contain_text(f"Folder: {root} ", timeout=WAIT)
    expect(page.locator("#fb-folder-entries")).to_contain_text("models/")


def test_browse_fills_a_dropdown_that_takes_a_typed_folder(fresh):
    page, root, _ = fresh
    _open_root(page, "fb-model", root)
    _row(page, "fb-model", "models/").click()
    expect(page.locator("#fb-model-folder")).to_contain_text(f"Folder: {root / 'models'}", timeout=WAIT)
    page.locator("#fb-model-use").click()
    expect(page.locator("#fb-model input")).to_have_value(str(root / "models"), timeout=WAIT)
    expect(page.locator("#fb-model-listing")).to_be_hidden(timeout=WAIT)


def test_browse_enter_a_folder_and_use_it(fresh, screenshot):
    page, root, _ = fresh
    _open_root(page, "fb-folder", root)
    listing = page.locator("#fb-folder-listing")
    expect(listing).to_be_visible(timeout=WAIT)
    entries = page.locator("#fb-folder-entries")
    expect(entries).to_contain_text("photos/")
    expect(entries.get_by_role("row").filter(has_text="photos/")).to_contain_text("2 images")  # not notes.txt
    expect(entries).not_to_contain_text(".cache")  # hidden by default
    expect(entries.get_by_role("row").filter(has_text="..")).to_contain_text("allowed folders")  # up: the roots
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
    _open_root(page, "fb-file", root)
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
    expect(heading).to_contain_text("Allowed folders")  # it shows the allowed folders instead
    expect(page.locator("#fb-folder-entries")).to_contain_text(f"{root}/")


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
    expect(app_page.locator(f"#{elem_id}-entries")).to_contain_text(f"{Path.home().resolve()}/")  # home among them


# Base model and data folder fields per tab (their elem_ids); each must have its Browse button.
BROWSE_FIELDS = {
    "Dataset": (None, ["dataset-source", "dataset-project"]),
    "Captioning": (None, ["captioning-folder", "captioning-model"]),
    "Regularization": (None, ["reg-parent", "reg-folder", "reg-train-dir", "reg-model"]),
    "Tools": ("Merge", ["tools-merge-model"]),
    "Parameters": ("Dataset", ["field-model-pretrained_model_name_or_path", "field-dataset-train_data_dir",
                               "field-dataset-reg_data_dir"]),
}


def test_every_tabs_base_model_and_data_folder_fields_have_browse(app_page, app_server):
    for tab, (inner, elem_ids) in BROWSE_FIELDS.items():
        open_tab(app_page, tab)
        if tab == "Parameters":
            app_page.wait_for_selector("#validation-status")
            expect(app_page.locator(f"#{elem_ids[0]}-browse")).to_be_visible(timeout=WAIT)
            open_section(app_page, inner)
        elif inner is not None:
            app_page.get_by_role("tab", name=inner, exact=True).click()
        for elem_id in elem_ids:
            expect(app_page.locator(f"#{elem_id}-browse")).to_have_count(1, timeout=WAIT)
    # The Captioning model (a dropdown that also takes a local folder) opens on the app's allowed folders.
    open_tab(app_page, "Captioning")
    app_page.locator("#captioning-model-browse").click()
    expect(app_page.locator("#captioning-model-folder")).to_contain_text("Allowed folders", timeout=WAIT)
    entries = app_page.locator("#captioning-model-entries")
    expect(entries).to_contain_text(f"{Path.home().resolve()}/")
    expect(entries).to_contain_text(f"{Path(app_server['runs_dir']).resolve()}/")
