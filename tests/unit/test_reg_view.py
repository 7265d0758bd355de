"""The Regularization tab's logic: class folders, balancing numbers and their words, the class-images command."""

import math
from pathlib import Path

import pytest
from PIL import Image

from engine.cli import build_parser
from engine.config.io import default_config_dict, validate_config
from engine.config.paths import get_path, set_path
from gui.browse import FileRoots
from gui.views import regularization as view


def images(folder: Path, count: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        Image.new("RGB", (64, 64), (index * 7 % 256, 0, 0)).save(folder / f"img{index:03d}.png")
    return folder


# --- class folders ------------------------------------------------------------------------------------------------


def test_class_folder_names_follow_the_repeats_class_layout():
    assert view.class_folder_name(1, "dog") == "1_dog"
    assert view.class_folder_name(3.0, "  young   woman ") == "3_young woman"


@pytest.mark.parametrize(("repeats", "class_prompt", "words"), [
    (1, "  ", "class prompt"), (1, "cats/dogs", "'/'"), (0, "dog", "1 or more"), (1.5, "dog", "whole number"),
    (None, "dog", "whole number"),
])
def test_bad_class_folders_say_what_to_change(repeats, class_prompt, words):
    with pytest.raises(ValueError, match=words):
        view.class_folder_name(repeats, class_prompt)


def test_create_class_folder_creates_then_reuses_and_keeps_images(tmp_path):
    roots = FileRoots.from_paths([tmp_path], include_home=False)
    folder, message = view.create_class_folder(str(tmp_path / "reg"), 1, "dog", roots)
    assert folder == tmp_path / "reg" / "1_dog" and folder.is_dir() and "Created" in message
    images(folder, 2)
    again, message = view.create_class_folder(str(tmp_path / "reg"), 1, "dog", roots)
    assert again == folder and "already exists" in message and len(view.image_names(folder)) == 2


def test_create_class_folder_refuses_what_it_may_not_touch(tmp_path):
    roots = FileRoots.from_paths([tmp_path / "allowed"], include_home=False)
    with pytest.raises(ValueError, match="outside the folders"):
        view.create_class_folder(str(tmp_path), 1, "dog", roots)
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        view.create_class_folder(str(tmp_path / "allowed" / "file"), 1, "dog", roots)
    with pytest.raises(ValueError, match="regularization folder first"):
        view.create_class_folder(" ", 1, "dog", roots)
    assert not (tmp_path / "1_dog").exists()


def test_paths_outside_the_allowed_folders_are_named(tmp_path):
    roots = FileRoots.from_paths([tmp_path], include_home=False)
    assert view.outside_roots({"Training folder": "", "Regularization folder": str(tmp_path / "reg")}, roots) == ""
    refusal = view.outside_roots({"Training folder": str(tmp_path), "Regularization folder": "/elsewhere"}, roots)
    assert "Regularization folder: /elsewhere is outside the folders" in refusal


def test_read_class_folder_reads_repeats_and_class_from_the_name(tmp_path):
    assert view.read_class_folder(str(tmp_path / "reg" / "2_young woman")) == \
        view.ClassFolder(tmp_path / "reg", 2, "young woman")
    assert view.read_class_folder(str(tmp_path / "dogs")) is None
    assert view.read_class_folder(str(tmp_path / "0_dog")) is None  # never used by training
    assert view.read_class_folder("") is None


def test_new_images_are_the_ones_added_since_the_snapshot(tmp_path):
    folder = images(tmp_path / "1_dog", 3)
    before = view.image_names(folder)
    (folder / "0001.txt").write_text("a caption is not an image")
    images(folder, 4, start=3)
    assert view.new_images(folder, before, 10) == [str(folder / f"img{i:03d}.png") for i in range(3, 7)]
    assert view.new_images(folder, before, 2) == [str(folder / f"img{i:03d}.png") for i in (5, 6)]
    assert view.image_names(tmp_path / "missing") == set()


# --- balancing ----------------------------------------------------------------------------------------------------


def expected_balance(train_samples: int, reg_images: int, reg_repeats: int) -> tuple[int, int]:
    """sd-scripts' rule in closed form: (reg samples used, reg images unused) for one reg folder."""
    if reg_images * reg_repeats >= train_samples:  # the first pass reaches the target
        reached = math.ceil(train_samples / reg_repeats)
        return reached * reg_repeats, reg_images - reached
    return train_samples, 0  # later passes add one sample at a time until the target


@pytest.mark.parametrize(("train_images", "train_repeats", "reg_images", "reg_repeats"), [
    (4, 5, 30, 1),  # more class images than training samples: some unused
    (4, 5, 3, 1),  # fewer: each used several times
    (5, 1, 4, 2),  # the first pass overshoots by one repeat
    (2, 3, 6, 1),  # exactly enough
])
def test_balance_numbers_follow_sd_scripts_rule(tmp_path, train_images, train_repeats, reg_images, reg_repeats):
    images(tmp_path / "img" / f"{train_repeats}_sks dog", train_images)
    images(tmp_path / "reg" / f"{reg_repeats}_dog", reg_images)
    numbers = view.balance_numbers(str(tmp_path / "img"), str(tmp_path / "reg"))
    train_samples = train_images * train_repeats
    used, unused = expected_balance(train_samples, reg_images, reg_repeats)
    assert numbers == view.BalanceNumbers(train_images, train_samples, reg_images, used, unused, [])


def test_balance_counts_every_class_folder_of_the_regularization_folder(tmp_path):
    images(tmp_path / "img" / "10_sks dog", 3)
    images(tmp_path / "reg" / "1_dog", 12)
    images(tmp_path / "reg" / "1_cat", 10)
    numbers = view.balance_numbers(str(tmp_path / "img"), str(tmp_path / "reg"))
    assert (numbers.reg_images, numbers.reg_samples, numbers.reg_unused) == (22, *expected_balance(30, 22, 1))


def test_the_text_names_the_numbers_and_what_they_mean(tmp_path):
    unused = view.BalanceNumbers(train_images=4, train_samples=20, reg_images=30, reg_samples=20, reg_unused=10)
    text = view.balance_markdown(unused)
    assert "| Training samples (images × repeats) | **20** (4 images) |" in text
    assert "| Regularization images | **30** |" in text
    assert "| Regularization samples used | **20** |" in text and "| Unused regularization images | **10** |" in text
    assert "10 of the 30 regularization images are never used" in text
    assert "An epoch then has 40 samples" in text
    repeated = view.balance_summary(view.BalanceNumbers(4, 20, 8, 20, 0))
    assert "about 2.5 times per epoch" in repeated and "never used" not in repeated
    assert "used once per epoch" in view.balance_summary(view.BalanceNumbers(2, 6, 6, 6, 0))
    assert "no regularization images yet" in view.balance_summary(view.BalanceNumbers(4, 20, 0, 0, 0))


def test_without_a_training_folder_only_the_class_images_are_counted(tmp_path):
    images(tmp_path / "reg" / "1_dog", 5)
    numbers = view.balance_numbers("", str(tmp_path / "reg"))
    assert (numbers.train_images, numbers.reg_images, numbers.findings) == (0, 5, [])
    text = view.balance_markdown(numbers)
    assert "Choose the training folder" in text and "| Regularization samples used | **–** |" in text


def test_folder_problems_are_listed_with_what_to_do(tmp_path):
    images(tmp_path / "img" / "10_sks dog", 2)
    images(tmp_path / "reg" / "dog", 2)  # no repeat count: training skips it
    numbers = view.balance_numbers(str(tmp_path / "img"), str(tmp_path / "reg"))
    assert numbers.reg_images == 0
    text = view.balance_markdown(numbers)
    assert f"`{tmp_path / 'reg' / 'dog'}`" in text and "rename it to" in text


# --- parameters and generation ------------------------------------------------------------------------------------


def test_the_patch_sets_the_config_fields_it_names(tmp_path):
    data = default_config_dict()
    set_path(data, view.TRAIN_DIR, str(tmp_path / "img"))  # a regularization folder goes with a training folder
    for path, value in view.reg_patch(f" {tmp_path} ", 0.5).items():
        set_path(data, path, value)
    config = validate_config(data, check_packages=False)
    assert (config.dataset.reg_data_dir, config.training.prior_loss_weight) == (str(tmp_path), 0.5)
    assert view.field_help(view.PRIOR_LOSS_WEIGHT)  # the help text comes from the config model


def test_class_images_args_parse_as_the_engine_reads_them(tmp_path):
    request = view.GenerateRequest(model="/m/model.safetensors", out=str(tmp_path / "1_dog"),
                                   prompt=" a photo  of a dog ", negative="blurry", count=3, steps=20, width=640,
                                   height=0, seed=5)
    args = build_parser().parse_args(view.class_images_args(request))
    assert (args.command, args.model, args.prompt, args.negative, args.count, args.steps) == \
        ("class-images", "/m/model.safetensors", "a photo of a dog", "blurry", 3, 20)
    assert (args.out, args.width, args.height, args.seed, args.model_family) == \
        (tmp_path / "1_dog", 640, None, 5, "auto")
    random_seed = view.GenerateRequest(model="m", out="o", prompt="dog", seed=-1)
    assert build_parser().parse_args(view.class_images_args(random_seed)).seed is None


def test_the_configured_models_family_vae_and_prediction_are_passed_along():
    config = default_config_dict()
    for path, value in ((view.MODEL_PATH, "/m/sd2.safetensors"), ("model.model_family", "sd2"),
                        ("model.vae", "/m/vae.safetensors"), ("model.v_parameterization", True)):
        set_path(config, path, value)
    same = view.GenerateRequest(model="/m/sd2.safetensors", out="o", prompt="dog")
    args = build_parser().parse_args(view.class_images_args(same, config))
    assert (args.model_family, args.vae, args.v_parameterization) == ("sd2", "/m/vae.safetensors", True)
    other = view.GenerateRequest(model="/m/other", out="o", prompt="dog")
    args = build_parser().parse_args(view.class_images_args(other, config))
    assert (args.model_family, args.vae, args.v_parameterization) == ("auto", "", False)
    assert view.config_value(config, view.MODEL_PATH) == get_path(config, view.MODEL_PATH)
    assert view.config_value(None, view.MODEL_PATH) == ""


def test_an_sd3_models_text_encoder_files_and_masks_are_passed_along(tmp_path):
    config = default_config_dict()
    files = {path: str(tmp_path / f"{path.split('.')[-1]}.safetensors")
             for path in ("model.clip_l", "model.clip_g", "model.t5xxl")}
    for path, value in ((view.MODEL_PATH, "/m/sd3.5_medium.safetensors"), ("model.model_family", "sd3"),
                        (view.LG_MASK, True), (view.T5_LENGTH, 77), *files.items()):
        set_path(config, path, value)
    request = view.GenerateRequest(model="/m/sd3.5_medium.safetensors", out="o", prompt="dog")
    args = build_parser().parse_args(view.class_images_args(request, config))
    assert (args.model_family, args.clip_l, args.clip_g, args.t5xxl) == ("sd3", *files.values())
    assert (args.apply_lg_attn_mask, args.apply_t5_attn_mask, args.t5xxl_max_token_length) == (True, False, 77)
    assert set(view.generate_paths(request, config).values()) >= set(files.values())  # checked against the roots
    set_path(config, "model.model_family", "sdxl")  # an SD family loads no component files: none are passed
    assert not {"--clip-g", "--apply-lg-attn-mask"} & set(view.class_images_args(request, config))


@pytest.mark.parametrize(("changes", "words"), [
    ({"model": " "}, "base model"), ({"out": ""}, "class image folder"), ({"prompt": " "}, "prompt"),
    ({"count": 0}, "at least 1 image"), ({"steps": 0}, "at least 1 step"),
])
def test_an_incomplete_form_says_what_is_missing(changes, words):
    request = view.GenerateRequest(**({"model": "m", "out": "o", "prompt": "dog"} | changes))
    with pytest.raises(ValueError, match=words):
        view.class_images_args(request)
