"""The sd-scripts dataset TOML export: sd-scripts' per-level key sets, float literals, and the same subsets back.

The key sets below are sd-scripts' schema restated from the spec (§1.3, library/config_util.py at 48d368fa), not
derived from our models, so a key the export writes where sd-scripts refuses it fails here.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from engine.config.dataset import DatasetFile, DatasetGeneral, DatasetSection, resolve_datasets
from engine.config.dataset_export import SD_SCRIPTS_DEFAULTS, dataset_toml, export_document

toml = pytest.importorskip("toml")  # the parser sd-scripts reads dataset configs with

# sd-scripts' schema, per level (train_network.py: DreamBooth, fine-tuning, ControlNet/masks and dropout on).
DATASET_ASCENDABLE = {"batch_size", "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                      "bucket_reso_steps", "bucket_no_upscale", "network_multiplier", "validation_seed",
                      "validation_split", "resize_interpolation"}
SUBSET_ASCENDABLE = {"num_repeats", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
                     "secondary_separator", "enable_wildcard", "color_aug", "flip_aug", "face_crop_aug_range",
                     "random_crop", "caption_prefix", "caption_suffix", "token_warmup_min", "token_warmup_step",
                     "custom_attributes", "resize_interpolation"}
DROPOUT = {"caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate"}
DB_ASCENDABLE = {"caption_extension", "class_tokens", "cache_info"}
CN_ASCENDABLE = {"caption_extension", "cache_info"}
GENERAL = DATASET_ASCENDABLE | SUBSET_ASCENDABLE | DROPOUT | DB_ASCENDABLE | CN_ASCENDABLE
GENERAL_FINE_TUNE_PY = DATASET_ASCENDABLE | SUBSET_ASCENDABLE | DROPOUT  # fine_tune.py: no DreamBooth keys
DATASET = {
    "dreambooth": DATASET_ASCENDABLE | SUBSET_ASCENDABLE | DROPOUT | DB_ASCENDABLE,
    "finetune": DATASET_ASCENDABLE | SUBSET_ASCENDABLE | DROPOUT,
    "controlnet": DATASET_ASCENDABLE | SUBSET_ASCENDABLE | DROPOUT | CN_ASCENDABLE,
}
SUBSET = {
    "dreambooth": SUBSET_ASCENDABLE | DROPOUT | DB_ASCENDABLE | {"image_dir", "is_reg", "alpha_mask"},
    "finetune": SUBSET_ASCENDABLE | DROPOUT | {"metadata_file", "image_dir", "alpha_mask"},
    "controlnet": SUBSET_ASCENDABLE | DROPOUT | CN_ASCENDABLE | {"image_dir", "conditioning_data_dir"},
}
# What sd-scripts uses when neither the file nor its command line sets a key: argparse defaults (spec §1.3).
COMMAND_LINE_DEFAULTS = {
    "batch_size": 1, "resolution": None, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "bucket_no_upscale": False, "network_multiplier": 1.0, "validation_seed": None,
    "validation_split": 0.0, "num_repeats": 1, "shuffle_caption": False, "caption_separator": ",", "keep_tokens": 0,
    "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False, "color_aug": False,
    "flip_aug": False, "face_crop_aug_range": None, "random_crop": False, "caption_prefix": None,
    "caption_suffix": None, "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": None,
    "resize_interpolation": None, "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0, "caption_extension": ".caption", "class_tokens": None, "cache_info": False,
}
# Where sd-scripts' schema says `float`, an int literal is refused.
FLOAT_ONLY = {"network_multiplier", "validation_split"}

# A value other than every default, for each key a level may hold.
COMMON = {
    "num_repeats": 3, "shuffle_caption": True, "caption_separator": ";", "keep_tokens": 2,
    "keep_tokens_separator": "|||", "secondary_separator": ";;;", "enable_wildcard": True, "color_aug": True,
    "flip_aug": True, "face_crop_aug_range": [2, 4], "random_crop": True, "caption_prefix": "sks",
    "caption_suffix": "photo", "token_warmup_min": 2, "token_warmup_step": 0.5,
    "custom_attributes": {"diff_output_preservation": True}, "resize_interpolation": "lanczos",
    "caption_dropout_rate": 0.1, "caption_dropout_every_n_epochs": 3, "caption_tag_dropout_rate": 0.2,
}
DATASET_LEVEL = {
    "batch_size": 2, "resolution": [768, 512], "enable_bucket": False, "min_bucket_reso": 320,
    "max_bucket_reso": 1536, "bucket_reso_steps": 32, "bucket_no_upscale": False, "network_multiplier": 1,
    "validation_seed": 7, "validation_split": 0.25,
}
DREAMBOOTH = {"caption_extension": ".caption", "class_tokens": "sks dog", "cache_info": True}


def every_key_section() -> DatasetSection:
    """Datasets of each style with every key it may hold set, at the dataset level and in a subset."""
    return DatasetSection.model_validate({
        "general": {**COMMON, **DATASET_LEVEL, "caption_extension": ".tags", "class_tokens": "dog",
                    "cache_info": True},
        "datasets": [
            {**DATASET_LEVEL, **COMMON, **DREAMBOOTH, "subsets": [
                {**COMMON, **DREAMBOOTH, "image_dir": "/data/a", "is_reg": True, "alpha_mask": True},
                {"image_dir": "/data/b"}]},
            {**DATASET_LEVEL, **COMMON, "subsets": [
                {**COMMON, "metadata_file": "/data/meta.json", "image_dir": "/data/c", "alpha_mask": True}]},
            {**DATASET_LEVEL, **COMMON, "caption_extension": ".txt", "cache_info": True, "subsets": [
                {**COMMON, "caption_extension": ".txt", "cache_info": True, "image_dir": "/data/d",
                 "conditioning_data_dir": "/data/d_masks"}]},
        ],
    })


def sd_scripts_reads(text: str) -> dict:
    """The file as sd-scripts' parser reads it (and the standard parser agrees)."""
    data = toml.loads(text)
    assert data == tomllib.loads(text)
    return data


