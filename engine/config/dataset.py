"""The dataset section: sd-scripts' dataset config (general / datasets / subsets) plus the legacy folder form.

The schema and precedence follow sd-scripts exactly (spec §1.3-1.6), so a dataset TOML written for sd-scripts
loads here and ours loads there. Where sd-scripts would guess (mixing sources, unknown styles) we refuse with a
message that says what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import model_validator

from engine.config.base import StrictModel, setting
from engine.config.dataset_keys import (
    DATASET_INHERITABLE_GROUPS,
    DATASET_LEVEL_KEYS,
    SUBSET_INHERITABLE_GROUPS,
    SUBSET_INHERITABLE_KEYS,
    CaptionDropoutKeys,
    DatasetLevelKeys,
    DreamBoothKeys,
    SubsetLevelKeys,
    inheriting,
)

SubsetStyle = Literal["dreambooth", "finetune", "controlnet"]

# Keys that only make sense for one subset style; sd-scripts rejects them in the others as "extra keys".
_NOT_IN_FINETUNE = ("class_tokens", "caption_extension", "cache_info", "conditioning_data_dir")
_NOT_IN_CONTROLNET = ("class_tokens", "metadata_file", "alpha_mask")


class DatasetGeneral(DreamBoothKeys, CaptionDropoutKeys, SubsetLevelKeys, DatasetLevelKeys):
    """[general]: values for every dataset and subset that does not set its own (and for legacy folders).

    (Bases are listed in reverse so that fields appear dataset-level first, as pydantic orders them by reverse MRO.)
    """


if TYPE_CHECKING:
    # A type checker cannot see the fields of a model built by create_model() at import time. It is shown models
    # whose inherited keys read as Any instead: the names and bases stay checked, the values are pydantic's job.
    class _Inheriting(StrictModel):
        def __getattr__(self, name: str) -> Any: ...

    class _SubsetInherited(_Inheriting): ...

    class _DatasetInherited(_Inheriting): ...

    class GeneralInFile(_Inheriting): ...
else:
    _SubsetInherited = inheriting("_SubsetInherited", *SUBSET_INHERITABLE_GROUPS)
    _DatasetInherited = inheriting("_DatasetInherited", *DATASET_INHERITABLE_GROUPS)
    GeneralInFile = inheriting("GeneralInFile", *DATASET_INHERITABLE_GROUPS)


class Subset(_SubsetInherited):
    """One [[datasets.subsets]] entry: a folder of images (DreamBooth style) or a metadata file (fine-tuning)."""

    image_dir: str | None = setting(None, "Folder of training images.", widget="folder")
    is_reg: bool = setting(False, "Whether these are regularization (class) images.")
    alpha_mask: bool = setting(
        False, "Use each image's alpha channel as its loss mask: transparent areas are not learned.", advanced=True,
    )
    validation_only: bool = setting(
        False, "Use every image of this subset for the validation loss only, never for training (an Atelier key: "
        "sd-scripts has none, so its dataset TOML export leaves such subsets out).", advanced=True,
    )
    metadata_file: str | None = setting(
        None, "Fine-tuning metadata (.json or .jsonl) with captions and tags.", widget="file",
    )
    conditioning_data_dir: str | None = setting(
        None, "Folder of loss masks named like the images (white = learned, black = ignored); needs "
        "training.masked_loss.", widget="folder", advanced=True,
    )

    @property
    def style(self) -> SubsetStyle:
        if self.conditioning_data_dir is not None:
            return "controlnet"
        return "finetune" if self.metadata_file is not None else "dreambooth"

    @model_validator(mode="after")
    def _check_style_keys(self) -> Subset:
        style = self.style
        if style == "dreambooth" and not self.image_dir:
            raise ValueError("image_dir is required: the folder of images for this subset (or give metadata_file "
                             "for a fine-tuning subset)")
        if style == "finetune":
            misplaced = [key for key in _NOT_IN_FINETUNE if getattr(self, key) is not None]
            if self.is_reg:
                misplaced.append("is_reg")
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} cannot be used in a fine-tuning subset (one with "
                                 "metadata_file): captions come from the metadata and there are no regularization "
                                 "images. Remove them or drop metadata_file.")
        if self.is_reg and self.validation_only:
            raise ValueError("is_reg and validation_only cannot both be set: regularization images are never used "
                             "for the validation loss (as in sd-scripts); unset one of them")
        if style == "controlnet":
            misplaced = [key for key in _NOT_IN_CONTROLNET if getattr(self, key) not in (None, False)]
            if misplaced or not self.image_dir:
                raise ValueError("a subset with conditioning_data_dir needs image_dir and takes no "
                                 f"{', '.join(_NOT_IN_CONTROLNET)}")
        return self


class DatasetEntry(_DatasetInherited):
    """One [[datasets]] entry: dataset-level settings shared by its subsets (resolution, batch size, buckets)."""

    subsets: list[Subset] = setting(default_factory=list, description="The image folders or metadata files.")

    @model_validator(mode="after")
    def _check_subsets(self) -> DatasetEntry:
        if not self.subsets:
            raise ValueError("a dataset needs at least one [[datasets.subsets]] entry")
        styles = {subset.style for subset in self.subsets}
        if len(styles) > 1 and "controlnet" in styles:
            raise ValueError("subsets with conditioning_data_dir (mask folders) and subsets without cannot be mixed "
                             "in one dataset (sd-scripts' schema refuses it); put them in separate [[datasets]] "
                             "entries")
        if len(styles) > 1:
            raise ValueError("DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file) cannot be "
                             "mixed in one dataset; put them in separate [[datasets]] entries")
        return self


class DatasetFile(StrictModel):
    """A whole sd-scripts dataset TOML file: [general] and [[datasets]] only."""

    general: GeneralInFile = setting(default_factory=GeneralInFile, description="Defaults for every dataset.")
    datasets: list[DatasetEntry] = setting(default_factory=list, description="The datasets.")


class DatasetSection(StrictModel):
    """Where the images come from: one of a dataset TOML file, inline datasets, or legacy folders."""

    config_file: str = setting(
        "", "An sd-scripts dataset TOML file; when set, the folders and inline datasets below must be empty.",
        widget="file", advanced=True,
    )
    train_data_dir: str = setting(
        "", "Folder whose subfolders are named '<repeats>_<identifier> <class>', e.g. '10_sks dog'.",
        widget="folder",
    )
    reg_data_dir: str = setting(
        "", "Folder of regularization subfolders named '<repeats>_<class>', e.g. '1_dog'.", widget="folder",
    )
    in_json: str = setting(
        "", "Fine-tuning metadata file (.json/.jsonl) for the images in train_data_dir.", widget="file",
        advanced=True,
    )
    general: DatasetGeneral = setting(
        default_factory=DatasetGeneral, description="Settings for every dataset and subset that sets none itself.",
    )
    datasets: list[DatasetEntry] = setting(
        default_factory=list, description="Datasets written inline in sd-scripts' [[datasets]] form.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSection:
        sources = [name for name, used in (("config_file", self.config_file), ("datasets", self.datasets),
                                           ("train_data_dir", self.train_data_dir)) if used]
        if len(sources) > 1:
            raise ValueError(f"{' and '.join(sources)} are both set; use only one source of images (sd-scripts "
                             "would silently ignore the folders when a dataset config is given)")
        if self.reg_data_dir and not self.train_data_dir:
            raise ValueError("reg_data_dir needs train_data_dir: regularization folders go with legacy training "
                             "folders (with inline datasets, add a subset with is_reg = true instead)")
        if self.in_json and self.reg_data_dir:
            raise ValueError("in_json (fine-tuning metadata) cannot be combined with reg_data_dir: fine-tuning "
                             "uses no regularization images")
        return self

    def has_images_source(self) -> bool:
        return bool(self.config_file or self.datasets or self.train_data_dir)


# --- precedence ----------------------------------------------------------------------------------------------


@dataclass
class ResolvedSubset:
    """A subset with every key decided by sd-scripts' precedence: subset, dataset, general, run defaults."""

    params: dict[str, Any]
    path: str  # where it came from, for messages, e.g. "dataset.datasets[0].subsets[1]"
    # key -> the config path of the level whose value won, so messages point at the line to change.
    sources: dict[str, str] = field(default_factory=dict)

    def source_of(self, key: str) -> str:
        return self.sources.get(key, f"{self.path}.{key}")


