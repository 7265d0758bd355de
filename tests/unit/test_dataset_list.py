"""The dataset editor's list logic (gui/dataset_list.py): rows, add / remove / reorder, edits that keep unset keys
unset, per-row checks, image counts and the export, on real folders and without a browser."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from PIL import Image

from engine.config.dataset import DatasetEntry, DatasetFile, Subset
from engine.config.describe import iter_fields
from gui.browse import FileRoots
from gui.dataset_list import (
    DATASET_FIELDS,
    SUBSET_FIELDS,
    add_dataset,
    add_subset,
    describe_rows,
    existing_key,
    export_dataset_toml,
    general_from_form,
    image_count,
    move_row,
    parse_key,
    remove_row,
    row_keys,
    row_name,
    row_problems,
    row_values,
    set_value,
    value_from_widget,
    widget_value,
)


def two_datasets() -> list[dict]:
    return [{"resolution": 768, "subsets": [{"image_dir": "/a"}, {"image_dir": "/b", "is_reg": True}]},
            {"subsets": [{"image_dir": "/c"}]}]


def spec(fields, name: str):
    return next(s for s in fields if s.name == name)


def test_keys_and_names():
    assert row_keys(two_datasets()) == ["d0", "d0s0", "d0s1", "d1", "d1s0"]
    assert parse_key("d0s1") == (0, 1) and parse_key("d2") == (2, None) and parse_key("x") is None
    assert row_name("d0s1") == "dataset 1 › subset 2"
    assert existing_key(two_datasets(), "d0s5") == "d0"
    assert existing_key(two_datasets(), None) == "d1"
    assert existing_key([], "d0") is None


def test_fields_are_generated_from_the_models():
    subset_names = {s.name for s in SUBSET_FIELDS}
    assert subset_names == set(Subset.model_fields)
    assert {s.name for s in DATASET_FIELDS} == set(DatasetEntry.model_fields) - {"subsets"}
    assert [s.name for s in SUBSET_FIELDS][:2] == ["image_dir", "is_reg"]  # what the subset is, first
    assert len(SUBSET_FIELDS) == len(iter_fields(Subset))


def test_add_dataset_and_subsets_leave_the_old_list_alone():
    old = two_datasets()
    new, key = add_dataset(old)
    assert old == two_datasets()
    assert new[2] == {"subsets": [{}]} and key == "d2s0"
    new, key = add_subset(new, "d0s1")
    assert len(new[0]["subsets"]) == 3 and key == "d0s2"
    new, key = add_subset([], None)
    assert new == [{"subsets": [{}]}] and key == "d0s0"


def test_remove_a_subset_or_a_dataset_and_select_a_neighbour():
    new, key = remove_row(two_datasets(), "d0s0")
    assert new[0]["subsets"] == [{"image_dir": "/b", "is_reg": True}] and key == "d0s0"
    new, key = remove_row(new, "d0s0")
    assert new[0]["subsets"] == [] and key == "d0"
    new, key = remove_row(two_datasets(), "d1")
    assert len(new) == 1 and key == "d0"
    new, key = remove_row(new, "d0")
    assert new == [] and key is None


def test_move_within_siblings_and_stay_at_the_ends():
    new, key = move_row(two_datasets(), "d0s1", -1)
    assert [s["image_dir"] for s in new[0]["subsets"]] == ["/b", "/a"] and key == "d0s0"
    new, key = move_row(two_datasets(), "d0s1", +1)  # last subset of its dataset: stays
    assert new == two_datasets() and key == "d0s1"
    new, key = move_row(two_datasets(), "d0", +1)
    assert new[0]["subsets"] == [{"image_dir": "/c"}] and key == "d1"


def test_an_emptied_field_is_unset_not_a_default():
    datasets = two_datasets()
    repeats = spec(SUBSET_FIELDS, "num_repeats")
    edited = set_value(datasets, "d0s0", "num_repeats", value_from_widget(repeats, "4"))
    assert edited[0]["subsets"][0] == {"image_dir": "/a", "num_repeats": 4}
    cleared = set_value(edited, "d0s0", "num_repeats", value_from_widget(repeats, ""))
    assert cleared[0]["subsets"][0] == {"image_dir": "/a"}
    resolution = spec(DATASET_FIELDS, "resolution")
    assert set_value(datasets, "d0", "resolution", value_from_widget(resolution, ""))[0] == {
        "subsets": datasets[0]["subsets"]}
    assert widget_value(resolution, None) == "" and widget_value(repeats, None) == ""


def test_yes_no_keys_have_an_inherit_choice():
    flip = spec(SUBSET_FIELDS, "flip_aug")
    assert flip.kind == "choice" and widget_value(flip, None) == ""
    assert value_from_widget(flip, "true") is True and value_from_widget(flip, "false") is False
    assert value_from_widget(flip, "") is None
    assert widget_value(flip, False) == "false"
    is_reg = spec(SUBSET_FIELDS, "is_reg")  # not inheritable: a plain checkbox
    assert is_reg.kind == "bool" and value_from_widget(is_reg, True) is True


def test_text_and_lists_convert_as_the_config_has_them():
    assert value_from_widget(spec(DATASET_FIELDS, "resolution"), "768,512") == [768, 512]
    assert value_from_widget(spec(SUBSET_FIELDS, "face_crop_aug_range"), "2,4") == [2.0, 4.0]
    assert value_from_widget(spec(SUBSET_FIELDS, "image_dir"), " /x/img \n") == "/x/img"
    assert value_from_widget(spec(SUBSET_FIELDS, "custom_attributes"), "diff_output_preservation = true") == {
        "diff_output_preservation": True}
    assert widget_value(spec(DATASET_FIELDS, "resolution"), [768, 512]) == "768,512"


def test_unreadable_text_is_kept_and_the_row_says_what_is_wrong():
    datasets = set_value(two_datasets(), "d0s0", "num_repeats",
                         value_from_widget(spec(SUBSET_FIELDS, "num_repeats"), "many"))
    assert datasets[0]["subsets"][0]["num_repeats"] == "many"
    problems = row_problems(datasets)
    assert problems["d0s0"] == ["num_repeats: expected a whole number, got the text 'many'"]
    assert problems["d0"] == problems["d0s1"] == problems["d1"] == []


def test_each_row_has_its_own_messages():
    datasets = [{"resolution": 7, "subsets": [{}, {"image_dir": "/a"}]}, {"subsets": []},
                {"subsets": [{"image_dir": "/a"}, {"metadata_file": "/m.json"}]}]
    problems = row_problems(datasets)
    assert problems["d0"] == ["resolution: each side must be between 64 and 8192 pixels"]
    assert problems["d0s0"][0].startswith("image_dir is required")
    assert problems["d0s1"] == []
    assert problems["d1"] == ["a dataset needs at least one [[datasets.subsets]] entry"]
    assert "cannot be mixed in one dataset" in problems["d2"][0]


def write_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (8, 8)).save(folder / f"{index}.png")
    (folder / "0.txt").write_text("a caption")
    return folder


def test_rows_show_sources_counts_and_totals(tmp_path: Path):
    roots = FileRoots((tmp_path,))
    first, second = write_images(tmp_path / "a", 3), write_images(tmp_path / "b", 2)
    metadata = tmp_path / "meta.json"
    metadata.write_text('{"x": {"caption": "c"}, "y": {"caption": "d"}}')
    datasets = [{"resolution": [768, 512], "batch_size": 2, "subsets": [
        {"image_dir": str(first)}, {"image_dir": str(second), "is_reg": True}]},
        {"subsets": [{"metadata_file": str(metadata)}]},
        {"subsets": [{"image_dir": str(tmp_path / "missing")}, {}]}]
    rows = {row.key: row for row in describe_rows(datasets, roots)}
    assert rows["d0"].source == "768×512 · batch 2 · 2 subsets" and rows["d0"].images == "5 images"
    assert rows["d0s0"].images == "3 images" and rows["d0s0"].source == str(first)
    assert rows["d0s1"].source == f"{second} · regularization" and rows["d0s1"].images == "2 images"
    assert rows["d1s0"].images == "2 images (metadata)"
    assert rows["d2s0"].images == "folder not found" and rows["d2"].images == ""
    assert rows["d2s1"].source == "(no folder yet)" and rows["d2s1"].problems


def test_folders_outside_the_roots_are_not_counted(tmp_path: Path):
    write_images(tmp_path / "secret", 2)
    roots = FileRoots((tmp_path / "allowed",))
    assert image_count({"image_dir": str(tmp_path / "secret")}, roots) == (None, "outside the allowed folders")


def test_row_values_are_a_row_s_own_keys():
    assert row_values(two_datasets(), "d0") == {"resolution": 768}
    assert row_values(two_datasets(), "d0s1") == {"image_dir": "/b", "is_reg": True}
    assert row_values(two_datasets(), "d9") == {}


GENERAL_SPECS = {s.path: s for s in iter_fields() if s.path.startswith("dataset.general.")}


def test_export_writes_a_new_file_that_reads_back(tmp_path: Path):
    roots = FileRoots((tmp_path,))
    images = write_images(tmp_path / "img", 2)
    datasets = [{"subsets": [{"image_dir": str(images), "num_repeats": 3}]}]
    general = general_from_form({"dataset.general.resolution": "1024", "dataset.general.flip_aug": True,
                                 "model.other": "ignored"}, GENERAL_SPECS)
    assert general == {"resolution": 1024, "flip_aug": True}
    target = tmp_path / "dataset.toml"
    message = export_dataset_toml(datasets, general, str(target), roots)
    assert message.startswith(f"Wrote `{target}`")
    parsed = DatasetFile.model_validate(tomllib.loads(target.read_text()))
    assert parsed.general.resolution == [1024, 1024] and parsed.general.flip_aug is True
    assert parsed.datasets[0].subsets[0].num_repeats == 3


def test_export_never_replaces_a_file(tmp_path: Path):
    target = tmp_path / "dataset.toml"
    target.write_text("mine")
    message = export_dataset_toml([{"subsets": [{"image_dir": "/a"}]}], {}, str(target), FileRoots((tmp_path,)))
    assert "already exists and is kept as it is; choose a new file name" in message
    assert target.read_text() == "mine"


@pytest.mark.parametrize(("target", "datasets", "says"), [
    ("", [{"subsets": [{"image_dir": "/a"}]}], "type the path of a new .toml file first"),
    ("{tmp}/out.json", [{"subsets": [{"image_dir": "/a"}]}], "does not end in .toml"),
    ("{tmp}/no/such/folder/out.toml", [{"subsets": [{"image_dir": "/a"}]}], "does not exist"),
    ("/etc/out.toml", [{"subsets": [{"image_dir": "/a"}]}], "outside the folders this app may use"),
    ("{tmp}/out.toml", [{"subsets": [{}]}], "fix the datasets first (datasets[0].subsets[0]: image_dir is required"),
    ("{tmp}/out.toml", [], "no inline datasets to export"),
])
def test_export_says_what_to_change(tmp_path: Path, target: str, datasets: list, says: str):
    message = export_dataset_toml(datasets, {}, target.format(tmp=tmp_path), FileRoots((tmp_path,)))
    assert says in message
    assert not (tmp_path / "out.toml").exists()


def test_the_editor_redraw_never_writes_the_value_and_user_edits_do():
    """The contract with the Parameters form: `.value` changes from outside redraw the editor without being written
    back (no loops); the user's edits (buttons, fields) write it; all of them run one at a time."""
    import gradio as gr

    from gui.dataset_editor import build_dataset_editor

    with gr.Blocks() as blocks:
        editor = build_dataset_editor([{"subsets": [{"image_dir": "/x"}]}], FileRoots(()))
    value = editor.value._id
    by_trigger: dict[str, list] = {}
    for dependency in blocks.fns.values():
        for block_id, event in dependency.targets:
            by_trigger.setdefault(event, []).append((block_id, dependency))
    redraws = [dep for block_id, dep in by_trigger["change"] if block_id == value]
    assert redraws and all(value not in [block._id for block in dep.outputs] for dep in redraws)
    writers = [dep for dep in blocks.fns.values() if value in [block._id for block in dep.outputs]]
    assert len(writers) == 5 + len(DATASET_FIELDS) + len(SUBSET_FIELDS)  # the five buttons, one per field
    assert {dep.concurrency_id for dep in [*redraws, *writers]} == {"dataset-editor"}
