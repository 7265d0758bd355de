"""The Captioning tab's logic without a browser: option widgets mirror the captioners' options dataclasses, what the
page sends parses back through the engine's own parser into the same options, and the editor, tag table and batch
edits read and write the caption files as a user expects."""

from __future__ import annotations

import dataclasses
import os

import pytest
from PIL import Image

from engine.caption.edit import edit_folder
from engine.caption.registry import captioner_entry
from engine.cli import build_parser
from engine.cli.caption_cmd import _captioner_values
from gui.file_browser import FileRoots
from gui.jobs import JobUpdate
from gui.views import captioning as view
from gui.views.captioning import CaptionRequest, CaptionViewError, EditorState


def engine_options(request: CaptionRequest):
    """What `python -m engine caption` would build from the request's arguments (its parser, its conversion)."""
    args = build_parser().parse_args(request.args())
    return args, captioner_entry(args.captioner).options_type(**_captioner_values(args, args.captioner))


@pytest.mark.parametrize("name", view.CAPTIONER_NAMES)
def test_option_widgets_mirror_the_options_dataclass(name):
    fields = dataclasses.fields(captioner_entry(name).options_type)
    specs = view.option_specs(name)
    assert [(spec.name, spec.default) for spec in specs] == [(field.name, field.default) for field in fields]
    assert view.option_flags(name, {spec.name: spec.widget_default for spec in specs}) == []
    choices = view.model_choices(name)
    assert choices[0] == captioner_entry(name).default_model and len(choices) == len(set(choices)) > 1


def test_wd14_field_kinds_pick_their_widgets():
    kinds = {spec.name: spec.kind for spec in view.option_specs("wd14")}
    assert kinds["general_threshold"] == "float" and kinds["use_rating_tags"] == "bool"
    assert kinds["undesired_tags"] == "list" and kinds["tag_replacements"] == "pairs" and kinds["batch_size"] == "int"


def test_wd14_request_parses_back_into_the_same_options(tmp_path):
    request = CaptionRequest(
        folder=tmp_path, captioner="wd14", model="/models/wd14", mode="append", prefix="sks", extension="caption",
        recursive=True, workers=1.0,
        options={"general_threshold": 0.2, "use_rating_tags": True, "undesired_tags": "a, b",
                 "tag_replacements": "x,y; z,", "caption_separator": "; ", "batch_size": 4.0})
    args, options = engine_options(request)
    assert options == dataclasses.replace(captioner_entry("wd14").options_type(), general_threshold=0.2,
                                          use_rating_tags=True, undesired_tags=("a", "b"),
                                          tag_replacements=(("x", "y"), ("z", "")), caption_separator="; ",
                                          batch_size=4)
    assert (args.folder, args.model, args.mode, args.prefix, args.caption_extension, args.recursive, args.workers) \
        == (tmp_path, "/models/wd14", "append", "sks", ".caption", True, 1)


def test_blip_and_git_options_parse_back_including_switches_and_dashes(tmp_path):
    _, blip = engine_options(CaptionRequest(tmp_path, "blip", options={"max_length": 12.0, "beam_search": True,
                                                                       "prompt": "-a photo of"}))
    assert blip == dataclasses.replace(captioner_entry("blip").options_type(), max_length=12, beam_search=True,
                                       prompt="-a photo of")
    args, git = engine_options(CaptionRequest(tmp_path, "git", options={"remove_words": False}))
    assert git == dataclasses.replace(captioner_entry("git").options_type(), remove_words=False)
    assert args.model is None and args.mode == "skip"  # the captioner's default model, existing captions kept


def test_number_fields_must_hold_numbers(tmp_path):
    with pytest.raises(CaptionViewError, match="Max length: enter a number"):
        view.option_flags("blip", {"max_length": None})
    with pytest.raises(CaptionViewError, match="Num beams: enter a whole number"):
        view.option_flags("blip", {"num_beams": 2.5})
    with pytest.raises(CaptionViewError, match="Captioner"):
        CaptionRequest(tmp_path, "clip").args()


