"""sd-scripts' sample prompt format."""

import json

import pytest

from engine.config.prompts import load_prompt_file, parse_prompt_line


def test_all_common_options_parse():
    parsed = parse_prompt_line("1girl, solo --n lowres, bad hands --w 768 --h 1023 --d 42 --l 6.5 --s 28 --ss ddim")
    assert parsed == {"prompt": "1girl, solo", "negative_prompt": "lowres, bad hands", "width": 768,
                      "height": 1016, "seed": 42, "scale": 6.5, "sample_steps": 28, "sample_sampler": "ddim"}


def test_sizes_and_steps_are_clamped_like_sd_scripts():
    parsed = parse_prompt_line("x --w 10 --s 5000")
    assert parsed["width"] == 64 and parsed["sample_steps"] == 1000


@pytest.mark.parametrize(("line", "fragment"), [
    ("a cat --q 1", "unknown option --q"),
    ("a cat --d seven", "--d 'seven'"),
    ("a cat --ss warp", "--ss 'warp'"),
    (" --n only negative", "empty"),
])
def test_bad_lines_are_explained(line, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_prompt_line(line)


def test_prompt_files_in_three_formats(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\n\na dog --w 512\na cat\n")
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 640\nsample_steps = 20\n'
                                     '[[prompt.subset]]\nprompt = "a dog"\n[[prompt.subset]]\nprompt = "a cat"\n'
                                     'width = 512\n')
    (tmp_path / "p.json").write_text(json.dumps(["a dog --d 3", {"prompt": "a cat", "seed": 4}]))
    assert [p["prompt"] for p in load_prompt_file(tmp_path / "p.txt")] == ["a dog", "a cat"]
    assert load_prompt_file(tmp_path / "p.toml") == [{"width": 640, "sample_steps": 20, "prompt": "a dog"},
                                                     {"width": 512, "sample_steps": 20, "prompt": "a cat"}]
    assert load_prompt_file(tmp_path / "p.json") == [{"prompt": "a dog", "seed": 3}, {"prompt": "a cat", "seed": 4}]


def test_indented_comment_lines_in_a_prompt_file_are_comments(tmp_path):
    """A '#' after spaces or a tab starts a comment too; a '#' inside a prompt is kept."""
    (tmp_path / "p.txt").write_text("# first\n   # indented --w 64\n\t# tabbed\n  a dog #1 --w 512\n\na cat\n")
    prompts = load_prompt_file(tmp_path / "p.txt")
    assert prompts == [{"prompt": "a dog #1", "width": 512}, {"prompt": "a cat"}]
