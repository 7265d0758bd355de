"""Project folders from a flat folder of images: the kohya layout, copy-never-move, no overwrites, conversions,
failures reported by name, concepts, balancing and renaming repeats."""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config.io import validate_config
from engine.data.images import load_rgb_image
from engine.data.project import (
    ProjectError,
    add_concept,
    apply_repeats,
    balance_repeats,
    create_project,
    list_concepts,
)
from engine.data.scan import scan_config


def picture(path: Path, size=(64, 48), color=(200, 30, 30), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "photos"
    picture(folder / "a.png", (96, 64))
    picture(folder / "b.jpg", (64, 96), (20, 120, 200))
    picture(folder / "c.webp", (128, 64), (0, 200, 0))
    picture(folder / "d.bmp", (64, 64), (10, 10, 10))
    picture(folder / "e.gif", (64, 96), 3, mode="P")
    picture(folder / "f.tif", (96, 64), (90, 90, 200))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "a.txt").write_text("a photo of sks dog")
    (folder / "b.caption").write_text("sks dog on grass")
    (folder / "notes.md").write_text("not an image")
    picture(folder / "sub" / "deep.png")  # a flat import: subfolders are not searched
    return folder


def test_create_project_makes_the_kohya_layout_and_copies_without_touching_the_originals(tmp_path, source):
    before = snapshot(source)
    report = create_project(tmp_path / "proj", source=source, identifier="sks", class_name="dog", repeats=10)
    assert snapshot(source) == before
    project = tmp_path / "proj"
    assert sorted(p.name for p in project.iterdir()) == ["img", "log", "model", "reg"]
    concept = project / "img" / "10_sks dog"
    assert report.concept_dir == concept
    assert sorted(report.copied) == ["a.png", "b.jpg", "c.webp"]
    assert sorted(report.converted) == ["d.bmp", "e.gif", "f.tif"]
    assert sorted(report.captions) == ["a.txt", "b.caption"]
    assert [name for name, _ in report.failed] == ["broken.jpg"]
    assert sorted(p.name for p in concept.iterdir()) == ["a.png", "a.txt", "b.caption", "b.jpg", "c.webp",
                                                         "d.png", "e.png", "f.png"]
    for name in ("a.png", "b.jpg", "c.webp", "a.txt", "b.caption"):
        assert (concept / name).read_bytes() == (source / name).read_bytes()
    for original, converted in (("d.bmp", "d.png"), ("e.gif", "e.png"), ("f.tif", "f.png")):
        with Image.open(concept / converted) as image:
            assert image.format == "PNG"
        assert np.array_equal(np.asarray(load_rgb_image(concept / converted)),
                              np.asarray(load_rgb_image(source / original)))
    summary = report.summary()
    assert "3 copied" in summary and "3 converted to PNG" in summary and "broken.jpg" in summary