def test_caption_extension_and_folder_checks(tmp_path):
    assert view.caption_extension("txt") == ".txt" and view.caption_extension(" ") == ".txt"
    with pytest.raises(CaptionViewError, match="not a caption file extension"):
        view.caption_extension("../x")
    roots = FileRoots.from_paths([tmp_path / "allowed"], include_home=False)
    (tmp_path / "allowed" / "img").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    assert view.resolve_folder(str(tmp_path / "allowed" / "img"), roots) == (tmp_path / "allowed" / "img").resolve()
    with pytest.raises(CaptionViewError, match="choose the folder"):
        view.resolve_folder("", roots)
    with pytest.raises(CaptionViewError, match="is not a folder"):
        view.resolve_folder(str(tmp_path / "allowed" / "missing"), roots)
    with pytest.raises(CaptionViewError, match="--allow-path"):
        view.resolve_folder(str(tmp_path / "elsewhere"), roots)


def test_summary_counts_failures_and_tags_as_code(tmp_path):
    events = [{"type": "warning", "message": "cannot be opened as an image", "where": "/x/broken.jpg"},
              {"type": "done", "written": 2, "skipped": 1, "failed": 1, "top_tags": [["^_^", 2], ["solo", 1]]}]
    text = view.summary_markdown(JobUpdate(events, 0), tmp_path)
    assert "2 caption file(s) written, 1 skipped (already captioned), 1 failed" in text
    assert "/x/broken.jpg" in text and "`^_^` (2)" in text
    assert view.summary_markdown(JobUpdate(events[:1], None), tmp_path) == ""
    failed = JobUpdate([{"type": "error", "message": "no such model", "hint": "check the path"}], 2)
    assert "Captioning failed" in view.summary_markdown(failed, tmp_path) and "check the path" in \
        view.summary_markdown(failed, tmp_path)
    assert "Stopped" in view.summary_markdown(JobUpdate([], -15), tmp_path)
    stopped_metadata = view.summary_markdown(JobUpdate([], -15), tmp_path, tmp_path / "meta.json")
    assert "Nothing was written" in stopped_metadata and "kept" not in stopped_metadata  # written only at the end


def picture_folder(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "green"), ("c.jpg", "blue")):
        Image.new("RGB", (600, 300), colour).save(folder / name)
    (folder / "broken.png").write_text("not an image")
    (folder / "a.txt").write_text("1girl, solo, 1girl\n", encoding="utf-8")
    (folder / "b.txt").write_text("1girl, smile\n", encoding="utf-8")
    return folder


def test_tag_table_counts_files_per_tag(tmp_path):
    folder = picture_folder(tmp_path)
    frame = view.tag_frame(folder, ".txt")
    assert list(frame.columns) == view.TAG_COLUMNS
    assert frame.values.tolist() == [["1girl", 2], ["smile", 1], ["solo", 1]]
    (folder / "c.txt").write_bytes(b"\xff\xfe not utf-8")
    assert view.tag_frame(folder, ".txt").values.tolist() == [["1girl", 2], ["smile", 1], ["solo", 1]]


def test_editor_lists_readable_images_and_keeps_the_current_one(tmp_path):
    folder = picture_folder(tmp_path)
    listing = view.list_editor(folder, ".txt", keep=folder / "b.png")
    assert [os.path.basename(path) for path in listing.state.images] == ["a.png", "b.png", "c.jpg"]
    assert listing.unreadable == ["broken.png"] and "broken.png" in view.listing_markdown(listing)
    assert [label for _, label in listing.items] == ["1girl, solo, 1girl", "1girl, smile", "(no caption)"]
    assert listing.state.index == 1 and listing.state.saved_text == "1girl, smile"
    for thumb, _ in listing.items:
        assert max(Image.open(thumb).size) <= view.THUMBNAIL_SIZE
    state = listing.state.moved(2)
    assert state.saved_text == "" and "no caption file yet" in state.position_markdown()
    assert state.moved(3).current == folder / "a.png" and state.moved(-1).current == folder / "c.jpg"


