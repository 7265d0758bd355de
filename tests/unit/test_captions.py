"""Caption files and per-step caption processing (spec §1.7 and §1.11), with fixed seeds."""

import json
import random
from dataclasses import fields
from pathlib import Path

import pytest

from engine.config.dataset_keys import CaptionDropoutKeys, SubsetLevelKeys
from engine.data.captions import (
    CaptionError,
    CaptionOptions,
    approximate_token_count,
    find_caption_file,
    folder_tag_frequency,
    process_caption,
    read_caption_file,
    tag_frequency,
)

TAGS = "sks, a, b, c, d, e, f, g, h, i, j"


def run(caption: str, seed: int = 0, **options) -> str:
    return process_caption(caption, CaptionOptions(**options), rng=random.Random(seed))


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def split(caption: str) -> list[str]:
    return caption.split(", ")


# --- finding and reading caption files ------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".txt", "txt"])
def test_caption_file_found_with_or_without_the_dot(tmp_path, extension):
    caption = write(tmp_path / "img01.txt", "x")
    assert find_caption_file(tmp_path / "img01.png", extension) == caption


def test_a_missing_caption_file_gives_none(tmp_path):
    write(tmp_path / "img01.caption", "x")
    assert find_caption_file(tmp_path / "img01.png", ".txt") is None
    assert find_caption_file(tmp_path / "other.png", ".caption") is None


def test_face_crop_variant_drops_the_last_four_tokens(tmp_path):
    caption = write(tmp_path / "photo_01.txt", "x")
    assert find_caption_file(tmp_path / "photo_01_10_20_30_40.png", ".txt") == caption
    # The image's own caption wins over the face-crop one.
    own = write(tmp_path / "photo_01_10_20_30_40.txt", "y")
    assert find_caption_file(tmp_path / "photo_01_10_20_30_40.png", ".txt") == own


def test_face_crop_needs_five_tokens_and_ignores_folder_underscores(tmp_path):
    write(tmp_path / "a.txt", "x")
    assert find_caption_file(tmp_path / "a_b_c_d.png", ".txt") is None  # only 4 tokens
    folder = tmp_path / "5_my_chara_x_y"
    folder.mkdir()
    write(tmp_path / "5.txt", "wrong")  # what splitting the whole path would find
    assert find_caption_file(folder / "img.png", ".txt") is None


def test_utf8_bom_is_stripped(tmp_path):
    path = write(tmp_path / "a.txt", b"\xef\xbb\xbfsks dog, red\n")
    assert read_caption_file(path, enable_wildcard=False) == "sks dog, red"


def test_non_utf8_file_names_the_file_and_the_fix(tmp_path):
    path = write(tmp_path / "latin.txt", "café, crème".encode("latin-1"))
    with pytest.raises(CaptionError) as error:
        read_caption_file(path, enable_wildcard=False)
    assert str(path) in str(error.value) and "re-save it as UTF-8" in str(error.value)


def test_unreadable_file_is_a_caption_error(tmp_path):
    with pytest.raises(CaptionError, match="missing.txt"):
        read_caption_file(tmp_path / "missing.txt", enable_wildcard=False)


def test_first_line_without_wildcards_all_lines_with(tmp_path):
    path = write(tmp_path / "a.txt", "  first, line \r\n\n  second  \n\n")
    assert read_caption_file(path, enable_wildcard=False) == "first, line"
    assert read_caption_file(path, enable_wildcard=True) == "first, line\nsecond"


def test_empty_file_reads_as_empty_caption(tmp_path):
    path = write(tmp_path / "a.txt", b"")
    assert read_caption_file(path, enable_wildcard=False) == ""
    assert read_caption_file(path, enable_wildcard=True) == ""


# --- options ---------------------------------------------------------------------------------------------------


def test_defaults_are_those_of_the_config_model():
    config_fields = {**SubsetLevelKeys.model_fields, **CaptionDropoutKeys.model_fields}
    for option in fields(CaptionOptions):
        assert option.default == config_fields[option.name].default, option.name