def test_every_level_holds_only_keys_sd_scripts_allows_there():
    data = sd_scripts_reads(dataset_toml(every_key_section()))
    assert set(data) == {"general", "datasets"}
    assert set(data["general"]) <= GENERAL
    for dataset, style in zip(data["datasets"], ("dreambooth", "finetune", "controlnet"), strict=True):
        assert set(dataset) - {"subsets"} <= DATASET[style], style
        for subset in dataset["subsets"]:
            assert set(subset) <= SUBSET[style], style


def test_keys_a_style_reads_are_all_written():
    data = sd_scripts_reads(dataset_toml(every_key_section()))
    dreambooth, finetune, controlnet = data["datasets"]
    assert set(dreambooth) - {"subsets"} == DATASET["dreambooth"]
    assert set(dreambooth["subsets"][0]) == SUBSET["dreambooth"]
    assert set(finetune["subsets"][0]) == SUBSET["finetune"]
    assert set(controlnet["subsets"][0]) == SUBSET["controlnet"]


def test_float_keys_are_float_literals():
    data = sd_scripts_reads(dataset_toml(every_key_section()))
    for table in (data["general"], *data["datasets"]):
        for key in FLOAT_ONLY & set(table):
            assert isinstance(table[key], float), key
    face_crop = data["datasets"][0]["subsets"][0]["face_crop_aug_range"]
    assert face_crop == [2.0, 4.0] and all(isinstance(side, float) for side in face_crop)
    assert "network_multiplier = 1.0" in dataset_toml(every_key_section())


def test_general_writes_what_differs_from_sd_scripts_defaults():
    section = DatasetSection.model_validate({"datasets": [{"subsets": [{"image_dir": "/data/a"}]}]})
    general = sd_scripts_reads(dataset_toml(section))["general"]
    # Atelier's defaults that are not sd-scripts' command-line defaults, and the resolution it has none for.
    assert general == {"resolution": 512, "enable_bucket": True, "max_bucket_reso": 2048, "bucket_no_upscale": True,
                       "caption_extension": ".txt"}


def test_fine_tuning_only_export_has_no_dreambooth_keys_in_general():
    """fine_tune.py's [general] refuses caption_extension, class_tokens and cache_info."""
    section = DatasetSection.model_validate({
        "general": {"caption_extension": ".tags", "class_tokens": "dog", "cache_info": True},
        "datasets": [{"subsets": [{"metadata_file": "/data/meta.json"}]}]})
    assert set(sd_scripts_reads(dataset_toml(section))["general"]) <= GENERAL_FINE_TUNE_PY