def test_unsaved_edits_are_noticed_until_saved(tmp_path):
    folder = picture_folder(tmp_path)
    state = view.list_editor(folder, ".txt").state
    assert state.unsaved_warning("1girl, solo, 1girl\n") == ""
    assert "a.txt has unsaved changes" in state.unsaved_warning("1girl")
    path = view.save_caption(state.current, ".txt", " 1girl \n")
    assert path == folder / "a.txt" and path.read_text(encoding="utf-8") == "1girl\n"
    assert state.moved(state.index).unsaved_warning("1girl") == ""
    assert EditorState().unsaved_warning("anything") == ""  # no folder open: nothing to lose


def test_thumbnails_are_cached_until_the_image_changes(tmp_path):
    image = tmp_path / "big.png"
    Image.new("RGB", (1000, 500), "red").save(image)
    first = view.thumbnail(image, cache_dir=tmp_path / "cache")
    assert first == view.thumbnail(image, cache_dir=tmp_path / "cache") and Image.open(first).size == (256, 128)
    Image.new("RGB", (500, 1000), "blue").save(image)
    os.utime(image, ns=(1, 10**18))
    second = view.thumbnail(image, cache_dir=tmp_path / "cache")
    assert second != first and Image.open(second).size == (128, 256)
    assert view.thumbnail(tmp_path / "missing.png", cache_dir=tmp_path / "cache") is None


def test_preview_applies_exif_orientation(tmp_path):
    image = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    Image.new("RGB", (200, 100), "red").save(image, exif=exif)
    assert view.preview_image(image).size == (100, 200)


def test_batch_edit_form_and_its_preview(tmp_path):
    folder = picture_folder(tmp_path)
    assert view.is_empty_edit(view.edit_options()) and not view.is_empty_edit(view.edit_options(dedupe=True))
    options = view.edit_options(add="sks, ", remove=" SOLO", find="smile", replace="grin")
    assert (options.add_tags, options.remove_tags, options.replace) == (("sks",), ("SOLO",), (("smile", "grin"),))
    dry = edit_folder(folder, options, dry_run=True)
    text = view.edit_markdown(dry, dry_run=True)
    assert "Would change 2 of 2 caption file(s)" in text and "`1girl, grin, sks`" in text
    assert (folder / "b.txt").read_text(encoding="utf-8") == "1girl, smile\n"
    done = edit_folder(folder, options)
    assert "Changed 2 of 2" in view.edit_markdown(done, dry_run=False)
    assert (folder / "a.txt").read_text(encoding="utf-8") == "1girl, 1girl, sks\n"


def test_a_metadata_request_reaches_the_engine_parser_and_new_names_only(tmp_path):
    roots = FileRoots((tmp_path,))
    (tmp_path / "given.json").write_text("{}")
    target, source = view.metadata_paths(str(tmp_path / "out.json"), str(tmp_path / "given.json"), roots)
    args, _ = engine_options(CaptionRequest(tmp_path, "wd14", metadata=target, in_json=source, full_path=True))
    assert (args.metadata, args.in_json, args.full_path) == (target, source, True)
    plain, _ = engine_options(CaptionRequest(tmp_path, "wd14"))
    assert (plain.metadata, plain.in_json, plain.full_path) == (None, None, False)
    with pytest.raises(CaptionViewError, match="never overwritten"):
        view.metadata_paths(str(tmp_path / "given.json"), "", roots)
    with pytest.raises(CaptionViewError, match="give a name"):
        view.metadata_paths("", "", roots)
    with pytest.raises(CaptionViewError, match="--allow-path"):
        view.metadata_paths("/elsewhere/out.json", "", roots)
    done = [{"type": "done", "written": 2, "skipped": 0, "failed": 0}]
    assert f"2 caption(s) written into `{target}`" in view.summary_markdown(JobUpdate(done, 0), tmp_path, target)
