"""Folder captioning and batch caption edits: write modes, prefixes, dry runs, unreadable images, only-if-changed.

The captioner here is a small deterministic stand-in for a model (its tags follow the image's colour), so the
folder logic is tested on its own; tests/test_caption_cli.py runs the real tiny models end to end.
"""

import os
from pathlib import Path

from PIL import Image

from engine.caption.base import CaptionOutput
from engine.caption.edit import EditOptions, edit_caption, edit_folder
from engine.caption.runner import FolderOptions, compose, run_captioning


class ColourTagger:
    name = "colour"
    separator = ", "

    def __init__(self):
        self.seen_modes = []

    def caption(self, images):
        outputs = []
        for image in images:
            self.seen_modes.append(image.mode)
            red, green, blue = image.convert("RGB").getpixel((0, 0))
            tags = ["red" if red > 128 else "dark", "square" if image.width == image.height else "wide"]
            outputs.append(CaptionOutput(", ".join(tags), tags))
        return outputs

    def describe_device(self):
        return "CPU"


def make_folder(root: Path) -> Path:
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (96, 64), (0, 0, 0)).save(folder / "b.jpg")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(folder / "c.PNG")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "sub" / "d.webp")
    (folder / "a.txt").write_text("sks girl, red\n")
    (folder / "broken.png").write_text("not an image")
    return folder


def test_skip_mode_leaves_existing_captions_alone_and_reports_unreadable_images(tmp_path):
    folder = make_folder(tmp_path)
    before = os.stat(folder / "a.txt").st_mtime_ns
    summary = run_captioning(folder, ColourTagger(), FolderOptions())
    assert [p.name for p in summary.skipped] == ["a.png"]
    assert sorted(p.name for p in summary.written) == ["b.jpg", "c.PNG"]
    assert [p.name for p, _ in summary.failed] == ["broken.png"]
    assert (folder / "b.txt").read_text() == "dark, wide\n"
    assert os.stat(folder / "a.txt").st_mtime_ns == before
    assert not (folder / "sub" / "d.txt").exists()  # not recursive
    assert summary.tag_counts["wide"] == 1


def test_the_captioner_gets_the_image_with_its_alpha_channel(tmp_path):
    tagger = ColourTagger()
    run_captioning(make_folder(tmp_path), tagger, FolderOptions(mode="overwrite"))
    assert "RGBA" in tagger.seen_modes


def test_overwrite_with_prefix_suffix_recursive_and_another_extension(tmp_path):
    folder = make_folder(tmp_path)
    options = FolderOptions(mode="overwrite", prefix="sks", suffix="masterpiece", recursive=True,
                            caption_extension=".caption", batch_size=2)
    summary = run_captioning(folder, ColourTagger(), options)
    assert (folder / "a.caption").read_text() == "sks, red, square, masterpiece\n"
    assert (folder / "sub" / "d.caption").read_text() == "sks, red, square, masterpiece\n"
    assert (folder / "a.txt").read_text() == "sks girl, red\n"  # another extension is not touched
    assert len(summary.written) == 4


def test_append_merges_tags_without_duplicates(tmp_path):
    folder = make_folder(tmp_path)
    run_captioning(folder, ColourTagger(), FolderOptions(mode="append"))
    assert (folder / "a.txt").read_text() == "sks girl, red, square\n"
    again = run_captioning(folder, ColourTagger(), FolderOptions(mode="append"))
    assert [p.name for p in again.unchanged] == ["a.png", "b.jpg", "c.PNG"] and not again.written


def test_dry_run_plans_but_writes_nothing(tmp_path):
    folder = make_folder(tmp_path)
    summary = run_captioning(folder, ColourTagger(), FolderOptions(mode="overwrite", dry_run=True))
    assert summary.planned[folder / "b.jpg"] == "dark, wide"
    assert not (folder / "b.txt").exists() and not summary.written
    assert summary.line(dry_run=True).startswith("would write: 3")


def test_compose_for_a_sentence_captioner():
    output = CaptionOutput("a photo of a dog")
    assert compose(output, None, FolderOptions(prefix="sks")) == "sks, a photo of a dog"
    assert compose(output, "old text", FolderOptions(mode="append")) == "old text, a photo of a dog"


def test_edit_caption_rules():
    options = EditOptions(add_tags=("solo",), remove_tags=("Blurry",), replace=(("1girl", "1woman"),),
                          prefix="sks", dedupe=True)
    assert edit_caption("1girl, blurry, red, red\n", options) == "sks, 1woman, red, solo"
    assert edit_caption("sks, 1woman, red, solo", options) == "sks, 1woman, red, solo"
    assert edit_caption("a long sentence, untouched", EditOptions()) == "a long sentence, untouched"
    assert edit_caption("x, y", EditOptions(suffix="y")) == "x, y"


