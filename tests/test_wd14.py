"""WD14 tagger: preprocessing per spec §4.3, model loading, and every tag option (engine.caption.wd14)."""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from engine.caption.base import CaptionOutput
from engine.caption.wd14 import (
    WD14_MODELS,
    Wd14Options,
    Wd14Tagger,
    parse_tag_list,
    parse_tag_replacement,
    preprocess_wd14,
    tag_frequency_summary,
)
from engine.caption.wd14_tags import TagSelector, TagTable

GREEN = (0, 255, 0)  # RGB; with the tiny model's fixed weights it scores hatsune_miku, >_< and ^_^ (checked below)


# --- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wd14_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["wd14"]


@pytest.fixture(scope="module")
def table(wd14_dir: Path) -> TagTable:
    return TagTable.from_csv(wd14_dir / "selected_tags.csv")


def expected_scores(model_path: Path, rgb: tuple[int, int, int]) -> dict[str, float]:
    """The tiny model's maths redone in numpy for a solid colour: sigmoid(mean BGR / 255 @ W + b)."""
    import onnx
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model_path)).graph.initializer}
    bgr = np.array(rgb[::-1], dtype=np.float64) / 255.0
    logits = bgr @ weights["tag_weight"].astype(np.float64) + weights["tag_bias"]
    names = TagTable.from_csv(model_path.parent / "selected_tags.csv").names
    return dict(zip(names, (1.0 / (1.0 + np.exp(-logits))).tolist(), strict=True))


def select(table: TagTable, scores: dict[str, float], **options: object) -> CaptionOutput:
    """Tags chosen from hand-made scores (every other tag scores 0, ratings as given)."""
    probs = np.array([scores.get(name, 0.0) for name in table.names])
    return TagSelector(table, Wd14Options(**options)).select(probs)


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (448, 448)) -> Image.Image:
    return Image.new("RGB", size, rgb)


# --- preprocessing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB-key"])
def test_transparent_pixels_become_white(mode: str) -> None:
    # Left half fully transparent (hiding black), right half opaque dark grey.
    if mode in ("RGBA", "LA"):
        image = Image.new(mode, (8, 8), (0, 0) if mode == "LA" else (0, 0, 0, 0))
        image.paste((60, 255) if mode == "LA" else (60, 60, 60, 255), (4, 0, 8, 8))
    else:  # palette / colour-key transparency: a `transparency` entry names the see-through colour
        image = Image.new("RGB", (8, 8), (0, 0, 0))
        image.paste((60, 60, 60), (4, 0, 8, 8))
        if mode == "P":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
            image.info["transparency"] = image.getpixel((0, 0))
        else:
            image.info["transparency"] = (0, 0, 0)
    pixels = preprocess_wd14(image, 8)
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.float32
    assert (pixels[:, :4] == 255).all()
    assert (pixels[:, 4:] == 60).all()


def test_wide_image_is_centred_on_white_rows() -> None:
    pixels = preprocess_wd14(solid((0, 0, 0), (20, 10)), 20)  # no resize: isolates the padding
    assert (pixels[:5] == 255).all() and (pixels[15:] == 255).all()
    assert (pixels[5:15] == 0).all()


def test_tall_image_puts_the_odd_padding_column_on_the_right() -> None:
    pixels = preprocess_wd14(solid((0, 0, 0), (10, 17)), 17)  # 7 columns of padding: 3 left, 4 right
    assert (pixels[:, :3] == 255).all() and (pixels[:, 13:] == 255).all()
    assert (pixels[:, 3:13] == 0).all()


def test_grayscale_gives_three_equal_channels() -> None:
    gradient = Image.fromarray(np.tile(np.arange(0, 240, 15, dtype=np.uint8), (16, 1)), mode="L")
    pixels = preprocess_wd14(gradient, 32)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])
    assert pixels.min() < 20 and pixels.max() > 200


def test_channels_are_bgr_after_resize() -> None:
    # 30x18 red pads to 30x30 (6 white rows above and below), then shrinks 3x to 10x10: rows 2..7 stay red.
    pixels = preprocess_wd14(solid((255, 0, 0), (30, 18)), 10)
    assert pixels.shape == (10, 10, 3)
    assert (pixels[2:8] == [0, 0, 255]).all()
    assert (pixels[:2] == 255).all() and (pixels[8:] == 255).all()


def test_enlarging_keeps_a_solid_colour() -> None:
    pixels = preprocess_wd14(solid((10, 20, 30), (16, 16)), 48)
    assert pixels.shape == (48, 48, 3) and (pixels == [30, 20, 10]).all()


