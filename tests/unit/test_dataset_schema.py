"""sd-scripts' dataset-config schema: levels, styles, precedence and the legacy folder convention."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.config.dataset import (
    DatasetFile,
    DatasetGeneral,
    parse_legacy_folder_name,
    resolve_datasets,
)
from engine.config.dataset_keys import DATASET_LEVEL_KEYS, SUBSET_INHERITABLE_KEYS
from engine.config.errors import problems_from_validation_error


def file_problems(data: dict) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        DatasetFile.model_validate(data)
    return {p.path: p.message for p in problems_from_validation_error(caught.value, DatasetFile)}


def test_keys_and_levels_match_sd_scripts():
    assert set(DATASET_LEVEL_KEYS) == {"batch_size", "resolution", "enable_bucket", "min_bucket_reso",
                                       "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
                                       "network_multiplier", "validation_seed", "validation_split"}
    assert set(SUBSET_INHERITABLE_KEYS) >= {
        "num_repeats", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
        "secondary_separator", "enable_wildcard", "color_aug", "flip_aug", "face_crop_aug_range", "random_crop",
        "caption_prefix", "caption_suffix", "token_warmup_min", "token_warmup_step", "custom_attributes",
        "resize_interpolation", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
        "caption_extension", "class_tokens", "cache_info"}


def test_dataset_level_key_in_a_subset_is_rejected():
    problems = file_problems({"datasets": [{"subsets": [{"image_dir": "a", "batch_size": 2}]}]})
    assert problems == {"datasets[0].subsets[0].batch_size": "unknown key; did you mean 'general.batch_size'?"}


def test_subset_only_key_at_dataset_level_is_rejected():
    problems = file_problems({"datasets": [{"image_dir": "a", "subsets": [{"image_dir": "a"}]}]})
    assert "datasets[0].image_dir" in problems


def test_unknown_top_level_table_is_rejected():
    assert "dataset" in file_problems({"dataset": []})


def test_dreambooth_subset_needs_image_dir():
    problems = file_problems({"datasets": [{"subsets": [{"num_repeats": 2}]}]})
    assert "image_dir is required" in problems["datasets[0].subsets[0]"]


def test_finetune_subset_refuses_dreambooth_keys():
    problems = file_problems({"datasets": [{"subsets": [{"metadata_file": "m.json", "class_tokens": "x",
                                                        "is_reg": True}]}]})
    message = problems["datasets[0].subsets[0]"]
    assert "class_tokens" in message and "is_reg" in message


def test_styles_cannot_mix_in_one_dataset():
    problems = file_problems({"datasets": [{"subsets": [{"image_dir": "a"}, {"metadata_file": "m.json"}]}]})
    assert "cannot be mixed" in problems["datasets[0]"]


def test_dataset_needs_a_subset():
    assert "at least one" in file_problems({"datasets": [{"resolution": 512}]})["datasets[0]"]


def test_resolution_forms():
    assert DatasetGeneral(resolution=768).resolution == [768, 768]
    assert DatasetGeneral(resolution=[768, 512]).resolution == [768, 512]
    with pytest.raises(ValidationError):
        DatasetGeneral(resolution=[512, 512, 3])
    with pytest.raises(ValidationError):
        DatasetGeneral(resolution=32)


def test_face_crop_range_needs_two_numbers():
    assert "datasets[0].subsets[0].face_crop_aug_range" in file_problems(
        {"datasets": [{"subsets": [{"image_dir": "a", "face_crop_aug_range": [2.0]}]}]})


def test_precedence_subset_then_dataset_then_file_general_then_run_defaults():
    file = DatasetFile.model_validate({
        "general": {"shuffle_caption": True, "keep_tokens": 2, "caption_extension": ".caption"},
        "datasets": [{"resolution": 768, "keep_tokens": 3, "subsets": [
            {"image_dir": "a", "keep_tokens": 4},
            {"image_dir": "b"},
        ]}],
    })
    run_defaults = DatasetGeneral(flip_aug=True, keep_tokens=1, batch_size=3)
    (dataset,) = resolve_datasets(run_defaults, file.datasets, file.general, source="[d.toml]")
    first, second = dataset.subsets
    assert first.params["keep_tokens"] == 4
    assert first.source_of("keep_tokens") == "[d.toml].datasets[0].subsets[0].keep_tokens"
    assert second.params["keep_tokens"] == 3
    assert second.source_of("keep_tokens") == "[d.toml].datasets[0].keep_tokens"
    assert second.params["shuffle_caption"] is True
    assert second.source_of("shuffle_caption") == "[d.toml].general.shuffle_caption"
    assert second.params["caption_extension"] == ".caption"
    assert second.params["flip_aug"] is True and second.source_of("flip_aug") == "dataset.general.flip_aug"
    assert dataset.params["resolution"] == [768, 768]
    assert dataset.params["batch_size"] == 3


def test_a_level_cannot_unset_a_value_set_above():
    # sd-scripts' rule: the first value that is not None wins, so a lower level can never "unset" a key.
    file = DatasetFile.model_validate({"general": {"caption_prefix": "sks"},
                                       "datasets": [{"subsets": [{"image_dir": "a"}]}]})
    (dataset,) = resolve_datasets(DatasetGeneral(), file.datasets, file.general)
    assert dataset.subsets[0].params["caption_prefix"] == "sks"


@pytest.mark.parametrize(("name", "expected"), [
    ("10_sks dog", (10, "sks dog")),
    ("5_my_chara girl", (5, "my_chara girl")),
    ("0_x", (0, "x")),
    ("1_", (1, "")),
    ("sks dog", None),
    ("dog_10", None),
    ("10sks", None),
])
def test_legacy_folder_names(name, expected):
    parsed = parse_legacy_folder_name(name)
    assert (parsed.repeats, parsed.class_tokens) == expected if expected else parsed is None


def test_legacy_subsets_take_only_valid_direct_subfolders(tmp_path):
    from engine.data.legacy import legacy_subset_params

    for folder in ("train/10_sks dog", "train/sks cat", "train/0_zero", "train/3_a/2_nested", "reg/1_dog"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "train" / "5_file.png").write_bytes(b"")
    train, findings = legacy_subset_params(tmp_path / "train", is_reg=False, base={})
    reg, _ = legacy_subset_params(tmp_path / "reg", is_reg=True, base={})
    summary = [(p["num_repeats"], p["class_tokens"], p["is_reg"]) for _, p in train + reg]
    assert summary == [(10, "sks dog", False), (3, "a", False), (1, "dog", True)]
    assert sorted(Path(f.where).name for f in findings if f.code == "folder-name") == ["0_zero", "sks cat"]
