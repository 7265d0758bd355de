"""The one table from sd-scripts argument names to Atelier config paths, shared by both argument importers.

sd-scripts' `--config_file` TOML uses these names directly, and the kohya_ss GUI saves most of its fields under the
same names (it writes them into that TOML), so `kohya_gui.py` extends this table with its own renames instead of
repeating it. Keys that need more than a rename (run length, attention, network, learning rates, ...) are handled
by the functions in `handlers.py` and are not listed here.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.config.importers.common import parse_float_pair, parse_size, parse_warmup
from engine.config.importers.source import Pin, Target

# sd-scripts argument name -> config path, or (config path, parser of sd-scripts' text form).
ARG_PATHS: Mapping[str, Target] = {
    # model
    "pretrained_model_name_or_path": "model.pretrained_model_name_or_path",
    "v_parameterization": "model.v_parameterization",
    "vae": "model.vae",
    "no_half_vae": "model.no_half_vae",
    "clip_skip": "model.clip_skip",
    "max_token_length": "model.max_token_length",
    "weighted_captions": "model.weighted_captions",
    # network
    "network_dim": "network.network_dim",
    "network_alpha": "network.network_alpha",
    "network_dropout": "network.network_dropout",
    "network_weights": "network.network_weights",
    "network_train_unet_only": "network.train_unet_only",
    "network_train_text_encoder_only": "network.train_text_encoder_only",
    # embedding (Textual Inversion)
    "token_string": "embedding.token_string",
    "init_word": "embedding.init_word",
    "num_vectors_per_token": "embedding.num_vectors_per_token",
    # dataset: the command-line level of sd-scripts' precedence is our [dataset.general]
    "train_batch_size": "dataset.general.batch_size",
    "resolution": ("dataset.general.resolution", parse_size),
    "enable_bucket": "dataset.general.enable_bucket",
    "min_bucket_reso": "dataset.general.min_bucket_reso",
    "max_bucket_reso": "dataset.general.max_bucket_reso",
    "bucket_reso_steps": "dataset.general.bucket_reso_steps",
    "bucket_no_upscale": "dataset.general.bucket_no_upscale",
    "dataset_repeats": "dataset.general.num_repeats",
    "caption_extension": "dataset.general.caption_extension",
    "shuffle_caption": "dataset.general.shuffle_caption",
    "caption_separator": "dataset.general.caption_separator",
    "keep_tokens": "dataset.general.keep_tokens",
    "keep_tokens_separator": "dataset.general.keep_tokens_separator",
    "secondary_separator": "dataset.general.secondary_separator",
    "enable_wildcard": "dataset.general.enable_wildcard",
    "caption_prefix": "dataset.general.caption_prefix",
    "caption_suffix": "dataset.general.caption_suffix",
    "color_aug": "dataset.general.color_aug",
    "flip_aug": "dataset.general.flip_aug",
    "face_crop_aug_range": ("dataset.general.face_crop_aug_range", parse_float_pair),
    "random_crop": "dataset.general.random_crop",
    "token_warmup_min": "dataset.general.token_warmup_min",
    "token_warmup_step": "dataset.general.token_warmup_step",
    "caption_dropout_rate": "dataset.general.caption_dropout_rate",
    "caption_dropout_every_n_epochs": "dataset.general.caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate": "dataset.general.caption_tag_dropout_rate",
    "resize_interpolation": "dataset.general.resize_interpolation",
    "validation_seed": "dataset.general.validation_seed",
    "validation_split": "dataset.general.validation_split",
    # optimizer and schedule
    "learning_rate": "optimizer.learning_rate",
    "unet_lr": "optimizer.unet_lr",
    "max_grad_norm": "optimizer.max_grad_norm",
    "lr_scheduler": "optimizer.lr_scheduler",
    "lr_scheduler_num_cycles": "optimizer.lr_scheduler_num_cycles",
    "lr_scheduler_power": "optimizer.lr_scheduler_power",
    "lr_warmup_steps": ("optimizer.lr_warmup_steps", parse_warmup),
    # training loop
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "mixed_precision": "training.mixed_precision",
    "full_fp16": "training.full_fp16",
    "full_bf16": "training.full_bf16",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "seed": "training.seed",
    "cache_latents": "training.cache_latents",
    "cache_latents_to_disk": "training.cache_latents_to_disk",
    "cache_text_encoder_outputs": "training.cache_text_encoder_outputs",
    "vae_batch_size": "training.vae_batch_size",
    "noise_offset": "training.noise_offset",
    "adaptive_noise_scale": "training.adaptive_noise_scale",
    "multires_noise_iterations": "training.multires_noise_iterations",
    "multires_noise_discount": "training.multires_noise_discount",
    "ip_noise_gamma": "training.ip_noise_gamma",
    "min_snr_gamma": "training.min_snr_gamma",
    "loss_type": "training.loss_type",
    "masked_loss": "training.masked_loss",
    "huber_schedule": "training.huber_schedule",
    "huber_c": "training.huber_c",
    "huber_scale": "training.huber_scale",
    "stop_text_encoder_training": "training.stop_text_encoder_training",
    "noise_offset_random_strength": "training.noise_offset_random_strength",
    "ip_noise_gamma_random_strength": "training.ip_noise_gamma_random_strength",
    "scale_v_pred_loss_like_noise_pred": "training.scale_v_pred_loss_like_noise_pred",
    "debiased_estimation_loss": "training.debiased_estimation_loss",
    "zero_terminal_snr": "training.zero_terminal_snr",
    "min_timestep": "training.min_timestep",
    "max_timestep": "training.max_timestep",
    "prior_loss_weight": "training.prior_loss_weight",
    "max_data_loader_n_workers": "training.max_data_loader_n_workers",
    "persistent_data_loader_workers": "training.persistent_data_loader_workers",
    # saving
    "output_dir": "saving.output_dir",
    "output_name": "saving.output_name",
    "save_model_as": "saving.save_model_as",
    "save_precision": "saving.save_precision",
    "save_every_n_epochs": "saving.save_every_n_epochs",
    "save_every_n_steps": "saving.save_every_n_steps",
    "save_last_n_epochs": "saving.save_last_n_epochs",
    "save_state": "saving.save_state",
    "save_state_on_train_end": "saving.save_state_on_train_end",
    "save_last_n_steps": "saving.save_last_n_steps",
    # validation loss (sd-scripts leaves them None when not given; so does the import)
    "validate_every_n_steps": "validation.validate_every_n_steps",
    "validate_every_n_epochs": "validation.validate_every_n_epochs",
    "max_validation_steps": "validation.max_validation_steps",
    "resume": "saving.resume",
    "training_comment": "saving.metadata.training_comment",
    "metadata_title": "saving.metadata.title",
    "metadata_author": "saving.metadata.author",
    "metadata_description": "saving.metadata.description",
    "metadata_license": "saving.metadata.license",
    "metadata_tags": "saving.metadata.tags",
    # sampling (sample_prompts is a file path in sd-scripts; the kohya GUI handles its inline text itself)
    "sample_every_n_steps": "sampling.sample_every_n_steps",
    "sample_every_n_epochs": "sampling.sample_every_n_epochs",
    "sample_at_first": "sampling.sample_at_first",
    "sample_sampler": "sampling.sample_sampler",
    "sample_prompts": "sampling.sample_prompts_file",
    # logging
    "logging_dir": "logging.logging_dir",
    "log_with": "logging.log_with",
    "log_prefix": "logging.log_prefix",
    "log_tracker_name": "logging.log_tracker_name",
    "lr_scheduler_type": "optimizer.lr_scheduler_type",
}

_NETWORK_ONLY = ("lora",)

# sd-scripts' argparse defaults (train_network.py and friends) where Atelier's defaults differ. A file that leaves
# one of these unset ran with sd-scripts' value, so the import keeps it (spec §1.3, §9).
DATASET_PINS = (
    Pin("dataset.general.caption_extension", ".caption"),
    Pin("dataset.general.enable_bucket", False),
    Pin("dataset.general.bucket_no_upscale", False),
    Pin("dataset.general.max_bucket_reso", 1024),
)
ARG_PINS = (
    *DATASET_PINS,
    Pin("optimizer.learning_rate", 2e-6),
    Pin("optimizer.lr_scheduler", "constant"),
    Pin("training.mixed_precision", "no"),
    Pin("training.cache_latents", False),
    Pin("network.network_dim", 4, _NETWORK_ONLY),  # networks/lora.py: network_dim None -> 4
    Pin("sampling.sample_sampler", "ddim"),
    Pin("flow.model_prediction_type", "sigma_scaled"),  # FLUX only: applied where the family uses it
)

# sd-scripts' network modules -> Atelier network types; LyCORIS picks its algorithm with network_args' `algo`.
NETWORK_MODULES: Mapping[str, str] = {
    "networks.lora": "lora",
    "networks.lora_flux": "lora",  # kohya's LoRA on FLUX.1/Chroma: the family decides the layers
    "networks.lora_sd3": "lora",  # kohya's LoRA on SD3 / SD3.5
    "networks.dylora": "dylora",
    "networks.loha": "loha",
    "networks.lokr": "lokr",
    "lycoris.kohya": "lycoris",
}
LYCORIS_ALGOS: Mapping[str, str] = {
    "lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "dylora": "dylora", "ia3": "ia3",
    "glora": "glora", "boft": "boft", "diag-oft": "diag-oft", "full": "full",
}
# network_args that are fields of [network] rather than free-form algorithm options.
NETWORK_ARG_PATHS: Mapping[str, str] = {
    "conv_dim": "network.conv_dim",
    "conv_alpha": "network.conv_alpha",
    "rank_dropout": "network.rank_dropout",
    "module_dropout": "network.module_dropout",
    "dropout": "network.network_dropout",  # LyCORIS' name for network_dropout
}
# LyCORIS options kept in network.network_args, with LyCORIS' own defaults (lycoris/kohya.py create_network): only
# values that change something are written. train_on_input has no default there (the module decides): always kept.
LYCORIS_OPTION_DEFAULTS: Mapping[str, object] = {
    "preset": "full", "use_tucker": False, "use_scalar": False, "dora_wd": False, "train_norm": False,
    "rank_dropout_scale": False, "constraint": 0.0, "rescaled": False, "bypass_mode": False, "factor": -1,
    "use_cp": False, "decompose_both": False, "block_size": 4, "wd_on_output": False, "full_matrix": False,
    "rs_lora": False, "unbalanced_factorization": False, "train_on_input": None,
}
