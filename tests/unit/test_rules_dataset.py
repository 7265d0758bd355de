"""The dataset keys' rules (engine.config.rules_dataset): each refusal names the field and says what to do."""

from __future__ import annotations

import pytest

from engine.config.errors import ConfigError
from engine.config.io import deep_merge, default_config_dict, validate_config


def _config(**sections) -> dict:
    data = default_config_dict()
    data["model"]["pretrained_model_name_or_path"] = "model.safetensors"
    data["dataset"]["train_data_dir"] = "img"
    return deep_merge(data, sections)


def _inline(subset: dict, **dataset) -> dict:
    return {"train_data_dir": "", "datasets": [{**dataset, "subsets": [{"image_dir": "img", **subset}]}]}


def errors_for(data: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(data, check_packages=False)
    return {problem.path: problem.message for problem in caught.value.problems}


@pytest.mark.parametrize(("data", "path", "fragment"), [
    (_config(training={"masked_loss": True}), "training.masked_loss", "no subset gives masks"),
    (_config(training={"masked_loss": True}, dataset=_inline({})), "training.masked_loss", "conditioning_data_dir"),
    (_config(dataset=_inline({"conditioning_data_dir": "masks"})),
     "dataset.datasets[0].subsets[0].conditioning_data_dir", "training.masked_loss = true"),
    (_config(saving={"keep_best": True, "save_every_n_epochs": 1}), "saving.keep_best", "validation_split"),
    (_config(dataset=_inline({"is_reg": True, "validation_only": True})), "dataset.datasets[0].subsets[0]",
     "cannot both be set"),
    (_config(method="dreambooth", dataset={"general": {"network_multiplier": 0.5}}),
     "dataset.general.network_multiplier", "trains no network"),
    (_config(method="textual_inversion", embedding={"token_string": "sks", "init_word": "dog"},
             dataset=_inline({}, network_multiplier=0.0)), "dataset.datasets[0].network_multiplier", "method 'lora'"),
    (_config(dataset=_inline({"custom_attributes": {"prior_weight": 1}})),
     "dataset.datasets[0].subsets[0].custom_attributes", "diff_output_preservation"),
    (_config(dataset=_inline({"custom_attributes": {"diff_output_preservation": "yes"}})),
     "dataset.datasets[0].subsets[0].custom_attributes", "true or false"),
    (_config(method="dreambooth", dataset=_inline({"custom_attributes": {"diff_output_preservation": True}})),
     "dataset.datasets[0].subsets[0].custom_attributes", "no network"),
    (_config(training={"cache_latents": False}, dataset={"general": {"face_crop_aug_range": [2.0, 4.0]}}),
     "dataset.general.face_crop_aug_range", "enable_bucket = false"),
    (_config(dataset={"general": {"face_crop_aug_range": [2.0, 4.0], "enable_bucket": False}}),
     "dataset.general.face_crop_aug_range", "cached latents"),
    (_config(training={"cache_latents": False},
             dataset={"general": {"face_crop_aug_range": [4.0, 2.0], "enable_bucket": False}}),
     "dataset.general.face_crop_aug_range", "min <= max"),
])
def test_dataset_key_refusals(data, path, fragment):
    problems = errors_for(data)
    assert path in problems, problems
    assert fragment in problems[path]


@pytest.mark.parametrize("data", [
    _config(dataset=_inline({"alpha_mask": True})),  # alpha masks apply on their own, as in sd-scripts
    _config(training={"masked_loss": True}, dataset=_inline({"alpha_mask": True})),
    _config(training={"masked_loss": True}, dataset=_inline({"conditioning_data_dir": "masks"})),
    _config(dataset={"general": {"network_multiplier": 0.5}}),
    _config(dataset=_inline({"custom_attributes": {"diff_output_preservation": True}})),
    _config(network={"network_type": "loha"},
            dataset=_inline({"custom_attributes": {"diff_output_preservation": True}})),
    _config(training={"cache_latents": False},
            dataset={"general": {"face_crop_aug_range": [2.0, 4.0], "enable_bucket": False}}),
    _config(dataset={"general": {"validation_split": 0.1, "validation_seed": 5}}),
    _config(saving={"keep_best": True, "save_every_n_steps": 5}, dataset=_inline({}, validation_split=0.2)),
    _config(saving={"keep_best": True, "save_every_n_epochs": 1},
            dataset={"train_data_dir": "", "datasets": [{"subsets": [{"image_dir": "img"},
                                                                    {"image_dir": "val", "validation_only": True}]}]}),
])
def test_working_combinations_are_accepted(data):
    validate_config(data, check_packages=False)


def test_persistent_workers_without_workers_is_a_warning():
    from engine.config.schema import config_warnings

    config = validate_config(_config(training={"persistent_data_loader_workers": True}), check_packages=False)
    warnings = {problem.path: problem.message for problem in config_warnings(config)}
    assert "max_data_loader_n_workers = 0" in warnings["training.persistent_data_loader_workers"]
    with_workers = _config(training={"persistent_data_loader_workers": True, "max_data_loader_n_workers": 2})
    assert "training.persistent_data_loader_workers" not in {
        problem.path for problem in config_warnings(validate_config(with_workers, check_packages=False))}