def test_edit_folder_writes_only_changed_files(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "b.txt").write_text("dark, wide\n")
    (folder / "c.txt").write_bytes(b"caf\xe9")
    untouched = os.stat(folder / "b.txt").st_mtime_ns
    dry = edit_folder(folder, EditOptions(remove_tags=("red",)), dry_run=True)
    assert list(dry.changed) == [folder / "a.txt"] and (folder / "a.txt").read_text() == "sks girl, red\n"
    summary = edit_folder(folder, EditOptions(remove_tags=("red",)))
    assert (folder / "a.txt").read_text() == "sks girl\n"
    assert summary.unchanged == [folder / "b.txt"] and os.stat(folder / "b.txt").st_mtime_ns == untouched
    assert [p.name for p, _ in summary.failed] == ["c.txt"]


class PreprocessingTagger(ColourTagger):
    """Offers a separate preprocessing step, as WD14 does."""

    def __init__(self):
        super().__init__()
        self.preprocess_threads = set()

    def preprocess(self, image):
        import threading

        self.preprocess_threads.add(threading.current_thread().name)
        return image.convert("RGB")

    def caption_preprocessed(self, items):
        return self.caption(items)


def test_preprocessing_runs_in_the_worker_threads(tmp_path):
    import threading

    tagger = PreprocessingTagger()
    summary = run_captioning(make_folder(tmp_path), tagger, FolderOptions(mode="overwrite", workers=2))
    assert len(summary.written) == 3
    assert tagger.preprocess_threads and threading.main_thread().name not in tagger.preprocess_threads
    assert set(tagger.seen_modes) == {"RGB"}  # the model side got the preprocessed items


# --- every format Create project accepts; progress that ends at n/n; captions into fine-tune metadata -------------
def test_gif_and_other_create_project_formats_are_captioned(tmp_path):
    folder = make_folder(tmp_path)
    frames = [Image.new("P", (64, 64), 1), Image.new("P", (64, 64), 2)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "scan.tif")
    summary = run_captioning(folder, ColourTagger(), FolderOptions())
    assert {p.name for p in summary.written} == {"anim.gif", "b.jpg", "c.PNG", "scan.tif"}
    assert (folder / "anim.txt").is_file() and (folder / "scan.txt").read_text() == "red, square\n"


def test_progress_counts_skipped_and_failed_images_and_ends_at_the_total(tmp_path):
    from engine.caption.runner import find_images
    from engine.events import EventWriter, Progress
    from engine.rundir.event_reader import read_events

    folder = make_folder(tmp_path)
    (folder / "zzz-broken.jpg").write_text("the last file is broken too")
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as events:
        progress = Progress("caption", len(find_images(folder, False)), events)
        run_captioning(folder, ColourTagger(), FolderOptions(batch_size=2), progress)
    last = [event for event in read_events(path) if event["type"] == "progress"][-1]
    assert last["done"] == last["total"] == 5  # a (skipped), b, c, broken, zzz-broken (failed)


def test_captions_go_into_a_new_metadata_file_merged_with_the_input(tmp_path):
    import json

    import pytest

    from engine.caption.metadata_out import MetadataStore
    from engine.data.finetune_metadata import MetadataWriteError

    folder = make_folder(tmp_path)
    given = tmp_path / "given.json"
    given.write_text(json.dumps({"a": {"caption": "a photo", "tags": "sks girl"}, "gone": {"caption": "kept"}}))
    store = MetadataStore(folder, tmp_path / "out.json", "tags", in_json=given)
    summary = run_captioning(folder, ColourTagger(), FolderOptions(mode="skip"), store=store)
    assert [p.name for p in summary.skipped] == ["a.png"] and not (folder / "b.txt").exists()
    store.save()
    assert json.loads((tmp_path / "out.json").read_text()) == {
        "a": {"caption": "a photo", "tags": "sks girl"}, "gone": {"caption": "kept"},
        "b": {"tags": "dark, wide"}, "c": {"tags": "red, square"}}
    appended = MetadataStore(folder, tmp_path / "appended.json", "tags", in_json=tmp_path / "out.json")
    run_captioning(folder, ColourTagger(), FolderOptions(mode="append", prefix="sks"), store=appended)
    assert appended.metadata["a"]["tags"] == "sks girl, sks, red, square"
    with pytest.raises(MetadataWriteError, match="never overwritten"):
        MetadataStore(folder, given, "caption")