def test_from_params_ignores_other_keys_and_none():
    options = CaptionOptions.from_params(
        {"shuffle_caption": True, "keep_tokens": 2, "caption_prefix": None, "num_repeats": 10, "image_dir": "x"}
    )
    assert options == CaptionOptions(shuffle_caption=True, keep_tokens=2)


def test_changes_per_step():
    assert not CaptionOptions().changes_per_step
    assert not CaptionOptions(caption_prefix="sks", keep_tokens=3, secondary_separator=";;;").changes_per_step
    for changing in ({"shuffle_caption": True}, {"enable_wildcard": True}, {"token_warmup_step": 100},
                     {"token_warmup_step": 0.2}, {"caption_tag_dropout_rate": 0.1}, {"caption_dropout_rate": 0.05},
                     {"caption_dropout_every_n_epochs": 3}):
        assert CaptionOptions(**changing).changes_per_step, changing


# --- processing ------------------------------------------------------------------------------------------------


def test_nothing_enabled_leaves_the_caption_and_the_rng_alone():
    rng = random.Random(5)
    state = rng.getstate()
    assert process_caption("b, a", CaptionOptions(), rng=rng) == "b, a"
    assert rng.getstate() == state


def test_prefix_and_suffix_with_a_space():
    assert run("a, b", caption_prefix="sks", caption_suffix="end") == "sks a, b end"


def test_caption_dropout_rate():
    assert run("a, b", caption_dropout_rate=1.0) == ""
    assert run("a, b", caption_dropout_rate=0.0) == "a, b"
    dropped = sum(run("a", seed, caption_dropout_rate=0.5) == "" for seed in range(400))
    assert 150 < dropped < 250


def test_caption_dropout_every_n_epochs_counts_epochs_from_one():
    options = CaptionOptions(caption_dropout_every_n_epochs=2)
    results = [process_caption("a", options, rng=random.Random(0), epoch=epoch) for epoch in range(5)]
    assert results == ["a", "a", "", "a", ""]  # epoch 0 is "not training", e.g. a preview


def test_multi_line_caption_without_wildcards_uses_the_first_line():
    assert run("one\ntwo") == "one"


def test_wildcards_reach_every_choice_and_every_line():
    outputs = {run("{red|green|blue} ball", seed, enable_wildcard=True) for seed in range(200)}
    assert outputs == {"red ball", "green ball", "blue ball"}
    lines = {run("one\ntwo\nthree", seed, enable_wildcard=True) for seed in range(200)}
    assert lines == {"one", "two", "three"}


def test_wildcard_escapes_stay_literal():
    outputs = {run("{{literal}} {a|b} ⦅x⦆", seed, enable_wildcard=True) for seed in range(50)}
    assert outputs == {"{literal} a ⦅x⦆", "{literal} b ⦅x⦆"}
    assert run("{a|b}", enable_wildcard=False) == "{a|b}"


def test_shuffle_keeps_leading_tokens_and_permutes_the_rest():
    shuffled = run(TAGS, 1, shuffle_caption=True, keep_tokens=1)
    assert split(shuffled)[0] == "sks"
    assert sorted(split(shuffled)) == sorted(split(TAGS))
    assert shuffled == run(TAGS, 1, shuffle_caption=True, keep_tokens=1)
    orders = {run(TAGS, seed, shuffle_caption=True, keep_tokens=1) for seed in range(20)}
    assert len(orders) > 10