@dataclass
class ResolvedDataset:
    params: dict[str, Any]
    subsets: list[ResolvedSubset] = field(default_factory=list)
    path: str = ""


def _first_set(key: str, *levels: tuple[str, StrictModel | None]) -> tuple[Any, str]:
    """The first value that is not None, and the path of the level it came from."""
    for path, level in levels:
        value = None if level is None else getattr(level, key, None)
        if value is not None:
            return value, f"{path}.{key}"
    return None, f"{levels[-1][0]}.{key}"


def resolve_datasets(
    defaults: DatasetGeneral, datasets: list[DatasetEntry], file_general: StrictModel | None = None,
    source: str = "dataset",
) -> list[ResolvedDataset]:
    """Apply sd-scripts' precedence (spec §1.4): the first level that sets a key wins.

    Args:
        defaults: The run's [dataset.general]; plays the role of sd-scripts' command-line arguments.
        datasets: The [[datasets]] entries (inline, or read from a dataset TOML).
        file_general: The [general] table of a dataset TOML file, if the datasets came from one.
        source: How messages name where the datasets are written: "dataset" for inline ones, or a file's name.
    """
    file_level = (f"{source}.general", file_general)
    run_level = ("dataset.general", defaults)
    resolved = []
    for index, entry in enumerate(datasets):
        path = f"{source}.datasets[{index}]"
        dataset = ResolvedDataset(
            params={key: _first_set(key, (path, entry), file_level, run_level)[0] for key in DATASET_LEVEL_KEYS},
            path=path,
        )
        for sub_index, subset in enumerate(entry.subsets):
            subset_path = f"{path}.subsets[{sub_index}]"
            found = {key: _first_set(key, (subset_path, subset), (path, entry), file_level, run_level)
                     for key in SUBSET_INHERITABLE_KEYS}
            params = {key: value for key, (value, _) in found.items()}
            for key in ("image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir"):
                params[key] = getattr(subset, key)
            params["validation_only"] = subset.validation_only
            sources = {key: source for key, (_, source) in found.items()}
            dataset.subsets.append(ResolvedSubset(params, subset_path, sources))
        resolved.append(dataset)
    return resolved


