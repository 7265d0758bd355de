"""Dotted-path access to config dicts, shared by --set overrides, the importers and the GUI."""

import pytest

from engine.config.paths import get_path, set_path


def test_get_and_set_through_tables_and_list_items():
    data = {"dataset": {"datasets": [{"subsets": [{"image_dir": "a"}]}]}}
    assert get_path(data, ["dataset", "datasets", 0, "subsets", 0, "image_dir"]) == "a"
    assert get_path(data, "dataset.general.resolution", "missing") == "missing"
    set_path(data, ["dataset", "datasets", 0, "subsets", 0, "num_repeats"], 3)
    set_path(data, "training.seed", 7)
    assert data["dataset"]["datasets"][0]["subsets"][0]["num_repeats"] == 3
    assert data["training"] == {"seed": 7}


def test_none_removes_the_key_because_config_files_have_no_null():
    data = {"model": {"vae": "x", "clip_skip": 2}}
    set_path(data, "model.vae", None)
    assert data == {"model": {"clip_skip": 2}}


def test_a_missing_list_item_is_an_error():
    with pytest.raises(IndexError):
        set_path({"datasets": []}, ["datasets", 2, "resolution"], 512)