def test_exif_orientation_is_applied_first() -> None:
    # Stored 20x10, displayed (orientation 6: rotate 90°) 10x20: padding must go left/right, not top/bottom.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    solid((0, 0, 0), (20, 10)).save(buffer, format="PNG", exif=exif)
    with Image.open(io.BytesIO(buffer.getvalue())) as stored:
        pixels = preprocess_wd14(stored, 20)
    assert (pixels[:, :5] == 255).all() and (pixels[:, 15:] == 255).all()
    assert (pixels[:, 5:15] == 0).all()


# --- the tagger: loading, device, batches, agreement with the model ---------------------------------------------


def test_tagger_agrees_with_the_model_maths(wd14_dir: Path) -> None:
    tagger = Wd14Tagger(wd14_dir, Wd14Options())
    assert (tagger.name, tagger.separator, tagger.input_size, tagger.batch_size) == ("wd14", ", ", 448, 1)
    expected = expected_scores(wd14_dir / "model.onnx", GREEN)
    categories = dict(zip(tagger.table.names, tagger.table.categories, strict=True))
    general = [t for t, p in expected.items() if categories[t] == "0" and p >= 0.35]
    characters = [t for t, p in expected.items() if categories[t] == "4" and p >= 0.35]
    [output] = tagger.caption([solid(GREEN)])
    assert {"hatsune_miku", ">_<", "^_^"} <= set(output.tags)  # the premise the option tests on the model use
    assert output.tags == general + characters
    assert output.text == ", ".join(output.tags)
    assert output.scores == pytest.approx({t: expected[t] for t in output.tags}, abs=1e-5)


def test_batches_give_the_same_tags_as_single_images(wd14_dir: Path) -> None:
    images = [solid(GREEN), solid((200, 30, 30), (60, 40)), solid((0, 0, 255), (32, 32))]
    one_by_one = Wd14Tagger(wd14_dir, Wd14Options()).predict(images)
    batched = Wd14Tagger(wd14_dir, Wd14Options(batch_size=2)).predict(images)
    assert batched.shape == (3, 23)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)


