"""The config model: defaults, strictness, bounds, unknown keys and the messages users see."""

import pytest

from engine.config.errors import ConfigError
from engine.config.io import validate_config
from engine.config.schema import RunConfig


def problems_of(data: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(data, check_packages=False)
    return {problem.path: problem.message for problem in caught.value.problems}


def test_defaults_form_a_valid_config():
    config = validate_config({})
    assert config.method == "lora"
    assert config.dataset.general.resolution == [512, 512]
    assert config.optimizer.optimizer_type == "AdamW"
    assert config.training.max_train_epochs == 10 and config.training.max_train_steps == 0


def test_every_required_section_carries_its_parameters():
    config = RunConfig()
    expected = {
        "model": {"pretrained_model_name_or_path", "model_family", "v_parameterization", "vae", "clip_skip",
                  "max_token_length"},
        "network": {"network_type", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "network_dropout",
                    "rank_dropout", "module_dropout", "network_weights", "train_unet_only", "train_text_encoder_only"},
        "embedding": {"token_string", "init_word", "num_vectors_per_token"},
        "dataset": {"config_file", "train_data_dir", "reg_data_dir", "general", "datasets"},
        "optimizer": {"optimizer_type", "learning_rate", "unet_lr", "text_encoder_lr", "optimizer_args",
                      "max_grad_norm", "lr_scheduler", "lr_warmup_steps", "lr_scheduler_num_cycles",
                      "lr_scheduler_power"},
        "training": {"max_train_epochs", "max_train_steps", "gradient_accumulation_steps", "mixed_precision",
                     "full_fp16", "full_bf16", "gradient_checkpointing", "attention", "seed", "cache_latents",
                     "cache_latents_to_disk", "cache_text_encoder_outputs", "noise_offset", "adaptive_noise_scale",
                     "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma", "min_snr_gamma",
                     "loss_type", "huber_schedule", "huber_c", "scale_v_pred_loss_like_noise_pred",
                     "debiased_estimation_loss", "zero_terminal_snr", "min_timestep", "max_timestep",
                     "prior_loss_weight", "max_data_loader_n_workers", "persistent_data_loader_workers"},
        "saving": {"output_dir", "output_name", "save_model_as", "save_precision", "save_every_n_epochs",
                   "save_every_n_steps", "save_last_n_epochs", "save_state", "resume", "metadata"},
        "sampling": {"sample_every_n_steps", "sample_every_n_epochs", "sample_at_first", "sample_sampler",
                     "sample_prompts"},
        "logging": {"logging_dir", "log_with", "log_prefix"},
        "launch": {"num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                   "gpu_ids", "multi_gpu", "dynamo_backend"},
    }
    for section, keys in expected.items():
        missing = keys - set(type(getattr(config, section)).model_fields)
        assert not missing, f"{section} lacks {missing}"
    assert set(type(config.saving.metadata).model_fields) >= {"title", "author", "description", "license", "tags",
                                                              "training_comment"}


def test_unknown_key_is_named_with_a_suggestion():
    problems = problems_of({"training": {"learning_rate": 1e-4}, "network": {"network_dims": 4}})
    assert problems["training.learning_rate"] == "unknown key; did you mean 'optimizer.learning_rate'?"
    assert problems["network.network_dims"] == "unknown key; did you mean 'network_dim'?"


def test_unknown_top_level_section_is_an_error():
    assert problems_of({"trainng": {}}) == {"trainng": "unknown key; did you mean 'training'?"}


@pytest.mark.parametrize(("data", "path", "fragment"), [
    ({"training": {"seed": "42"}}, "training.seed", "expected a whole number, got the text '42'"),
    ({"training": {"gradient_checkpointing": 1}}, "training.gradient_checkpointing", "expected true or false"),
    ({"optimizer": {"learning_rate": "1e-4"}}, "optimizer.learning_rate", "expected a number"),
    ({"network": {"network_dim": 0}}, "network.network_dim", "greater than or equal to 1, got 0"),
    ({"training": {"mixed_precision": "fp32"}}, "training.mixed_precision", "'no', 'fp16' or 'bf16'"),
    ({"model": {"max_token_length": 100}}, "model.max_token_length", "75, 150 or 225"),
])
def test_wrong_types_and_bounds_name_the_field(data, path, fragment):
    problems = problems_of(data)
    assert path in problems, problems
    assert fragment in problems[path]


def test_int_is_accepted_for_a_float_but_nothing_else_is_coerced():
    config = validate_config({"optimizer": {"learning_rate": 1, "optimizer_type": "Prodigy"}}, check_packages=False)
    assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
    assert "network.train_unet_only" in problems_of({"network": {"train_unet_only": "true"}})


def test_optimizer_names_are_case_insensitive_and_canonicalised():
    config = validate_config({"optimizer": {"optimizer_type": "adamw8BIT"}}, check_packages=False)
    assert config.optimizer.optimizer_type == "AdamW8bit"
    dotted = validate_config({"optimizer": {"optimizer_type": "torch.optim.RAdam"}}, check_packages=False)
    assert dotted.optimizer.optimizer_type == "torch.optim.RAdam"
    assert "unknown optimizer 'Adamm'" in problems_of({"optimizer": {"optimizer_type": "Adamm"}})[
        "optimizer.optimizer_type"]


def test_warmup_is_steps_or_a_fraction():
    assert validate_config({"optimizer": {"lr_warmup_steps": 100}}).optimizer.lr_warmup_steps == 100
    assert validate_config({"optimizer": {"lr_warmup_steps": 0.1}}).optimizer.lr_warmup_steps == 0.1
    assert "must be below 1" in problems_of({"optimizer": {"lr_warmup_steps": 1.5}})["optimizer.lr_warmup_steps"]


def test_output_name_must_be_a_plain_file_name():
    assert "plain file name" in problems_of({"saving": {"output_name": "loras/mine"}})["saving.output_name"]
    assert "extension" in problems_of({"saving": {"output_name": "mine.safetensors"}})["saving.output_name"]


def test_bad_sample_prompt_option_is_reported_at_config_time():
    problems = problems_of({"sampling": {"sample_prompts": ["a dog --w 512", "a cat --w wide"]}})
    assert problems["sampling.sample_prompts"] == "prompt 2: --w 'wide' is not a valid value"


def test_all_problems_are_reported_in_one_pass():
    problems = problems_of({"training": {"seed": -1}, "network": {"network_dim": 4, "network_alpha": 8.0}})
    assert set(problems) == {"training.seed", "network.network_alpha"}


def test_schema_version_from_the_future_is_refused():
    assert "newer Atelier" in problems_of({"schema_version": 99})["schema_version"]
