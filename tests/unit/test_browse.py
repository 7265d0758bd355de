"""The file browser's listing and completion on real folders: only the allowed roots are shown (symlinks included),
hidden entries and filters behave, and listings are capped."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gui.browse import (
    IMAGE_COUNT_CAP,
    BrowseError,
    FileRoots,
    browse_target,
    complete,
    count_images,
    entry_detail,
    followed_folder,
    format_size,
    list_folder,
    root_entries,
    start_folder,
)


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/ (the only allowed folder) with folders, files and a hidden entry; outside/ next to it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in ("Beta", "alpha", "alpha/inner", ".hidden_dir", "gamma"):
        (root / folder).mkdir(parents=True)
    for name, size in (("b.PNG", 10), ("a.jpg", 20), ("notes.txt", 5), ("model.safetensors", 3000),
                       (".hidden.png", 1)):
        (root / name).write_bytes(b"x" * size)
    for name in ("one.png", "two.webp", "caption.txt"):
        (root / "alpha" / name).write_bytes(b"x")
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    return {"root": root.resolve(), "outside": outside.resolve(),
            "roots": FileRoots.from_paths([root], include_home=False)}


def names(listing) -> list[str]:
    return [entry.name for entry in listing.entries]


def test_roots_allow_their_contents_only(tree):
    roots, root = tree["roots"], tree["root"]
    assert roots.allows(root) and roots.allows(root / "alpha" / "inner") and roots.allows(root / "not-yet")
    assert not roots.allows(tree["outside"])
    assert not roots.allows(root.parent / "root2")  # a sibling sharing the name's start is not inside
    assert not roots.allows(root / ".." / "outside")


def test_file_kind_lists_folders_first_then_files_by_name(tree):
    listing = list_folder(tree["root"], tree["roots"], kind="file")
    assert names(listing) == ["alpha", "Beta", "gamma", "a.jpg", "b.PNG", "model.safetensors", "notes.txt"]
    assert [entry.is_dir for entry in listing.entries] == [True] * 3 + [False] * 4
    sizes = {entry.name: entry.size for entry in listing.entries if not entry.is_dir}
    assert sizes == {name: (tree["root"] / name).stat().st_size for name in sizes}
    assert listing.folder == tree["root"] and listing.more == 0


def test_folder_kind_lists_only_folders_with_their_image_counts(tree):
    listing = list_folder(tree["root"], tree["roots"], kind="folder")
    assert names(listing) == ["alpha", "Beta", "gamma"]
    alpha = listing.entries[0]
    assert alpha.images == 2 and not alpha.images_partial  # one.png, two.webp; not caption.txt nor inner/
    assert entry_detail(alpha) == "2 images"


def test_extensions_filter_files_but_keep_folders(tree):
    for extensions in ((".png", ".jpg"), ("PNG", "JPG")):
        listing = list_folder(tree["root"], tree["roots"], kind="file", extensions=extensions)
        assert names(listing) == ["alpha", "Beta", "gamma", "a.jpg", "b.PNG"]


def test_hidden_entries_show_only_when_asked(tree):
    shown = names(list_folder(tree["root"], tree["roots"], kind="file", show_hidden=True))
    assert ".hidden_dir" in shown and ".hidden.png" in shown
    assert not any(name.startswith(".") for name in names(list_folder(tree["root"], tree["roots"], kind="file")))


def test_a_listing_is_capped_and_says_how_many_more(tree):
    listing = list_folder(tree["root"], tree["roots"], kind="file", limit=4)
    assert names(listing) == ["alpha", "Beta", "gamma", "a.jpg"]
    assert listing.more == 3


def test_up_stops_at_the_root(tree):
    assert list_folder(tree["root"], tree["roots"], kind="folder").parent is None
    assert list_folder(tree["root"] / "alpha" / "inner", tree["roots"], kind="folder").parent == tree["root"] / "alpha"


@pytest.mark.parametrize(("path", "message"), [
    ("outside", "is outside the folders this app may use (your home folder, the runs folder and --allow-path "
                "folders); start the app with --allow-path"),
    ("root/../outside", "is outside the folders this app may use"),
    ("root/missing", "does not exist"),
    ("root/notes.txt", "is a file, not a folder"),
])
def test_folders_that_cannot_be_listed_say_why(tree, path, message):
    target = tree["root"].parent / path
    with pytest.raises(BrowseError, match=re.escape(message)) as raised:
        list_folder(str(target), tree["roots"], kind="file")
    assert os.path.normpath(target) in str(raised.value)  # the message names the path


def test_a_relative_path_is_refused():
    with pytest.raises(BrowseError, match="not a full path"):
        list_folder("some/folder", FileRoots.from_paths([], include_home=True), kind="folder")


def test_a_symlink_leading_out_of_the_roots_is_refused_and_not_listed(tree):
    root = tree["root"]
    (root / "escape").symlink_to(tree["outside"], target_is_directory=True)
    (root / "escape.png").symlink_to(tree["outside"] / "secret.png")
    (root / "shortcut").symlink_to(root / "alpha", target_is_directory=True)
    with pytest.raises(BrowseError, match="is outside the folders"):
        list_folder(root / "escape", tree["roots"], kind="file")
    listed = names(list_folder(root, tree["roots"], kind="file"))
    assert "escape" not in listed and "escape.png" not in listed
    assert "shortcut" in listed  # a link that stays inside the roots is fine
    assert not any("escape" in path for path in complete(f"{root}/es", tree["roots"], kind="file"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads every folder")
def test_an_unreadable_folder_says_so(tree):
    locked = tree["root"] / "gamma"
    locked.chmod(0)
    try:
        with pytest.raises(BrowseError, match="permission denied"):
            list_folder(locked, tree["roots"], kind="folder")
    finally:
        locked.chmod(0o755)


def test_completion_offers_matching_entries_folders_with_a_slash(tree):
    root, roots = tree["root"], tree["roots"]
    assert complete(f"{root}/a", roots, kind="file") == [f"{root}/alpha/", f"{root}/a.jpg"]
    assert complete(f"{root}/a", roots, kind="folder") == [f"{root}/alpha/"]
    assert complete(f"{root}/B", roots, kind="file") == [f"{root}/Beta/", f"{root}/b.PNG"]  # any letter case
    assert complete(f"{root}/alpha/", roots, kind="folder") == [f"{root}/alpha/inner/"]
    assert complete(f"{root}/m", roots, kind="file", extensions=(".ckpt",)) == []
    assert complete(f"{root}/", roots, kind="file", limit=2) == [f"{root}/alpha/", f"{root}/Beta/"]


def test_completion_offers_hidden_entries_once_a_dot_is_typed(tree):
    root, roots = tree["root"], tree["roots"]
    assert not any("/." in path for path in complete(f"{root}/", roots, kind="file"))
    assert complete(f"{root}/.h", roots, kind="file") == [f"{root}/.hidden_dir/", f"{root}/.hidden.png"]


def test_completion_outside_the_roots_offers_only_the_roots(tree):
    root, roots = tree["root"], tree["roots"]
    assert complete("", roots, kind="folder") == [f"{root}/"]
    assert complete("/", roots, kind="folder") == [f"{root}/"]
    assert complete(str(root)[:-2], roots, kind="folder") == [f"{root}/"]
    assert complete(f"{tree['outside']}/s", roots, kind="file") == []
    assert complete("relative/pa", roots, kind="file") == []


def test_completion_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "datasets").mkdir()
    roots = FileRoots.from_paths()
    assert complete("~/da", roots, kind="folder") == [f"{tmp_path.resolve()}/datasets/"]


def test_browse_starts_at_the_typed_folder_or_the_nearest_one_that_exists(tree):
    root, roots = tree["root"], tree["roots"]
    assert start_folder("", roots) == (root, None)
    assert start_folder(str(root / "alpha"), roots) == (root / "alpha", None)
    assert start_folder(str(root / "notes.txt"), roots) == (root, None)
    folder, note = start_folder(str(root / "alpha" / "new" / "deeper"), roots)
    assert folder == root / "alpha" and "does not exist" in note
    folder, note = start_folder(str(tree["outside"]), roots)
    assert folder == root and "is outside the folders this app may use" in note
    with pytest.raises(BrowseError, match="--allow-path"):
        start_folder("", FileRoots(()))


def test_image_counts_stop_early_in_huge_folders(tmp_path):
    for index in range(IMAGE_COUNT_CAP + 5):
        (tmp_path / f"{index}.png").touch()
    assert count_images(tmp_path) == (IMAGE_COUNT_CAP, True)
    assert count_images(tmp_path, cap=IMAGE_COUNT_CAP + 10) == (IMAGE_COUNT_CAP + 5, False)
    assert count_images(tmp_path / "missing") is None


@pytest.mark.parametrize(("size", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KB"),
                                             (5 * 1024**2, "5.0 MB"), (3 * 1024**4, "3.0 TB"), (None, "")])
def test_sizes_read_like_a_person_writes_them(size, text):
    assert format_size(size) == text


def test_an_unknown_kind_is_a_programming_error(tree):
    with pytest.raises(ValueError, match="kind"):
        list_folder(tree["root"], tree["roots"], kind="files")


def test_the_top_listing_is_the_allowed_folders_with_their_image_counts(tree):
    roots = FileRoots.from_paths([tree["root"], tree["root"] / "alpha"], include_home=False)
    entries = root_entries(roots, kind="folder")
    assert [entry.path for entry in entries] == [tree["root"], tree["root"] / "alpha"]
    assert [entry.images for entry in entries] == [3, 2]  # root: b.PNG, a.jpg and .hidden.png
    assert all(entry.is_dir and entry.name == str(entry.path) for entry in entries)
    assert [entry.images for entry in root_entries(roots, kind="file")] == [None, None]


def test_browse_opens_on_the_allowed_folders_for_an_empty_box_or_a_refused_path(tree):
    root, roots = tree["root"], tree["roots"]
    assert browse_target("", roots) == (None, None)
    folder, note = browse_target(str(tree["outside"]), roots)
    assert folder is None and "is outside the folders this app may use" in note
    folder, note = browse_target("relative/path", roots)
    assert folder is None and "not a full path" in note
    assert browse_target(str(root / "alpha"), roots) == (root / "alpha", None)
    folder, note = browse_target(str(root / "alpha" / "new"), roots)
    assert folder == root / "alpha" and "does not exist" in note


def test_the_listing_follows_the_folder_being_typed(tree):
    root, roots = tree["root"], tree["roots"]
    assert followed_folder(f"{root}/alpha", roots) == root / "alpha"
    assert followed_folder(f"{root}/alpha/", roots) == root / "alpha"
    assert followed_folder(f"{root}/alp", roots) == root  # a name being typed: the folder it is typed into
    assert followed_folder(f"{root}/alpha/inner/x", roots) == root / "alpha" / "inner"
    assert followed_folder(f"{tree['outside']}/s", roots) is None
    assert followed_folder("/", roots) is None
    assert followed_folder("relative", roots) is None
