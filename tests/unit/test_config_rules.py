"""Cross-field rules: each rejects a real bad combination with a message naming the field and a fix."""

import pytest

from engine.config.errors import ConfigError
from engine.config.io import validate_config
from engine.config.rules import RuleContext, check
from engine.config.schema import RunConfig, config_warnings


def errors_for(data: dict, check_packages: bool = False) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(data, check_packages=check_packages)
    return {problem.path: problem.message for problem in caught.value.problems}


@pytest.mark.parametrize(("data", "path", "fragment"), [
    ({"dataset": {"general": {"color_aug": True}}}, "dataset.general.color_aug", "cached latents"),
    ({"dataset": {"general": {"random_crop": True}}}, "dataset.general.random_crop", "cached latents"),
    ({"training": {"cache_latents": False, "cache_latents_to_disk": True}}, "training.cache_latents_to_disk",
     "cache_latents = true"),
    ({"training": {"cache_text_encoder_outputs": True}, "network": {"train_unet_only": True},
      "dataset": {"general": {"shuffle_caption": True}}}, "dataset.general.shuffle_caption", "cannot be cached"),
    ({"training": {"cache_text_encoder_outputs": True}, "network": {"train_unet_only": True},
      "dataset": {"general": {"caption_dropout_rate": 0.1}}}, "dataset.general.caption_dropout_rate",
     "cannot be cached"),
    ({"training": {"cache_text_encoder_outputs": True}}, "training.cache_text_encoder_outputs",
     "text encoder is being trained"),
    ({"training": {"max_train_epochs": 0, "max_train_steps": 100}, "optimizer": {"lr_warmup_steps": 100,
                                                                                "lr_scheduler": "cosine"}},
     "optimizer.lr_warmup_steps", "as long as the whole run"),
    ({"optimizer": {"lr_scheduler": "constant", "lr_warmup_steps": 10}}, "optimizer.lr_warmup_steps",
     "constant_with_warmup"),
    ({"saving": {"output_dir": "", "save_every_n_epochs": 1}}, "saving.save_every_n_epochs", "set output_dir"),
    ({"model": {"model_family": "sd1"}, "optimizer": {"text_encoder2_lr": 1e-5}}, "optimizer.text_encoder2_lr",
     "only SDXL"),
    ({"model": {"model_family": "sd1"}, "dataset": {"general": {"bucket_reso_steps": 32}}},
     "dataset.general.bucket_reso_steps", "multiples of 64"),
    ({"network": {"network_dim": 8, "network_alpha": 16.0}}, "network.network_alpha", "at most network_dim"),
    ({"network": {"network_type": "locon", "conv_dim": 0}}, "network.conv_dim", "above 0"),
    ({"network": {"network_dim": 4096}}, "network.network_dim", "1-1024"),
    ({"training": {"mixed_precision": "bf16", "full_fp16": True}}, "training.full_fp16", "'fp16'"),
    ({"training": {"noise_offset": 0.1, "multires_noise_iterations": 6}}, "training.multires_noise_iterations",
     "cannot be used together"),
    ({"training": {"min_timestep": 500, "max_timestep": 400}}, "training.min_timestep", "below max_timestep"),
    ({"method": "textual_inversion"}, "embedding.token_string", "needs the new word"),
    ({"method": "dreambooth", "saving": {"save_model_as": "pt"}}, "saving.save_model_as", "full model"),
    ({"method": "lora", "saving": {"save_model_as": "diffusers"}}, "saving.save_model_as", "network"),
    ({"sampling": {"sample_every_n_epochs": 1}}, "sampling.sample_prompts", "no prompts"),
    ({"launch": {"num_processes": 2}}, "launch.multi_gpu", "multi_gpu = true"),
    ({"launch": {"num_processes": 2, "multi_gpu": True, "gpu_ids": [0]}}, "launch.gpu_ids", "one id per process"),
    ({"training": {"max_train_epochs": 3, "max_train_steps": 100}}, "training.max_train_steps", "keep one"),
    ({"dataset": {"general": {"resolution": 512, "min_bucket_reso": 640}}}, "dataset.general.min_bucket_reso",
     "lower it"),
    ({"training": {"cache_on_device": True, "max_data_loader_n_workers": 2}}, "training.cache_on_device",
     "max_data_loader_n_workers = 0"),
])
def test_rule_rejects_combination(data, path, fragment):
    problems = errors_for(data)
    assert path in problems, problems
    assert fragment in problems[path]


def test_subset_level_values_are_checked_where_they_are_set():
    data = {"dataset": {"datasets": [{"subsets": [{"image_dir": "a"}, {"image_dir": "b", "color_aug": True}]}]}}
    problems = errors_for(data)
    assert list(problems) == ["dataset.datasets[0].subsets[1].color_aug"]


def test_a_value_inherited_from_the_dataset_level_points_at_that_level():
    data = {"dataset": {"datasets": [{"random_crop": True, "subsets": [{"image_dir": "a"}]}]}}
    assert list(errors_for(data)) == ["dataset.datasets[0].random_crop"]


def test_missing_optional_package_names_the_package_and_extra(monkeypatch):
    from engine.config import choices

    monkeypatch.setattr(choices.OptionalPackage, "is_installed", lambda self: False)
    problems = errors_for({"optimizer": {"optimizer_type": "Prodigy"}, "network": {"network_type": "loha"}},
                          check_packages=True)
    assert "'prodigyopt'" in problems["optimizer.optimizer_type"]
    assert "optimizers" in problems["optimizer.optimizer_type"]
    assert "lycoris-lora" in problems["network.network_type"]


def test_warnings_do_not_fail_validation():
    config = validate_config({"optimizer": {"optimizer_type": "Prodigy", "learning_rate": 1e-4}},
                             check_packages=False)
    warnings = {problem.path for problem in config_warnings(config)}
    assert "optimizer.learning_rate" in warnings


def test_keeping_caches_on_the_gpu_without_caches_is_a_warning():
    config = validate_config({"training": {"cache_latents": False, "cache_on_device": True}}, check_packages=False)
    warnings = {problem.path: problem.message for problem in config_warnings(config)}
    assert "nothing to keep" in warnings["training.cache_on_device"]


def test_check_runs_over_a_dataset_file_in_the_context():
    from engine.config.dataset import DatasetFile

    file = DatasetFile.model_validate({"general": {"color_aug": True},
                                       "datasets": [{"subsets": [{"image_dir": "x"}]}]})
    config = RunConfig.model_validate({"dataset": {"config_file": "d.toml"}})
    problems = check(config, RuleContext(check_packages=False, dataset_file=file, dataset_file_name="d.toml"))
    assert [str(p.path) for p in problems if p.severity == "error"] == ["[d.toml].general.color_aug"]


def test_legacy_finetune_folder_with_metadata_is_a_finetune_subset():
    config = validate_config({"method": "finetune", "dataset": {"train_data_dir": "img", "in_json": "meta.json"}},
                             check_packages=False)
    assert config.dataset.in_json == "meta.json"
    problems = errors_for({"method": "dreambooth", "dataset": {"train_data_dir": "img", "in_json": "meta.json"}})
    assert "dreambooth-style subsets" in problems["dataset.general"]


def test_unknown_dotted_optimizer_package_gets_a_plain_pip_hint():
    problems = errors_for({"optimizer": {"optimizer_type": "pytorch_optimizer.CAME"}}, check_packages=True)
    assert problems["optimizer.optimizer_type"].endswith("install it with `pip install pytorch-optimizer`")