def test_sd_scripts_defaults_are_the_spec_s_for_every_general_key():
    assert set(SD_SCRIPTS_DEFAULTS) == set(DatasetGeneral.model_fields)
    assert dict(SD_SCRIPTS_DEFAULTS) == COMMAND_LINE_DEFAULTS


def resolved_params(general: DatasetGeneral, datasets: list, file_general=None) -> list[list[dict]]:
    return [[subset.params for subset in dataset.subsets] + [dataset.params]
            for dataset in resolve_datasets(general, datasets, file_general)]


def _read_by_style(params: dict, style: str) -> dict:
    """The resolved keys a subset of this style reads (a fine-tuning subset has no caption files or class tokens,
    a ControlNet subset no class tokens)."""
    ignored = {"finetune": DB_ASCENDABLE, "controlnet": {"class_tokens"}}.get(style, set())
    return {key: value for key, value in params.items() if key not in ignored}


@pytest.mark.parametrize("section", [
    pytest.param(every_key_section(), id="every-key"),
    pytest.param(DatasetSection.model_validate({
        "general": {"resolution": 1024, "num_repeats": 4, "caption_extension": ".caption", "flip_aug": True,
                    "network_multiplier": 0.5},
        "datasets": [{"batch_size": 2, "subsets": [{"image_dir": "/data/a", "class_tokens": "sks dog"},
                                                   {"image_dir": "/data/reg", "is_reg": True, "num_repeats": 1}]},
                     {"resolution": [640, 512], "subsets": [{"image_dir": "/data/a", "keep_tokens": 1}]}]}),
        id="inheriting"),
])
def test_exported_file_resolves_to_the_same_subsets(section: DatasetSection):
    """Read back as sd-scripts would (our DatasetFile schema; its command-line defaults below [general]), every
    subset gets the values Atelier trains with."""
    parsed = DatasetFile.model_validate(sd_scripts_reads(dataset_toml(section)))
    command_line = DatasetGeneral.model_validate(
        {key: value for key, value in COMMAND_LINE_DEFAULTS.items() if value is not None})
    ours = resolve_datasets(section.general, section.datasets)
    theirs = resolve_datasets(command_line, parsed.datasets, parsed.general)
    assert len(ours) == len(theirs)
    for mine, exported, entry in zip(ours, theirs, section.datasets, strict=True):
        style = entry.subsets[0].style
        assert exported.params == mine.params
        assert [_read_by_style(s.params, style) for s in exported.subsets] == \
            [_read_by_style(s.params, style) for s in mine.subsets]


def test_relative_paths_are_written_absolute_against_the_config_folder(tmp_path: Path):
    section = DatasetSection.model_validate({"datasets": [
        {"subsets": [{"image_dir": "img/10_dog"}]},
        {"subsets": [{"metadata_file": "meta.json", "image_dir": "/abs/img"}]}]})
    datasets = export_document(section, base_dir=tmp_path)["datasets"]
    assert datasets[0]["subsets"][0]["image_dir"] == str(tmp_path / "img/10_dog")
    assert datasets[1]["subsets"][0] == {"metadata_file": str(tmp_path / "meta.json"), "image_dir": "/abs/img"}


def test_square_resolution_is_one_number():
    section = DatasetSection.model_validate({"datasets": [{"resolution": [768, 768], "subsets": [
        {"image_dir": "/data/a"}]}]})
    assert sd_scripts_reads(dataset_toml(section))["datasets"][0]["resolution"] == 768


@pytest.mark.parametrize(("data", "says"), [
    ({"train_data_dir": "/data/img"}, "no inline datasets"),
    ({"config_file": "/data/dataset.toml"}, "give sd-scripts that file"),
])
def test_nothing_to_export_says_why(data: dict, says: str):
    with pytest.raises(ValueError, match=says):
        dataset_toml(DatasetSection.model_validate(data))


def test_text_in_quotes_and_odd_keys_survive():
    section = DatasetSection.model_validate({"datasets": [{"subsets": [{
        "image_dir": "C:\\data\\img", "caption_prefix": 'a "b" \\ c', "custom_attributes": {"a key": [1, 2]}}]}]})
    subset = sd_scripts_reads(dataset_toml(section))["datasets"][0]["subsets"][0]
    assert subset == {"image_dir": "C:\\data\\img", "caption_prefix": 'a "b" \\ c',
                      "custom_attributes": {"a key": [1, 2]}}
