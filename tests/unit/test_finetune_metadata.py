"""Fine-tuning metadata tools (`python -m engine metadata ...`, engine.data.finetune_metadata): the JSON sd-scripts'
merge/clean scripts write, never over an existing file, and read back by the trainer's own dataset scan."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.config.io import validate_config
from engine.data.finetune_metadata import (
    MetadataWriteError,
    PrepareRequest,
    clean_caption,
    clean_metadata,
    clean_tags,
    prepare_metadata,
    write_new_metadata,
)
from engine.data.scan import scan_config

REPO = Path(__file__).resolve().parents[2]


def engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def picture(path: Path, size=(128, 96)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """a: caption and tags; b: caption only; c: nothing."""
    images = tmp_path / "train"
    for name in ("a.png", "b.jpg", "c.webp"):
        picture(images / name)
    (images / "a.caption").write_text("a woman in a garden\n", encoding="utf-8")
    (images / "a.txt").write_text("1girl, long_hair, white_shirt, shirt\n", encoding="utf-8")
    (images / "b.caption").write_bytes("\ufeffan anime character\r\nsecond line\r\n".encode())
    return images


def test_merge_captions_writes_stem_keys_from_caption_files(folder, tmp_path):
    out = tmp_path / "meta_cap.json"
    result = engine("metadata", "merge-captions", folder, out)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "a": {"caption": "a woman in a garden"}, "b": {"caption": "an anime character\nsecond line"}}
    assert "merged 2 of 3" in result.stdout and "c.webp" in result.stderr and ".caption" in result.stderr


def test_merge_tags_into_an_existing_file_writes_a_new_one_and_leaves_the_input(folder, tmp_path):
    first = tmp_path / "meta_cap.json"
    assert engine("metadata", "merge-captions", folder, first).returncode == 0
    before = first.read_bytes()
    out = tmp_path / "meta_cap_dd.json"
    result = engine("metadata", "merge-tags", folder, out, "--in_json", first)
    assert result.returncode == 0, result.stderr
    assert first.read_bytes() == before
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "a": {"caption": "a woman in a garden", "tags": "1girl, long_hair, white_shirt, shirt"},
        "b": {"caption": "an anime character\nsecond line"}}


@pytest.mark.parametrize("action", ["merge-captions", "merge-tags", "clean"])
def test_an_existing_output_is_refused_and_kept(folder, tmp_path, action):
    existing = tmp_path / "meta.json"
    existing.write_text('{"x": {"caption": "mine"}}', encoding="utf-8")
    inputs = [existing] if action == "clean" else [folder]
    result = engine("metadata", action, *inputs, existing, *(["--in-json", existing] if action != "clean" else []))
    assert result.returncode == 2
    assert "never overwritten" in result.stderr and "new file name" in result.stderr and str(existing) in result.stderr
    assert existing.read_text(encoding="utf-8") == '{"x": {"caption": "mine"}}'


def test_full_path_and_recursive_keys(folder, tmp_path):
    picture(folder / "sub" / "d.png")
    (folder / "sub" / "d.caption").write_text("deep", encoding="utf-8")
    full = tmp_path / "full.json"
    assert engine("metadata", "merge-captions", folder, full, "--full_path", "--recursive").returncode == 0
    keys = set(json.loads(full.read_text(encoding="utf-8")))
    assert keys == {str(folder / "a.png"), str(folder / "b.jpg"), str(folder / "sub" / "d.png")}
    relative = tmp_path / "relative.json"
    assert engine("metadata", "merge-captions", folder, relative, "--recursive").returncode == 0
    assert set(json.loads(relative.read_text(encoding="utf-8"))) == {"a.png", "b.jpg", "sub/d.png"}


def test_caption_extension_flags_and_sd_scripts_spellings(folder, tmp_path):
    (folder / "c.cap").write_text("from cap", encoding="utf-8")
    out = tmp_path / "m.json"
    assert engine("metadata", "merge-captions", folder, out, "--caption_extention", "cap").returncode == 0
    assert json.loads(out.read_text(encoding="utf-8")) == {"c": {"caption": "from cap"}}
    refused = engine("metadata", "merge-tags", folder, tmp_path / "n.json", "--caption-extension", ".py")
    assert refused.returncode == 2 and ".py" in refused.stderr and not (tmp_path / "n.json").exists()


def test_no_text_file_at_all_is_an_error_naming_the_extension(folder, tmp_path):
    out = tmp_path / "m.json"
    result = engine("metadata", "merge-tags", folder, out, "--caption-extension", ".tags")
    assert result.returncode == 2 and ".tags" in result.stderr and not out.exists()


def test_unreadable_and_shared_keys_are_reported(folder, tmp_path):
    picture(folder / "a.jpg")
    (folder / "b.caption").write_bytes(b"\xff\xfe bad")
    out = tmp_path / "m.json"
    result = engine("metadata", "merge-captions", folder, out)
    assert result.returncode == 0, result.stderr
    assert "b.caption" in result.stderr and "UTF-8" in result.stderr
    assert "'a' is shared by a.jpg, a.png" in result.stderr and "--full-path" in result.stderr
    assert json.loads(out.read_text(encoding="utf-8")) == {"a": {"caption": "a woman in a garden"}}


def test_missing_inputs_name_the_path(tmp_path):
    result = engine("metadata", "merge-captions", tmp_path / "nope", tmp_path / "m.json")
    assert result.returncode == 2 and "nope" in result.stderr and "no such folder" in result.stderr
    result = engine("metadata", "clean", tmp_path / "none.json", tmp_path / "m.json")
    assert result.returncode == 2 and "none.json" in result.stderr
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    result = engine("metadata", "clean", tmp_path / "list.json", tmp_path / "m.json")
    assert result.returncode == 2 and "list.json" in result.stderr and not (tmp_path / "m.json").exists()


# --- clean: sd-scripts' clean_captions_and_tags.py, case by case -----------------------------------------------------
@pytest.mark.parametrize(("tags", "cleaned"), [
    ("1girl, long_hair, ^_^, smile", "1girl, long hair, ^_^, smile"),  # underscores go, the emoticon stays
    ("1girl, solo, rating:safe", "1girl, solo"),  # DeepDanbooru's rating tail is cut
    ("1girl, white_shirt, shirt, skirt", "1girl, white shirt, skirt"),  # the plain word under a longer tag goes
    ("2girls, blonde hair, black hair, blue eyes, red eyes, smile", "2girls, smile"),  # several people: per-person
    ("2girls, long hair, blonde hair, black hair", "2girls, long hair"),  # one shared hair length is kept
    ("2girls, blonde hair, blue eyes", "2girls, blonde hair, blue eyes"),  # only repeated features go
    ("1girl, blonde hair, black hair", "1girl, blonde hair, black hair"),  # one person: nothing is dropped
    ("1girl, hair ornament, flower hair ornament", "1girl, flower hair ornament"),
])
def test_clean_tags(tags, cleaned):
    assert clean_tags(tags)[0] == cleaned


def test_clean_captions_and_several_ratings():
    assert clean_caption("a cartoon woman with a young person") == "a girl with a girl"
    assert clean_caption("anime anime anime girl girl") == "girl"
    assert clean_tags("1girl, rating:safe, rating:general")[1]
    metadata = {"a": {"tags": "a_b, rating:safe, rating:q", "caption": "a lady"}, "b": {"caption": "a dog"}}
    report = clean_metadata(metadata)
    assert metadata == {"a": {"tags": "a b", "caption": "a girl"}, "b": {"caption": "a dog"}}
    assert report.tags_changed == ["a"] and report.captions_changed == ["a"] and report.without_tags == ["b"]
    assert report.multiple_ratings == ["a"]


def test_write_new_metadata_never_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "m.json"
    write_new_metadata(target, {"k": {"caption": "ü"}})
    assert json.loads(target.read_text(encoding="utf-8")) == {"k": {"caption": "ü"}}
    with pytest.raises(MetadataWriteError, match="never overwritten"):
        write_new_metadata(target, {})
    with pytest.raises(MetadataWriteError, match=r"\.json name"):
        write_new_metadata(tmp_path / "m.jsonl", {})
    with pytest.raises(MetadataWriteError, match="does not exist"):
        write_new_metadata(tmp_path / "no" / "m.json", {})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.json"]


# --- the trainer reads what the tools write ---------------------------------------------------------------------------
def _finetune_captions(dataset: dict, base: Path) -> list[dict[str, str]]:
    config = validate_config({"method": "finetune", "dataset": {
        "general": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 256}, **dataset}},
        check_packages=False)
    scan = scan_config(config, base)
    assert not [finding for finding in scan.findings if finding.severity == "error"], scan.findings
    return [{record.path.name: record.caption for record in subset.records}
            for dataset_plan in scan.datasets for subset in dataset_plan.subsets]


def test_the_trainer_reads_the_cli_output_through_in_json(folder, tmp_path):
    for step, args in enumerate([("merge-captions", folder, tmp_path / "1.json"),
                                 ("merge-tags", folder, tmp_path / "2.json", "--in-json", tmp_path / "1.json"),
                                 ("clean", tmp_path / "2.json", tmp_path / "3.json")]):
        assert engine("metadata", *args).returncode == 0, step
    captions = _finetune_captions({"train_data_dir": str(folder), "in_json": str(tmp_path / "3.json")}, tmp_path)
    assert captions == [{"a.png": "a girl in a garden,1girl, long hair, white shirt", "b.jpg": "an girl\nsecond line"}]


def test_the_trainer_reads_full_path_and_relative_keys_as_subsets(folder, tmp_path):
    picture(folder / "sub" / "d.png")
    (folder / "sub" / "d.txt").write_text("d_tag", encoding="utf-8")
    full = prepare_metadata(PrepareRequest(folder, tmp_path / "full.json", full_path=True, recursive=True))
    relative = prepare_metadata(PrepareRequest(folder, tmp_path / "rel.json", recursive=True, clean=True,
                                               caption_extension=None))
    assert full.entries == 3 and relative.entries == 2 and relative.clean is not None
    assert any("c.webp" in line for line in full.lines()) and full.lines()[-1].startswith("wrote 3 entries")
    # full paths need no image_dir; relative keys are read against it
    subsets = [{"metadata_file": "full.json"}, {"metadata_file": "rel.json", "image_dir": str(folder)}]
    captions = _finetune_captions({"datasets": [{"subsets": subsets}]}, tmp_path)
    assert captions == [
        {"a.png": "a woman in a garden,1girl, long_hair, white_shirt, shirt",
         "b.jpg": "an anime character\nsecond line", "d.png": "d_tag"},
        {"a.png": "1girl, long hair, white shirt", "d.png": "d tag"}]


def test_prepare_refuses_nothing_to_do_and_an_existing_output(folder, tmp_path):
    with pytest.raises(MetadataWriteError, match="captions, tags, or both"):
        prepare_metadata(PrepareRequest(folder, tmp_path / "m.json", caption_extension=None, tags_extension=None))
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(MetadataWriteError, match="never overwritten"):
        prepare_metadata(PrepareRequest(folder, tmp_path / "m.json"))
