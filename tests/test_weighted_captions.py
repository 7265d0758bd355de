"""model.weighted_captions: sd-scripts' prompt-weight syntax in captions, through the real tiny text encoders, the
text-encoder cache, the config rules and tiny training runs."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.cache.text_encoder import build_text_encoder_cache, cache_path, jobs_from_scan
from engine.config.errors import ConfigError
from engine.config.io import validate_config
from engine.data.scan import scan_config
from engine.models.text_encoders import load_text_encoders
from engine.models.text_encoding import encode_captions, tokenize_chunks
from engine.models.weighted_prompt import parse_prompt_attention, tokenize_weighted, weighted_ids
from engine.train.conditioning import check_text_options
from engine.train.setup import RunInputError
from tests.train_helpers import train_here, write_config

PLAIN = "a photo of sks dog, red square"
WEIGHTED = "a photo of (sks:1.5) dog, [red] square"
# 86 CLIP tokens: "soft light" is beyond the first 75, in the second chunk of a 150-token encoding.
LONG = ("sks dog sitting on a wooden porch, extraordinarily detailed watercolour landscape, misty mountains beyond "
        "a quiet lake at dawn, tall pine trees along the shore, a small red boat tied to a weathered pier, "
        "reflections rippling across the water, wildflowers in the foreground, scattered clouds drifting over "
        "snowy peaks, birds circling high above the valley, a winding path leading into the forest, golden reeds "
        "swaying in the breeze, soft light")


# --- the syntax (sd-scripts' own examples) ---------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("style: anime, 1girl", [("style: anime, 1girl", 1.0)]),  # a colon without a weight is text
    ("[[small]]", [("small", 1 / 1.1 / 1.1)]),
    ("", [("", 1.0)]),
    ("(word:1.2.3)", [("word:1.2.3)", 1.1)]),  # sd-scripts crashes here; the text stays as written
])
def test_parse_prompt_attention_matches_sd_scripts(text, expected):
    parsed = parse_prompt_attention(text)
    assert [piece for piece, _ in parsed] == [piece for piece, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected], rel=1e-12)


# --- tokenizing and encoding with the tiny models ----------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return {family: load_text_encoders(tiny_models[family]) for family in ("sd1", "sd2", "sdxl")}


def encode(encoders, captions, weighted, max_token_length=75):
    with torch.no_grad():
        return encode_captions(encoders, captions, max_token_length=max_token_length, weighted=weighted)


def token_positions(tokenizer, ids, word):
    """Where the tokens of ``word`` sit in ``ids``."""
    tokens = tokenizer(word, add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids)) if ids[i:i + len(tokens)] == tokens]
    assert len(starts) == 1, (word, starts)
    return list(range(starts[0], starts[0] + len(tokens)))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_weights_go_to_the_words_tokens_and_brackets_are_not_tokens(loaded, family):
    for tokenizer in loaded[family].tokenizers:
        for length in (75, 150):
            plain_ids = tokenizer([PLAIN], padding="max_length", truncation=True, max_length=length + 2).input_ids[0]
            ids, weights = weighted_ids(tokenizer, WEIGHTED, length)
            assert ids == plain_ids  # the same tokens as the caption without its brackets, at the same positions
            sks, red = token_positions(tokenizer, ids, "sks"), token_positions(tokenizer, ids, "red")
            expected = [1.5 if i in sks else 1 / 1.1 if i in red else 1.0 for i in range(length + 2)]
            assert weights == pytest.approx(expected, rel=1e-12)
            # A plain caption: exactly the unweighted tokenization, every weight 1.
            assert weighted_ids(tokenizer, PLAIN, length) == (plain_ids, [1.0] * (length + 2))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_weighted_encoding_scales_the_words_outputs_and_leaves_plain_captions_alone(loaded, family):
    encoders = loaded[family]
    plain_off, plain_on = encode(encoders, [PLAIN], False), encode(encoders, [PLAIN], True)
    assert torch.equal(plain_on.hidden_states, plain_off.hidden_states)  # a plain caption: bit for bit the same
    weighted = encode(encoders, [WEIGHTED], True)
    assert not torch.equal(weighted.hidden_states, plain_off.hidden_states)
    # Without weighting the brackets are text and change the tokens; with it, only the scale at the words changes.
    assert not torch.equal(encode(encoders, [WEIGHTED], False).hidden_states[:, 4], plain_off.hidden_states[:, 4])
    # Exactly sd-scripts' rule: the unweighted outputs of the bracket-free caption times each token's weight, per
    # encoder (SDXL: each encoder's slice of the features with its own tokenizer's weights).
    widths = [encoder.config.hidden_size for encoder in encoders.encoders]
    offset = 0
    for tokenizer, width in zip(encoders.tokenizers, widths, strict=True):
        _, weights = tokenize_weighted(tokenizer, [WEIGHTED], 75)
        part = slice(offset, offset + width)
        expected = plain_off.hidden_states[..., part] * weights[..., None]
        assert torch.equal(weighted.hidden_states[..., part], expected)
        changed = (weighted.hidden_states[0, :, part] != plain_off.hidden_states[0, :, part]).any(dim=-1)
        assert changed.nonzero().flatten().tolist() == (weights[0] != 1).nonzero().flatten().tolist()
        offset += width
    if family == "sdxl":  # the pooled embedding is not weighted
        assert torch.equal(weighted.pooled, plain_off.pooled)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_weight_in_the_second_chunk_of_a_long_caption(loaded, family):
    encoders = loaded[family]
    weighted_long = LONG.replace("soft light", "(soft light:0.5)")
    plain = encode(encoders, [LONG], False, 150)
    weighted = encode(encoders, [weighted_long], True, 150)
    tokenizer = encoders.tokenizers[0]
    ids = tokenizer([LONG], padding="max_length", truncation=True, max_length=152).input_ids[0]
    soft = token_positions(tokenizer, ids, "soft light")
    assert soft[0] > 76  # in the second chunk
    assert tokenize_chunks(tokenizer, [LONG], 150).shape == (1, 2, 77)
    width = encoders.encoders[0].config.hidden_size
    first = weighted.hidden_states[0, :, :width]
    assert torch.equal(first[soft], plain.hidden_states[0, soft, :width] * 0.5)
    others = [i for i in range(152) if i not in soft]
    assert torch.equal(first[others], plain.hidden_states[0, others, :width])


# --- where weighted captions are refused -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux1", "chroma", "sd3"])
def test_flux_and_sd3_refuse_weighted_captions(family):
    with pytest.raises(ConfigError) as error:
        validate_config({"model": {"model_family": family, "weighted_captions": True}}, check_packages=False)
    problems = {problem.path: problem.message for problem in error.value.problems}
    assert "sd-scripts has no weighted captions" in problems["model.weighted_captions"]
    assert "set it to false" in problems["model.weighted_captions"]
    # A family found only when the model is loaded (model_family = 'auto') is refused before anything is cached.
    config = validate_config({"model": {"weighted_captions": True}}, check_packages=False)
    with pytest.raises(RunInputError, match="captions are not weighted") as refused:
        check_text_options(config, family)
    assert refused.value.where == "model.weighted_captions"
    check_text_options(config, "sdxl")  # the CLIP families read them


def test_sd_families_accept_weighted_captions():
    for family in ("sd1", "sd2", "sdxl"):
        config = validate_config({"model": {"model_family": family, "weighted_captions": True}}, check_packages=False)
        assert config.model.weighted_captions


# --- the text-encoder cache --------------------------------------------------------------------------------------


def test_cached_outputs_are_weighted_and_keyed_by_the_setting(tiny_models, loaded, tmp_path):
    images = Path(shutil.copytree(tiny_models["dataset_img"], tmp_path / "img"))
    caption = images / "10_sks dog" / "01_red_square.txt"
    caption.write_text(WEIGHTED, encoding="utf-8")
    general = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128}
    config = validate_config({"dataset": {"train_data_dir": str(images), "general": general}}, check_packages=False)
    jobs = jobs_from_scan(scan_config(config, tmp_path))
    encoders = loaded["sd1"]

    def build(weighted):
        return build_text_encoder_cache(jobs, encoders, clip_skip=1, max_token_length=75, weighted=weighted)

    assert build(False).encoded == len(jobs)
    report = build(True)
    assert report.encoded == len(jobs) and {reason for _, reason in report.rebuilt_stale} == {
        "weighted_captions changed from False to True"}
    entry = np.load(cache_path(images / "10_sks dog" / "01_red_square.png", "sd1"))
    assert np.array_equal(entry["hidden_states"], encode(encoders, [WEIGHTED], True).hidden_states[0].numpy())
    assert build(True).reused == len(jobs)


# --- training ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weighted_images(tiny_models, tmp_path_factory):
    """The tiny training images with captions that carry weights."""
    images = Path(shutil.copytree(tiny_models["dataset_img"], tmp_path_factory.mktemp("weighted") / "img"))
    for caption in images.rglob("*.txt"):
        words = caption.read_text(encoding="utf-8").strip().split(", ")
        caption.write_text(f"(sks:1.8) dog, [{words[-1]}], ({', '.join(words[1:-1] or ['plain'])}:0.6)",
                           encoding="utf-8")
    return images


def train(tiny_models, folder, images, **sections):
    config = write_config(folder / "config.toml", tiny_models, "sd1", dataset={"train_data_dir": str(images)},
                          training={"max_train_steps": 6, **sections.pop("training", {})}, **sections)
    train_here(config)
    return load_file(str(folder / "out" / "lora.safetensors"))


@pytest.mark.slow
def test_training_with_weighted_captions(tiny_models, weighted_images, tmp_path):
    """Runs with weighted captions on train (encoding every step, and from cached outputs), and learn something else
    than the same captions read as plain text."""
    (tmp_path / "on").mkdir(), (tmp_path / "off").mkdir(), (tmp_path / "cached").mkdir()
    on = train(tiny_models, tmp_path / "on", weighted_images, model={"weighted_captions": True})
    off = train(tiny_models, tmp_path / "off", weighted_images)
    assert on.keys() == off.keys()
    assert any(not torch.equal(on[key], off[key]) for key in on)
    cached = train(tiny_models, tmp_path / "cached", weighted_images, model={"weighted_captions": True},
                   network={"network_dim": 4, "network_alpha": 4.0, "train_unet_only": True},
                   training={"cache_text_encoder_outputs": True})
    assert all(torch.isfinite(tensor).all() for tensor in cached.values())
