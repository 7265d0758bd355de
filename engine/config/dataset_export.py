"""The dataset section written as an sd-scripts dataset TOML (`--dataset_config`) that trains the same there.

sd-scripts validates the file with a strict schema (spec §1.3): each level ([general], [[datasets]],
[[datasets.subsets]]) accepts only its own keys, which also depend on the subset style (DreamBooth folder,
fine-tuning metadata, ControlNet/mask folder), and some keys must be float literals (`1` is refused where it wants
`1.0`). Its precedence is subset, dataset, [general], then its command-line defaults (§1.4), which are not always
ours; so every value of our [dataset.general] that differs from sd-scripts' command-line default is written into
[general], and a run of sd-scripts with this file and no dataset options on its command line resolves every subset
to the values Atelier uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from engine.config.dataset import DatasetEntry, DatasetSection, Subset, SubsetStyle
from engine.config.dataset_keys import (
    CAPTION_DROPOUT_KEYS,
    DATASET_LEVEL_KEYS,
    DreamBoothKeys,
    SubsetLevelKeys,
    keys_of,
)

# sd-scripts' values for the keys of [general] when neither the file nor its command line sets them: its argparse
# defaults, or the dataclass default where there is no option (spec §1.3). `resolution` has none (None).
SD_SCRIPTS_DEFAULTS: Mapping[str, Any] = {
    # dataset level
    "batch_size": 1, "resolution": None, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "bucket_no_upscale": False, "network_multiplier": 1.0, "validation_seed": None,
    "validation_split": 0.0,
    # every level
    "num_repeats": 1, "shuffle_caption": False, "caption_separator": ",", "keep_tokens": 0,
    "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False, "color_aug": False,
    "flip_aug": False, "face_crop_aug_range": None, "random_crop": False, "caption_prefix": None,
    "caption_suffix": None, "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": None,
    "resize_interpolation": None,
    "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
    # DreamBooth and ControlNet styles
    "caption_extension": ".caption", "class_tokens": None, "cache_info": False,
}

# Keys sd-scripts refuses unless they are float literals (its schema checks `float`, and an int is not one).
FLOAT_KEYS = frozenset({"network_multiplier", "validation_split", "face_crop_aug_range"})

_COMMON_KEYS = (*keys_of(SubsetLevelKeys), *CAPTION_DROPOUT_KEYS)
# The style keys that may be written at every level (sd-scripts' DB_/CN_SUBSET_ASCENDABLE_SCHEMA); fine-tuning
# datasets read captions from their metadata and take none of them.
_STYLE_ASCENDABLE: Mapping[SubsetStyle, tuple[str, ...]] = {
    "dreambooth": keys_of(DreamBoothKeys),
    "finetune": (),
    "controlnet": ("caption_extension", "cache_info"),
}
# Keys of one subset only (sd-scripts' *_SUBSET_DISTINCT_SCHEMA, with alpha_mask where its schema allows it).
_STYLE_DISTINCT: Mapping[SubsetStyle, tuple[str, ...]] = {
    "dreambooth": ("image_dir", "is_reg", "alpha_mask"),
    "finetune": ("metadata_file", "image_dir", "alpha_mask"),
    "controlnet": ("image_dir", "conditioning_data_dir"),
}
_PATH_KEYS = ("image_dir", "metadata_file", "conditioning_data_dir")

HEADER = ("# sd-scripts dataset config (--dataset_config), written by Atelier.\n"
          "# [general] holds the settings that differ from sd-scripts' command-line defaults. A value written here\n"
          "# wins over sd-scripts' command line; dataset options given there apply only to keys left out here.\n")


def general_keys(styles: Iterable[SubsetStyle]) -> tuple[str, ...]:
    """The keys [general] may hold for datasets of these styles."""
    style_keys = {key for style in styles for key in _STYLE_ASCENDABLE[style]}
    return (*DATASET_LEVEL_KEYS, *_COMMON_KEYS, *(key for key in keys_of(DreamBoothKeys) if key in style_keys))


def dataset_keys(style: SubsetStyle) -> tuple[str, ...]:
    """The keys a [[datasets]] entry of this style may hold (besides `subsets`)."""
    return (*DATASET_LEVEL_KEYS, *_COMMON_KEYS, *_STYLE_ASCENDABLE[style])


def subset_keys(style: SubsetStyle) -> tuple[str, ...]:
    """The keys a [[datasets.subsets]] entry of this style may hold."""
    return (*_STYLE_DISTINCT[style], *_COMMON_KEYS, *_STYLE_ASCENDABLE[style])


def dataset_style(entry: DatasetEntry) -> SubsetStyle:
    """A dataset's style as sd-scripts classifies it; DatasetEntry already refuses mixed subsets."""
    return entry.subsets[0].style