def resolve_general_only(section: DatasetSection, path: str = "dataset.general") -> ResolvedDataset:
    """The effective settings of legacy-folder subsets, which inherit everything from [general].

    With in_json the folder is one fine-tuning subset (sd-scripts builds {image_dir, metadata_file} the same way).
    """
    params = section.general.model_dump()
    subset = {key: params[key] for key in SUBSET_INHERITABLE_KEYS}
    subset.update(image_dir=section.train_data_dir or None, metadata_file=section.in_json or None, is_reg=False,
                  alpha_mask=False, conditioning_data_dir=None)
    return ResolvedDataset(
        params={key: params[key] for key in DATASET_LEVEL_KEYS},
        subsets=[ResolvedSubset(subset, path, {key: f"{path}.{key}" for key in SUBSET_INHERITABLE_KEYS})],
        path=path,
    )


# --- the legacy folder convention (spec §1.6) ----------------------------------------------------------------

_LEGACY_NAME = re.compile(r"^(?P<repeats>-?\d+)_(?P<tokens>.*)$")


@dataclass(frozen=True)
class LegacyFolderName:
    repeats: int
    class_tokens: str


def parse_legacy_folder_name(name: str) -> LegacyFolderName | None:
    """Parse '<repeats>_<identifier> <class>' the way sd-scripts does; None when there is no leading number.

    '10_sks dog' gives (10, 'sks dog'); '5_my_chara girl' gives (5, 'my_chara girl'); 'sks dog' gives None.
    A repeat count below 1 is returned as is: callers report it (sd-scripts skips such folders).
    """
    match = _LEGACY_NAME.match(name)
    if match is None:
        return None
    return LegacyFolderName(int(match["repeats"]), match["tokens"])