def test_keep_tokens_separator_fixes_a_prefix_and_a_suffix():
    caption = "sks, girl ||| a, b, c, d, e ||| best quality, end"
    orders = set()
    for seed in range(30):
        tags = split(run(caption, seed, shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||"))
        assert tags[:2] == ["sks", "girl"] and tags[-2:] == ["best quality", "end"]
        assert sorted(tags[2:-2]) == ["a", "b", "c", "d", "e"]
        orders.add(tuple(tags[2:-2]))
    assert len(orders) > 5


def test_keep_tokens_separator_absent_falls_back_to_keep_tokens():
    tags = split(run(TAGS, 3, shuffle_caption=True, keep_tokens=2, keep_tokens_separator="|||"))
    assert tags[:2] == ["sks", "a"]


@pytest.mark.parametrize(("warmup_step", "max_train_steps"), [(10, 0), (0.5, 20)])
def test_token_warmup_grows_the_flexible_tags(warmup_step, max_train_steps):
    options = CaptionOptions(keep_tokens=1, token_warmup_step=warmup_step, token_warmup_min=1)

    def at(step: int) -> str:
        return process_caption(TAGS, options, rng=random.Random(0), step=step, max_train_steps=max_train_steps)

    assert at(0) == "sks, a"  # min 1 flexible tag
    assert at(5) == "sks, a, b, c, d, e"  # floor(5 * (10 - 1) / 10) + 1 = 5
    assert at(10) == TAGS
    assert at(50) == TAGS


def test_fractional_warmup_without_a_run_length_is_off():
    assert process_caption(TAGS, CaptionOptions(token_warmup_step=0.5), rng=random.Random(0), step=0) == TAGS


def test_tag_dropout_drops_flexible_tags_only():
    assert run(TAGS, caption_tag_dropout_rate=1.0, keep_tokens=2) == "sks, a"
    caption = "sks ||| a, b, c ||| end"
    assert run(caption, caption_tag_dropout_rate=1.0, keep_tokens_separator="|||") == "sks, end"
    assert run(TAGS, caption_tag_dropout_rate=0.0, shuffle_caption=False) == TAGS


def test_secondary_separator_groups_tags_that_shuffle_together():
    caption = "sks, red hair;;;long hair, blue eyes, smile, outdoors"
    for seed in range(30):
        out = run(caption, seed, shuffle_caption=True, keep_tokens=1, secondary_separator=";;;")
        assert ";;;" not in out
        assert sorted(split(out)) == ["blue eyes", "outdoors", "red hair,long hair", "sks", "smile"]
    assert run("a;;;b", secondary_separator=";;;", caption_separator=";") == "a;b"


def test_rejoin_uses_comma_space_whatever_the_separator():
    assert run("a; b;c", shuffle_caption=True, caption_separator=";") in {
        "a, b, c", "a, c, b", "b, a, c", "b, c, a", "c, a, b", "c, b, a"}
    assert run("a; b;c", caption_separator=";") == "a; b;c"  # not split when nothing acts on tags


def test_empty_tags_survive_like_sd_scripts_without_a_keep_marker():
    assert sorted(split(run("a, b,", shuffle_caption=True))) == ["", "a", "b"]


def test_same_seed_reproduces_a_fully_random_caption():
    options = CaptionOptions(caption_prefix="sks", shuffle_caption=True, keep_tokens=1, enable_wildcard=True,
                             caption_tag_dropout_rate=0.3, caption_dropout_rate=0.1)
    caption = "{red|blue} hair, a, b, c, d\ngreen eyes, e, f, g"
    first = [process_caption(caption, options, rng=random.Random(seed)) for seed in range(20)]
    again = [process_caption(caption, options, rng=random.Random(seed)) for seed in range(20)]
    assert first == again and len(set(first)) > 5


# --- tag frequency and token estimate --------------------------------------------------------------------------


def test_tag_frequency_strips_lowers_and_skips_empty():
    assert tag_frequency(["Red, blue", " red ,, GREEN "]) == {"red": 2, "blue": 1, "green": 1}
    assert tag_frequency(["a; b; a"], separator=";") == {"a": 2, "b": 1}


def test_folder_tag_frequency_has_the_ss_tag_frequency_shape():
    frequency = folder_tag_frequency([("10_sks dog", "sks, Dog"), ("10_sks dog", "sks"), ("1_reg", "")])
    assert frequency == {"10_sks dog": {"sks": 2, "dog": 1}, "1_reg": {}}
    assert json.loads(json.dumps(frequency)) == frequency


def test_approximate_token_count():
    assert approximate_token_count("") == 0
    # a, photo, of, sks, dog, ",", "1", girl
    assert approximate_token_count("a photo of sks dog, 1girl") == 8
    assert approximate_token_count("photorealistic") == 3  # long words count as several pieces
    assert approximate_token_count("looking_at_viewer") == 6  # looking (2: 7 letters), _, at, _, viewer
    long_caption = ", ".join(["masterpiece"] * 40)
    assert approximate_token_count(long_caption) > 75