def test_the_project_reads_as_a_legacy_dataset_with_repeats_and_class_tokens(tmp_path, source):
    create_project(tmp_path / "proj", source=source, identifier="sks", class_name="dog", repeats=10)
    config = validate_config({"dataset": {"train_data_dir": str(tmp_path / "proj" / "img"), "general": {
        "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 256}}},
        check_packages=False)
    scan = scan_config(config, tmp_path)
    records = [r for d in scan.datasets for s in d.subsets for r in s.records]
    assert not [f for f in scan.findings if f.severity == "error"]
    assert len(records) == 6
    assert {r.num_repeats for r in records} == {10}
    captions = {r.path.name: r.caption for r in records}
    assert captions["a.png"] == "a photo of sks dog"
    assert captions["c.webp"] == "sks dog"  # no caption file: the class tokens from the folder name


def test_importing_again_skips_what_is_there_and_keeps_a_different_file_under_a_new_name(tmp_path, source):
    project = tmp_path / "proj"
    create_project(project, source=source, identifier="sks", class_name="dog", repeats=10)
    concept = project / "img" / "10_sks dog"
    first = snapshot(concept)
    again = create_project(project, source=source, identifier="sks", class_name="dog", repeats=10)
    assert snapshot(concept) == first
    assert sorted(again.skipped_existing) == ["a.png", "b.jpg", "c.webp", "d.bmp", "e.gif", "f.tif"]
    assert again.copied == again.converted == again.captions == []

    other = tmp_path / "other"
    picture(other / "a.png", (64, 48), (1, 2, 3))
    (other / "a.txt").write_text("another dog")
    report = add_concept(project, source=other, identifier="sks", class_name="dog", repeats=10)
    assert report.renamed_conflicts == [("a.png", "a-2.png")]
    assert (concept / "a.png").read_bytes() == (source / "a.png").read_bytes()  # the first one is untouched
    assert (concept / "a-2.png").read_bytes() == (other / "a.png").read_bytes()
    assert (concept / "a-2.txt").read_text() == "another dog"  # the caption follows its image
    assert (concept / "a.txt").read_text() == "a photo of sks dog"


def test_without_conversion_training_formats_are_copied_as_they_are_and_others_skipped(tmp_path, source):
    picture(source / "cmyk.jpg", (40, 40), (0, 100, 200, 0), mode="CMYK")
    report = create_project(tmp_path / "proj", source=source, identifier="sks", repeats=3, convert=False)
    concept = tmp_path / "proj" / "img" / "3_sks"
    assert sorted(report.not_converted) == ["e.gif", "f.tif"]
    assert report.converted == []
    for name in ("d.bmp", "cmyk.jpg"):
        assert (concept / name).read_bytes() == (source / name).read_bytes()
    assert not (concept / "e.png").exists() and not (concept / "e.gif").exists()
    assert "2 not copied because conversion is off" in report.summary()


def test_cmyk_and_16_bit_images_are_converted_to_the_pixels_training_sees(tmp_path):
    folder = tmp_path / "odd"
    picture(folder / "cmyk.jpg", (40, 40), (0, 100, 200, 0), mode="CMYK")
    gradient = np.linspace(0, 65535, 32 * 16, dtype=np.uint16).reshape(16, 32)
    folder.mkdir(exist_ok=True)
    Image.fromarray(gradient).save(folder / "deep.png")
    report = create_project(tmp_path / "proj", source=folder, identifier="x", repeats=1)
    assert sorted(report.converted) == ["cmyk.jpg", "deep.png"]
    concept = tmp_path / "proj" / "img" / "1_x"
    for original, converted in (("cmyk.jpg", "cmyk.png"), ("deep.png", "deep.png")):
        with Image.open(concept / converted) as image:
            assert image.mode == "RGB"
        assert np.array_equal(np.asarray(load_rgb_image(concept / converted)),
                              np.asarray(load_rgb_image(folder / original)))


@pytest.mark.parametrize(("change", "words"), [
    ({"project_dir": "FILE"}, ["is a file", "FILE"]),
    ({"source": "MISSING"}, ["does not exist", "MISSING"]),
    ({"source": "EMPTY"}, ["holds no images", "EMPTY"]),
    ({"identifier": "sks/dog"}, ["identifier", "'/'"]),
    ({"class_name": "dog:cat"}, ["class", "':'"]),
    ({"identifier": "", "class_name": ""}, ["give an identifier"]),
    ({"repeats": 0}, ["repeats", "at least 1"]),
])
def test_bad_requests_are_refused_with_the_path_or_value_and_nothing_is_made(tmp_path, source, change, words):
    places = {"FILE": tmp_path / "a-file", "MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty"}
    places["FILE"].write_text("x")
    places["EMPTY"].mkdir()
    (places["EMPTY"] / "readme.txt").write_text("no pictures here")
    args = {"project_dir": tmp_path / "proj", "source": source, "identifier": "sks", "class_name": "dog",
            "repeats": 10}
    args |= {key: places.get(value, value) for key, value in change.items()}
    with pytest.raises(ProjectError) as refused:
        create_project(**args)
    for word in words:
        assert str(places.get(word, word)) in str(refused.value)
    assert not (tmp_path / "proj").exists()


def test_add_concept_needs_a_project_and_refuses_a_second_folder_for_the_same_concept(tmp_path, source):
    project = tmp_path / "proj"
    with pytest.raises(ProjectError, match="create the project first"):
        add_concept(project, source=source, identifier="sks", class_name="cat", repeats=5)
    create_project(project, source=source, identifier="sks", class_name="dog", repeats=10)
    with pytest.raises(ProjectError, match="use 10 repeats"):
        add_concept(project, source=source, identifier="sks", class_name="dog", repeats=5)
    add_concept(project, source=source, identifier="", class_name="dog", repeats=1, is_reg=True)
    assert (project / "reg" / "1_dog" / "a.png").is_file()


def test_list_concepts_counts_images_per_folder_and_skips_invalid_names(tmp_path):
    project = tmp_path / "proj"
    for index in range(3):
        picture(project / "img" / "10_sks dog" / f"{index}.png")
    picture(project / "img" / "2_ohwx cat" / "x.jpg")
    picture(project / "img" / "no repeats" / "y.png")
    picture(project / "reg" / "1_dog" / "r.png")
    (project / "img" / "10_sks dog" / "0.txt").write_text("caption, not an image")
    concepts = list_concepts(project)
    assert [(c.folder.name, c.repeats, c.name, c.images, c.is_reg) for c in concepts] == [
        ("10_sks dog", 10, "sks dog", 3, False), ("2_ohwx cat", 2, "ohwx cat", 1, False),
        ("1_dog", 1, "dog", 1, True)]
    assert concepts[0].samples_per_epoch == 30


def test_balance_repeats_gives_about_the_target_per_training_concept(tmp_path):
    project = tmp_path / "proj"
    for name, count in (("10_a", 3), ("10_b", 7), ("1_c", 40), ("1_d", 250)):
        for index in range(count):
            picture(project / "img" / name / f"{index}.png", (8, 8))
    (project / "img" / "4_empty").mkdir()
    picture(project / "reg" / "1_dog" / "r.png", (8, 8))
    concepts = list_concepts(project)
    plan = balance_repeats(concepts, 100)
    images = {c.folder: c.images for c in concepts}
    assert set(plan) == {c.folder for c in concepts if not c.is_reg and c.images}  # reg and empty left alone
    for folder, repeats in plan.items():
        assert repeats == max(1, math.floor(100 / images[folder] + 0.5))
        if repeats > 1:  # the nearest whole number: no other repeat count lands closer to the target
            assert abs(repeats * images[folder] - 100) <= images[folder] / 2
    assert plan[project / "img" / "1_d"] == 1
    with pytest.raises(ProjectError, match="at least 1"):
        balance_repeats(concepts, 0)


def test_apply_repeats_renames_folders_and_refuses_before_renaming_anything(tmp_path):
    project = tmp_path / "proj"
    picture(project / "img" / "10_sks dog" / "a.png")
    picture(project / "img" / "3_cat" / "b.png")
    picture(project / "img" / "3_fox" / "c.png")
    (project / "img" / "5_fox").mkdir()  # an empty leftover with the name a rename would need
    before = snapshot(project)
    with pytest.raises(ProjectError, match="5_fox"):
        apply_repeats(project, {project / "img" / "10_sks dog": 5, project / "img" / "3_fox": 5})
    assert snapshot(project) == before and (project / "img" / "10_sks dog").is_dir()
    with pytest.raises(ProjectError, match="not a concept folder"):
        apply_repeats(project, {tmp_path: 2})
    renames = apply_repeats(project, {str(project / "img" / "10_sks dog"): 5, project / "img" / "3_cat": 3})
    assert [(old.name, new.name) for old, new in renames] == [("10_sks dog", "5_sks dog")]
    assert (project / "img" / "5_sks dog" / "a.png").is_file() and not (project / "img" / "10_sks dog").exists()