def test_a_fixed_batch_dimension_overrides_batch_size(wd14_dir: Path, tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(wd14_dir / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # "batch" -> 2
    onnx.save(model, str(tmp_path / "model.onnx"))
    shutil.copy(wd14_dir / "selected_tags.csv", tmp_path)
    tagger = Wd14Tagger(tmp_path, Wd14Options(batch_size=8))
    assert tagger.batch_size == 2
    images = [solid(GREEN), solid((0, 0, 0)), solid((255, 255, 255))]  # the last batch is padded with a blank
    expected = Wd14Tagger(wd14_dir, Wd14Options()).predict(images)
    np.testing.assert_allclose(tagger.predict(images), expected, atol=1e-6)


def test_input_size_comes_from_the_model(tiny_models: dict[str, Path]) -> None:
    script = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("atelier_make_tiny_model", script)
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    small = builder.build_wd14(tiny_models["wd14"].parent, input_size=64)  # beside the default, stamped: cached
    tagger = Wd14Tagger(small, Wd14Options())
    assert tagger.input_size == 64
    [scores] = tagger.predict([solid(GREEN, (300, 300))])
    expected = expected_scores(small / "model.onnx", GREEN)
    np.testing.assert_allclose(scores, list(expected.values()), atol=1e-5)


def test_device_is_reported(wd14_dir: Path) -> None:
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert Wd14Tagger(wd14_dir, Wd14Options(), device="cpu").describe_device() == "CPU (onnxruntime)"
    if not cuda:
        assert Wd14Tagger(wd14_dir, Wd14Options()).describe_device() == "CPU (onnxruntime)"
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            Wd14Tagger(wd14_dir, Wd14Options(), device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        Wd14Tagger(wd14_dir, Wd14Options(), device="tpu")


def test_a_missing_file_names_the_folder_and_both_files(wd14_dir: Path, tmp_path: Path) -> None:
    shutil.copy(wd14_dir / "selected_tags.csv", tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        Wd14Tagger(tmp_path, Wd14Options())
    assert str(tmp_path) in str(error.value)
    assert "model.onnx" in str(error.value) and "selected_tags.csv" in str(error.value)


def test_the_csv_header_is_checked(wd14_dir: Path, tmp_path: Path) -> None:
    shutil.copy(wd14_dir / "model.onnx", tmp_path)
    (tmp_path / "selected_tags.csv").write_text("id,tag,kind\n1,solo,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="tag_id,name,category,count"):
        Wd14Tagger(tmp_path, Wd14Options())


# --- options on the real model -------------------------------------------------------------------------------------


def test_lowering_the_threshold_adds_tags(wd14_dir: Path) -> None:
    strict = Wd14Tagger(wd14_dir, Wd14Options(general_threshold=0.6)).caption([solid(GREEN)])[0].tags
    loose = Wd14Tagger(wd14_dir, Wd14Options(general_threshold=0.1)).caption([solid(GREEN)])[0].tags
    assert set(strict) < set(loose)


def test_character_threshold_above_one_disables_characters_on_the_model(wd14_dir: Path) -> None:
    [output] = Wd14Tagger(wd14_dir, Wd14Options(character_threshold=1.01)).caption([solid(GREEN)])
    assert "hatsune_miku" not in output.tags and ">_<" in output.tags


def test_options_reach_the_model_output(wd14_dir: Path) -> None:
    options = Wd14Options(remove_underscore=True, undesired_tags=("short hair",), character_tags_first=True,
                          tag_replacements=(("hatsune_miku", "miku"),), caption_separator=" | ", use_rating_tags=True)
    [output] = Wd14Tagger(wd14_dir, options).caption([solid(GREEN)])
    assert output.tags[:2] == ["questionable", "miku"]
    assert "short hair" not in output.tags and "short_hair" not in output.tags
    assert {"^_^", ">_<", "looking at viewer"} <= set(output.tags)
    assert output.text == " | ".join(output.tags)


# --- options on hand-made scores -------------------------------------------------------------------------------


def test_general_threshold(table: TagTable) -> None:
    scores = {"solo": 0.9, "smile": 0.4, "dog": 0.2}
    assert select(table, scores).tags == ["solo", "smile"]
    assert select(table, scores, general_threshold=0.1).tags == ["solo", "smile", "dog"]
    assert select(table, scores, general_threshold=0.5).tags == ["solo"]


def test_character_threshold(table: TagTable) -> None:
    scores = {"solo": 0.9, "hatsune_miku": 0.5, "kagamine_rin": 0.3}
    assert select(table, scores).tags == ["solo", "hatsune_miku"]
    assert select(table, scores, character_threshold=0.2).tags == ["solo", "hatsune_miku", "kagamine_rin"]
    assert select(table, {**scores, "hatsune_miku": 1.0}, character_threshold=1.5).tags == ["solo"]


def test_undesired_tags_are_removed_in_either_spelling(table: TagTable) -> None:
    scores = {"solo": 0.9, "long_hair": 0.9, "smile": 0.9}
    assert select(table, scores, undesired_tags=("long_hair",)).tags == ["solo", "smile"]
    assert select(table, scores, undesired_tags=("long hair",), remove_underscore=True).tags == ["solo", "smile"]


def test_tag_replacement_is_applied(table: TagTable) -> None:
    scores = {"solo": 0.9, "long_hair": 0.8, "hatsune_miku": 0.7}
    replaced = select(table, scores, tag_replacements=(("long_hair", "very long hair"), ("hatsune_miku", "miku, v")))
    assert replaced.tags == ["solo", "very long hair", "miku, v"]
    assert replaced.scores["very long hair"] == pytest.approx(0.8)
    # The source matches the csv spelling even with remove_underscore on; an empty target drops the tag.
    assert select(table, scores, remove_underscore=True, tag_replacements=(("long_hair", "hair"), ("solo", ""))
                  ).tags == ["hair", "hatsune miku"]


def test_replacements_that_merge_tags_keep_one(table: TagTable) -> None:
    output = select(table, {"long_hair": 0.6, "short_hair": 0.9}, tag_replacements=(("short_hair", "long_hair"),))
    assert output.tags == ["long_hair"] and output.scores == {"long_hair": pytest.approx(0.9)}


def test_tag_replacement_parsing_with_escapes() -> None:
    assert parse_tag_replacement(r"a\,b,c;d\;e,f\,g; h , i ;") == (("a,b", "c"), ("d;e", "f,g"), ("h", "i"))
    assert parse_tag_replacement("") == () and parse_tag_replacement(None) == ()
    for bad in ("a", "a,b,c", ",b"):
        with pytest.raises(ValueError, match="source,target"):
            parse_tag_replacement(bad)


def test_tag_list_parsing() -> None:
    assert parse_tag_list("1girl, solo,,  smile , solo") == ("1girl", "solo", "smile")
    assert parse_tag_list("a | b c", separator=" | ") == ("a", "b c")
    assert parse_tag_list(None) == ()


def test_remove_underscore_spares_short_tags(table: TagTable) -> None:
    scores = {"long_hair": 0.9, "looking_at_viewer": 0.9, "^_^": 0.9, ">_<": 0.9}
    assert select(table, scores).tags == ["long_hair", "looking_at_viewer", "^_^", ">_<"]
    assert select(table, scores, remove_underscore=True).tags == ["long hair", "looking at viewer", "^_^", ">_<"]


def test_character_tags_first_reverses_them_like_sd_scripts(table: TagTable) -> None:
    scores = {"solo": 0.9, "smile": 0.9, "hatsune_miku": 0.9, "kagamine_rin": 0.9}
    assert select(table, scores).tags == ["solo", "smile", "hatsune_miku", "kagamine_rin"]
    assert select(table, scores, character_tags_first=True).tags == ["kagamine_rin", "hatsune_miku", "solo", "smile"]


def test_always_first_tags_last_listed_ends_first(table: TagTable) -> None:
    scores = {"1girl": 0.9, "solo": 0.9, "long_hair": 0.9, "smile": 0.9}
    output = select(table, scores, always_first_tags=("smile", "absent", "long_hair"))
    assert output.tags == ["long_hair", "smile", "1girl", "solo"]
    # Named in the csv spelling, still found after underscores are removed.
    assert select(table, scores, always_first_tags=("long_hair",), remove_underscore=True).tags[0] == "long hair"


def test_rating_tags(table: TagTable) -> None:
    scores = {"general": 0.2, "sensitive": 0.7, "questionable": 0.1, "solo": 0.9, "smile": 0.9}
    assert select(table, scores).tags == ["solo", "smile"]
    assert select(table, scores, use_rating_tags=True).tags == ["sensitive", "solo", "smile"]
    assert select(table, scores, use_rating_tags=True, rating_tags_last=True).tags == ["solo", "smile", "sensitive"]
    assert select(table, scores, rating_tags_last=True).tags[-1] == "sensitive"  # as sd-scripts' last-tag flag
    with_character = select(table, {**scores, "hatsune_miku": 0.9}, use_rating_tags=True, character_tags_first=True)
    assert with_character.tags == ["sensitive", "hatsune_miku", "solo", "smile"]


def test_caption_separator(table: TagTable) -> None:
    output = select(table, {"solo": 0.9, "smile": 0.9}, caption_separator=" | ")
    assert output.text == "solo | smile" and output.tags == ["solo", "smile"]


def test_character_tag_expand() -> None:
    table = TagTable(("general", "solo", "hatsune_miku_(vocaloid)", "saber_(fate)_(fate/stay_night)", "ryuuko"),
                     ("9", "0", "4", "4", "4"))
    scores = [0.9, 0.9, 0.9, 0.9, 0.9]
    plain = TagSelector(table, Wd14Options()).select(scores)
    assert plain.tags == ["solo", "hatsune_miku_(vocaloid)", "saber_(fate)_(fate/stay_night)", "ryuuko"]
    expanded = TagSelector(table, Wd14Options(character_tag_expand=True)).select(scores)
    assert expanded.tags == ["solo", "hatsune_miku", "vocaloid", "saber_(fate)", "fate/stay_night", "ryuuko"]
    assert expanded.text == "solo, hatsune_miku, vocaloid, saber_(fate), fate/stay_night, ryuuko"


def test_categories_are_read_from_the_csv_not_assumed_in_order() -> None:
    # Characters first and ratings last: positions come from the category column.
    table = TagTable(("hatsune_miku", "solo", "smile", "general", "explicit"), ("4", "0", "0", "9", "9"))
    output = TagSelector(table, Wd14Options(use_rating_tags=True)).select([0.9, 0.1, 0.8, 0.3, 0.6])
    assert output.tags == ["explicit", "smile", "hatsune_miku"]


def test_score_count_must_match_the_csv(table: TagTable) -> None:
    with pytest.raises(ValueError, match="selected_tags.csv has 23"):
        TagSelector(table, Wd14Options()).select(np.zeros(10))


def test_options_validate_and_accept_lists() -> None:
    options = Wd14Options(undesired_tags=["a"], tag_replacements=[["x", "y"]])  # type: ignore[arg-type]
    assert options.undesired_tags == ("a",) and options.tag_replacements == (("x", "y"),)
    for bad in ({"batch_size": 0}, {"general_threshold": -0.1}, {"caption_separator": ""}):
        with pytest.raises(ValueError):
            Wd14Options(**bad)  # type: ignore[arg-type]


def test_frequency_summary_and_known_models() -> None:
    outputs = [CaptionOutput("", tags=["solo", "smile"]), CaptionOutput("", tags=["smile", "dog"]),
               CaptionOutput("", tags=["smile"])]
    assert tag_frequency_summary(outputs) == [("smile", 3), ("dog", 1), ("solo", 1)]
    assert tag_frequency_summary(outputs, top=1) == [("smile", 3)]
    assert WD14_MODELS[0] == "SmilingWolf/wd-v1-4-convnext-tagger-v2" and len(WD14_MODELS) == 10
    assert all(repo.startswith("SmilingWolf/") for repo in WD14_MODELS)
