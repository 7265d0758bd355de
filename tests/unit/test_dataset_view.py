"""The Dataset tab's view helpers: concept and proposal tables, thumbnails, and the settings handed to the doctor
and the Parameters tab (checked by running the real doctor on them)."""

from pathlib import Path

import pytest
from PIL import Image

from engine.data.images import read_image_size
from engine.data.project import ProjectError, balance_repeats, list_concepts
from gui.browse import FileRoots
from gui.doctor_view import report_for
from gui.views import dataset as view


def picture(path: Path, size=(96, 64), color=(200, 30, 30), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save)
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "proj"
    for name in ("model", "log"):
        (root / name).mkdir(parents=True)
    for index in range(4):
        picture(root / "img" / "10_sks dog" / f"{index}.png", (96 + 32 * index, 64))
    picture(root / "img" / "2_ohwx cat" / "c.jpg", (64, 128))
    return root


def test_project_path_refuses_an_empty_field():
    roots = FileRoots.from_paths()
    with pytest.raises(ProjectError, match="choose a project folder"):
        view.project_path("  ", roots)
    assert view.project_path(" ~/proj ", roots) == Path("~/proj").expanduser()


def test_concepts_table_has_one_row_per_folder_with_samples_per_epoch(project):
    concepts = list_concepts(project)
    frame = view.concepts_frame(concepts)
    assert list(frame.columns) == view.CONCEPT_COLUMNS
    assert frame.values.tolist() == [["img/10_sks dog", 4, 10, 40], ["img/2_ohwx cat", 1, 2, 2]]
    assert view.concepts_frame([]) is None
    overview = view.overview_markdown(project, concepts)
    assert "2 training concept(s)" in overview and "42 samples per epoch" in overview
    assert "not a project yet" in view.overview_markdown(project / "img" / "10_sks dog", [])


def test_balancing_proposal_shows_current_and_proposed_repeats(project):
    concepts = list_concepts(project)
    plan = balance_repeats(concepts, 20)
    frame = view.proposal_frame(concepts, plan)
    assert frame.values.tolist() == [["img/10_sks dog", 4, 10, 5, 20], ["img/2_ohwx cat", 1, 2, 20, 20]]
    assert "2 folder(s) would be renamed" in view.proposal_markdown(concepts, plan, 20)
    unchanged = {c.folder: c.repeats for c in concepts}
    assert "nothing to rename" in view.proposal_markdown(concepts, unchanged, 20)


def test_parameters_patch_points_a_run_at_the_project_folders(project):
    patch = view.parameters_patch(project, list_concepts(project))
    assert patch == {"dataset.train_data_dir": str(project / "img"), "dataset.reg_data_dir": "",
                     "saving.output_dir": str(project / "model"), "logging.logging_dir": str(project / "log")}
    picture(project / "reg" / "1_dog" / "r.png")
    assert view.parameters_patch(project, list_concepts(project))["dataset.reg_data_dir"] == str(project / "reg")


def test_doctor_overrides_check_the_project_with_the_current_settings(project, tmp_path):
    picture(project / "reg" / "1_dog" / "r.png")
    other = tmp_path / "other.toml"
    other.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'elsewhere'\n")
    general = {"resolution": 128, "min_bucket_reso": 64, "batch_size": 2}
    config = {"dataset": {"config_file": str(other), "general": general}}
    report = report_for(config, project, overrides=view.doctor_overrides(project, list_concepts(project)))
    assert report["datasets"][0]["resolution"] == [128, 128]
    assert report["totals"]["batch_size"] == 2
    assert report["totals"]["train_images"] == 5 and report["totals"]["reg_images"] == 1
    assert {Path(image["path"]).parent.name for image in report["images"]} == {"10_sks dog", "2_ohwx cat", "1_dog"}


def test_gallery_shows_upright_thumbnails_of_the_first_images_training_first(project):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    picture(project / "img" / "2_ohwx cat" / "d.jpg", (200, 100), exif=exif.tobytes())
    (project / "img" / "2_ohwx cat" / "e.png").write_bytes(b"not a png")
    picture(project / "reg" / "1_dog" / "r.png")
    items = view.gallery_items(project)
    assert [caption for _, caption in items] == ["10_sks dog/0.png", "10_sks dog/1.png", "10_sks dog/2.png",
                                                 "10_sks dog/3.png", "2_ohwx cat/c.jpg", "2_ohwx cat/d.jpg",
                                                 "1_dog/r.png"]
    assert all(max(image.size) <= view.THUMBNAIL_SIDE for image, _ in items)
    width, height = items[5][0].size
    shown = read_image_size(project / "img" / "2_ohwx cat" / "d.jpg")
    assert height > width and shown[1] > shown[0]  # the same way up as training reads it
    assert len(view.gallery_items(project, limit=3)) == 3