def _toml_value(key: str, value: Any) -> Any:
    if key in FLOAT_KEYS:
        return [float(item) for item in value] if isinstance(value, list) else float(value)
    if key == "resolution" and isinstance(value, list) and value[0] == value[1]:
        return value[0]  # a square as one number, as users write it
    return value


def _absolute(value: str, base_dir: Path | None) -> str:
    # sd-scripts reads paths from its working folder, ours from the config's folder: write them absolute.
    path = Path(value).expanduser()
    return str(path if path.is_absolute() or base_dir is None else base_dir / path)


def _table(values: Mapping[str, Any], keys: Iterable[str], base_dir: Path | None) -> dict[str, Any]:
    """The values of `keys` that are set, in sd-scripts' form. Flags that are off are left out: off is every
    style's default, and a style that has no such flag would refuse the key."""
    table = {}
    for key in keys:
        value = values.get(key)
        if value is None or (value is False and key in ("is_reg", "alpha_mask")):
            continue
        table[key] = _absolute(value, base_dir) if key in _PATH_KEYS else _toml_value(key, value)
    return table


def _general_table(section: DatasetSection, styles: set[SubsetStyle]) -> dict[str, Any]:
    values = section.general.model_dump()
    differing = [key for key in general_keys(styles) if key not in SD_SCRIPTS_DEFAULTS
                 or values[key] != SD_SCRIPTS_DEFAULTS[key]]
    return _table(values, differing, None)


def _subset_table(subset: Subset, style: SubsetStyle, where: str, base_dir: Path | None) -> dict[str, Any]:
    if style == "controlnet" and subset.is_reg:
        raise ValueError(f"{where}: sd-scripts has no regularization subsets with conditioning_data_dir; set "
                         "is_reg = false or remove conditioning_data_dir")
    return _table(subset.model_dump(), subset_keys(style), base_dir)


def export_document(section: DatasetSection, base_dir: str | Path | None = None) -> dict[str, Any]:
    """The dataset TOML as a dict: {"general": {...}, "datasets": [{..., "subsets": [...]}]}.

    Args:
        section: The run's dataset section; its inline datasets are written.
        base_dir: The folder relative paths are relative to (the config file's folder); they are written absolute.

    Raises:
        ValueError: the section has no inline datasets (the message says what to do instead), or a subset that
            sd-scripts cannot express.
    """
    if section.config_file:
        raise ValueError("dataset.config_file already names a dataset TOML; give sd-scripts that file as it is")
    if not section.datasets:
        raise ValueError("there are no inline datasets to export: add a dataset and its subsets first (legacy "
                         "folders in dataset.train_data_dir are read by sd-scripts' --train_data_dir as they are)")
    base = Path(base_dir) if base_dir is not None else None
    styles = {dataset_style(entry) for entry in section.datasets}
    datasets = []
    for index, entry in enumerate(section.datasets):
        style = dataset_style(entry)
        table = _table(entry.model_dump(exclude={"subsets"}), dataset_keys(style), base)
        # sd-scripts has no validation-only subsets: written there they would train, so they are left out.
        table["subsets"] = [_subset_table(subset, style, f"dataset.datasets[{index}].subsets[{sub}]", base)
                            for sub, subset in enumerate(entry.subsets) if not subset.validation_only]
        if table["subsets"]:
            datasets.append(table)
    return {"general": _general_table(section, styles), "datasets": datasets}


def _scalar(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()  # tomli_w's escaping and float forms


def _inline(value: Any) -> str:
    """One value on one line; tables (custom_attributes) as inline tables, so they stay inside their subset."""
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(key)} = {_inline(item)}" for key, item in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    return _scalar(value)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else _scalar(key)


def _lines(table: Mapping[str, Any]) -> list[str]:
    return [f"{_key(key)} = {_inline(value)}" for key, value in table.items()]


def dataset_toml(section: DatasetSection, base_dir: str | Path | None = None) -> str:
    """The inline datasets of `section` as the text of an sd-scripts dataset TOML (see `export_document`): a
    [general] table, then each [[datasets]] entry followed by its [[datasets.subsets]] entries."""
    document = export_document(section, base_dir)
    lines = [HEADER, "[general]", *_lines(document["general"])]
    for dataset in document["datasets"]:
        lines += ["", "[[datasets]]", *_lines({key: value for key, value in dataset.items() if key != "subsets"})]
        for subset in dataset["subsets"]:
            lines += ["", "[[datasets.subsets]]", *_lines(subset)]
    return "\n".join(lines) + "\n"
