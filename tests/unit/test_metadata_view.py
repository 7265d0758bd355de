"""gui.metadata_view: the Dataset tab's "Prepare fine-tune metadata" form, checked and run without Gradio."""

import json
from pathlib import Path

from PIL import Image

from gui.browse import FileRoots
from gui.metadata_view import MetadataForm, write_metadata


def folder_with_texts(root: Path) -> Path:
    folder = root / "allowed" / "train"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    (folder / "a.caption").write_text("a woman", encoding="utf-8")
    (folder / "a.txt").write_text("long_hair", encoding="utf-8")
    return folder


def test_the_form_writes_a_new_file_and_gives_the_finetune_fields(tmp_path):
    folder = folder_with_texts(tmp_path)
    roots = FileRoots((tmp_path / "allowed",))
    out = tmp_path / "allowed" / "meta.json"
    patch, text = write_metadata(MetadataForm(folder=str(folder), output=str(out), clean=True), roots)
    assert json.loads(out.read_text(encoding="utf-8")) == {"a": {"caption": "a girl", "tags": "long hair"}}
    assert "Wrote 1 entries" in text and str(out) in text
    assert patch == {"method": "finetune", "dataset.train_data_dir": str(folder), "dataset.reg_data_dir": "",
                     "dataset.in_json": str(out)}
    again, text = write_metadata(MetadataForm(folder=str(folder), output=str(out)), roots)
    assert again is None and "never overwritten" in text


def test_form_problems_are_named(tmp_path):
    folder = folder_with_texts(tmp_path)
    roots = FileRoots((tmp_path / "allowed",))
    out = str(tmp_path / "allowed" / "m.json")
    cases = [
        (MetadataForm(folder=str(folder), output=out, captions=False, tags=False), "Merge captions, Merge tags"),
        (MetadataForm(folder="", output=out), "Images folder: choose"),
        (MetadataForm(folder=str(folder), output=""), "New metadata file: choose"),
        (MetadataForm(folder=str(folder), output=str(tmp_path / "outside.json")), "outside the folders"),
        (MetadataForm(folder=str(folder), output=out, tags_extension=".py"), "Tags extension"),
        (MetadataForm(folder=str(folder), output=out, in_json=str(tmp_path / "allowed" / "none.json")), "none.json"),
    ]
    for form, expected in cases:
        patch, text = write_metadata(form, roots)
        assert patch is None and expected in text and text.startswith("**Nothing was written:**"), text
    assert not (tmp_path / "allowed" / "m.json").exists() and not (tmp_path / "outside.json").exists()
