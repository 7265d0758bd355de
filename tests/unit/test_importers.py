"""The importers: kohya_ss GUI JSON, sd-scripts training-argument TOML and sd-scripts dataset configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config.dataset import resolve_datasets
from engine.config.errors import ConfigError
from engine.config.importers import ImportResult, Skipped
from engine.config.importers.common import parse_kv_args, put
from engine.config.importers.registry import IMPORTERS, detect_format, import_file
from engine.config.io import (
    config_to_toml,
    deep_merge,
    default_config_dict,
    read_document,
    validate_config,
)
from engine.config.schema import RunConfig

FIXTURES = Path(__file__).parents[1] / "fixtures" / "import"


def imported(name: str) -> tuple[dict, ImportResult]:
    path = FIXTURES / name
    return read_document(path), import_file(path)


def merged(result) -> RunConfig:
    return validate_config(deep_merge(default_config_dict(), result.overlay), check_packages=False)


def skipped(result) -> dict:
    return {item.key: item.value for item in result.skipped}


def notes_about(result, text: str) -> list[str]:
    return [note for note in result.notes if text in note]


def assert_every_key_accounted(data: dict, result: ImportResult) -> None:
    """Nothing disappears: each source key was mapped, skipped or unset."""
    assert result.accounted_keys() == set(data)
    assert not {item.key for item in result.skipped} & set(result.unset)


# --- helpers ---------------------------------------------------------------------------------------------------


def test_parse_kv_args_reads_kohya_strings_and_sd_scripts_lists():
    assert parse_kv_args('weight_decay=0.01 betas=(0.9, 0.99) decouple=True algo="loha" mode=fast') == {
        "weight_decay": 0.01, "betas": [0.9, 0.99], "decouple": True, "algo": "loha", "mode": "fast"}
    assert parse_kv_args(["conv_dim=4", "d_coef=2", "betas=0.9,0.99"]) == {"conv_dim": 4, "d_coef": 2,
                                                                          "betas": [0.9, 0.99]}
    assert parse_kv_args("") == {} and parse_kv_args(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_kv_args("weight_decay")


def test_put_converts_text_to_the_field_type_and_records_what_does_not_fit():
    result = ImportResult("test")
    assert put(result, "model.clip_skip", "2", "clip_skip")
    assert put(result, "optimizer.learning_rate", "0.0001", "learning_rate")
    assert put(result, "model.max_token_length", "225", "max_token_length")
    assert put(result, "optimizer.optimizer_type", "adamw8bit", "optimizer")
    assert not put(result, "network.network_dropout", 1.5, "network_dropout")
    assert not put(result, "optimizer.optimizer_type", "NoSuchOptimizer", "optimizer_type")
    assert result.overlay["model"] == {"clip_skip": 2, "max_token_length": 225}
    assert result.overlay["optimizer"] == {"learning_rate": 1e-4, "optimizer_type": "AdamW8bit"}
    assert skipped(result) == {"network_dropout": 1.5, "optimizer_type": "NoSuchOptimizer"}
    assert "network.network_dropout" in result.skipped[0].reason
    assert result.mapped["clip_skip"] == ["model.clip_skip"]


# --- kohya_ss GUI ----------------------------------------------------------------------------------------------


def test_kohya_lora_maps_values_to_their_fields():
    data, result = imported("kohya_lora_sdxl.json")
    config = merged(result)
    assert result.format == "kohya_gui" and config.method == "lora"
    assert config.dataset.general.resolution == [768, 512]
    assert config.optimizer.lr_warmup_steps == 0.1  # 10 % of the run
    assert config.optimizer.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99]}
    assert config.optimizer.optimizer_type == "AdamW8bit"
    assert (config.optimizer.learning_rate, config.optimizer.unet_lr, config.optimizer.text_encoder_lr) == (
        3e-5, 3e-5, 3e-5)
    assert (config.model.clip_skip, config.model.max_token_length) == (1, 150)  # "1", "150" in the JSON
    assert config.model.model_family == "sdxl" and config.model.no_half_vae is True
    assert config.dataset.general.keep_tokens == 1 and config.dataset.general.batch_size == 3
    assert (config.training.max_train_epochs, config.training.max_train_steps) == (50, 0)
    assert config.training.seed == 1234 and config.training.attention == "xformers"
    assert config.training.noise_offset == 0.0357 and config.training.multires_noise_iterations == 0
    assert (config.network.network_type, config.network.network_dim, config.network.network_alpha) == (
        "lora", 32, 32.0)
    assert config.network.network_args == {}
    assert config.sampling.sample_prompts == [
        "mychar, 1girl, smiling, upper body --n lowres, bad anatomy --w 1024 --h 1024 --d 42 --l 7 --s 28",
        "mychar, full body, standing in a park --w 832 --h 1216 --d 7",
    ]
    assert config.saving.metadata.title == "My character"
    assert config.saving.metadata.training_comment == "trigger word: mychar"
    assert config.dataset.train_data_dir == "/data/mychar/img"


def test_kohya_lora_accounts_for_every_key():
    data, result = imported("kohya_lora_sdxl.json")
    assert skipped(result) == {"fp8_base": True, "scale_weight_norms": 1, "additional_parameters": "--lowram"}
    assert result.mapped["weighted_captions"] == ["model.weighted_captions"]
    assert all(item.reason == "not supported by Atelier" for item in result.skipped if item.key != "fp8_base")
    assert "only for FLUX.1 and Chroma" in next(item.reason for item in result.skipped if item.key == "fp8_base")
    # empty, off, GUI-only, and options the Standard type does not use (at the GUI's defaults)
    for key in ("vae", "reg_data_dir", "max_train_steps", "model_list", "save_as_bool",
                "conv_dim", "LyCORIS_preset", "factor", "train_on_input", "multires_noise_discount", "v2"):
        assert key in result.unset, key
    assert result.mapped["max_resolution"] == ["dataset.general.resolution"]
    assert_every_key_accounted(data, result)


def test_kohya_flux_lora_maps_its_flux_fields():
    data, result = imported("kohya_lora_flux.json")
    config = merged(result)
    assert config.model.model_family == "flux1" and config.network.network_type == "lora"
    assert config.model.ae == "/models/flux/ae.safetensors" and config.model.fp8_base is True
    assert config.training.blocks_to_swap == 18 and config.flow.timestep_sampling == "shift"
    assert config.flow.model_prediction_type == "raw" and config.flow.guidance_scale == 3.5
    assert {"conv_dim"} <= set(result.unset) and not result.skipped
    # text_encoder_lr 0 beside a UNet rate: kohya_ss trains the UNet only
    assert config.network.train_unet_only is True and config.optimizer.unet_lr == 3e-4
    assert config.optimizer.text_encoder_lr is None
    assert config.training.attention == "sdpa"
    assert config.optimizer.lr_warmup_steps == 0  # constant scheduler: kohya_ss turns warm-up off
    assert "lr_warmup" in result.unset
    assert_every_key_accounted(data, result)


def test_kohya_lycoris_options_go_to_network_args(tmp_path):
    result = import_file(_write_json(tmp_path / "lokr.json", {
        "LoRA_type": "LyCORIS/LoKr", "network_dim": 100000, "network_alpha": 1, "conv_dim": 100000,
        "conv_alpha": 1, "factor": 8, "LyCORIS_preset": "attn-mlp", "use_cp": False, "dora_wd": True,
        "use_tucker": True, "unit": 4, "train_on_input": True, "optimizer": "Prodigy", "learning_rate": 1,
        "max_resolution": "512,512", "epoch": 2,
    }))
    network = merged(result).network
    assert network.network_type == "lokr" and network.conv_dim == 100000
    assert network.network_args == {"factor": 8, "preset": "attn-mlp", "dora_wd": True}
    # LoKr does not pass use_tucker or unit (so changed values are reported); use_cp is LyCORIS' default and
    # train_on_input sits at the GUI's default
    assert skipped(result) == {"use_tucker": True, "unit": 4}
    assert {"use_cp", "train_on_input"} <= set(result.unset)


def test_kohya_lycoris_locon_is_our_locon(tmp_path):
    result = import_file(_write_json(tmp_path / "locon.json", {
        "LoRA_type": "LyCORIS/LoCon", "conv_dim": 8, "conv_alpha": 4, "network_dim": 16, "network_alpha": 8,
        "epoch": 1, "optimizer": "AdamW"}))
    assert merged(result).network.network_type == "locon"
    assert notes_about(result, "LyCORIS/LoCon is trained as Atelier's locon")


def test_kohya_dreambooth():
    data, result = imported("kohya_dreambooth.json")
    config = merged(result)
    assert config.method == "dreambooth"
    assert config.training.attention == "xformers"  # the old checkbox form, true
    assert config.optimizer.optimizer_type == "AdamW8bit"  # old use_8bit_adam flag
    assert (config.training.max_train_steps, config.training.max_train_epochs) == (1600, 0)
    assert skipped(result)["epoch"] == 10 and notes_about(result, "run length: 1600 steps")
    assert notes_about(result, "epoch = 10")
    assert config.optimizer.lr_warmup_steps == 100 and skipped(result)["lr_warmup"] == 5
    assert config.training.multires_noise_iterations == 6 and config.training.noise_offset == 0
    assert skipped(result)["noise_offset"] == 0.05  # Multires type: kohya_ss does not pass noise_offset
    assert config.training.seed == 0 and notes_about(result, "seed 0 meant a random seed")
    assert config.optimizer.text_encoder_lr == 5e-7 and skipped(result)["learning_rate_te1"] == 1e-5
    assert config.launch.gpu_ids == [0, 1] and config.launch.num_processes == 2
    assert config.dataset.general.resolution == [512, 512]
    assert config.training.stop_text_encoder_training == 0.2  # the GUI's percentage as a fraction
    # an empty caption_extension and a false bucket_no_upscale were not passed: sd-scripts' defaults applied
    assert config.dataset.general.caption_extension == ".caption"
    assert config.dataset.general.bucket_no_upscale is False
    assert notes_about(result, "dataset.general.caption_extension = '.caption'")
    assert_every_key_accounted(data, result)


def test_kohya_textual_inversion():
    data, result = imported("kohya_textual_inversion.json")
    config = merged(result)
    assert config.method == "textual_inversion" and notes_about(result, "token_string")
    assert (config.embedding.token_string, config.embedding.init_word, config.embedding.num_vectors_per_token) == (
        "zxc", "*", 8)
    lost = skipped(result)
    assert lost["caption_dropout_rate"] == 0.05  # sd-scripts' TI has no caption dropout
    assert lost["bucket_reso_steps"] == 1 and lost["template"] == "style template"
    assert config.dataset.general.caption_dropout_rate == 0
    assert config.sampling.sample_prompts == ["a painting of man wearing a gas mask , by darius kawasaki"]
    assert notes_about(result, "relative paths") and (config.training.max_train_epochs == 4)
    assert_every_key_accounted(data, result)


def test_kohya_finetune_writes_the_metadata_as_an_inline_dataset():
    data, result = imported("kohya_finetune.json")
    config = merged(result)
    assert config.method == "finetune" and notes_about(result, "image_folder (Finetuning tab)")
    [dataset] = config.dataset.datasets
    [subset] = dataset.subsets
    # use_latent_files "No": sd-scripts read the caption metadata kohya_ss prepared in train_dir
    assert (subset.image_dir, subset.metadata_file) == ("/data/style/images", "/data/style/meta/meta_cap.json")
    assert config.dataset.train_data_dir == "" and config.dataset.general.num_repeats == 10  # dataset_repeats "10"
    assert config.model.model_family == "sdxl"  # sdxl_checkbox
    assert config.optimizer.text_encoder_lr == 2e-7 and skipped(result)["learning_rate_te"] == 1e-5
    assert config.optimizer.optimizer_args == {"scale_parameter": False, "relative_step": False,
                                               "warmup_init": False}
    assert config.saving.save_model_as == "diffusers_safetensors"
    assert notes_about(result, "create_caption was on")
    assert_every_key_accounted(data, result)


def test_kohya_dataset_config_wins_over_folders(tmp_path):
    result = import_file(_write_json(tmp_path / "with_toml.json", {
        "LoRA_type": "Standard", "dataset_config": "/data/dataset.toml", "train_data_dir": "/data/img",
        "reg_data_dir": "/data/reg", "epoch": 5, "max_train_steps": "", "optimizer": "AdamW"}))
    config = merged(result)
    assert config.dataset.config_file == "/data/dataset.toml" and config.dataset.train_data_dir == ""
    assert skipped(result) == {"train_data_dir": "/data/img", "reg_data_dir": "/data/reg", "epoch": 5}
    # with a dataset TOML kohya_ss does not compute steps from epoch, so sd-scripts ran its default length
    assert config.training.max_train_steps == 1600
    assert notes_about(result, "train_data_dir, reg_data_dir not imported")


def test_kohya_bad_prompt_lines_are_skipped_one_by_one(tmp_path):
    result = import_file(_write_json(tmp_path / "prompts.json", {
        "LoRA_type": "Standard", "epoch": 1, "optimizer": "AdamW",
        "sample_prompts": "a cat --w 512\na dog --zz 3\n# comment\n", "sample_every_n_epochs": 1}))
    assert merged(result).sampling.sample_prompts == ["a cat --w 512"]
    assert skipped(result) == {"sample_prompts[1]": "a dog --zz 3"}


# --- sd-scripts training arguments ------------------------------------------------------------------------------


def test_sd_scripts_args_maps_values_to_their_fields():
    data, result = imported("sd_scripts_args_sdxl_loha.toml")
    # dropout=0.05 is kept, and validation says lycoris' LoHa would ignore it (engine.config.rules_network)
    assert result.overlay["network"]["network_dropout"] == 0.05
    with pytest.raises(ConfigError) as caught:
        merged(result)
    assert [problem.path for problem in caught.value.problems] == ["network.network_dropout"]
    result.overlay["network"]["network_dropout"] = 0.0
    config = merged(result)
    assert result.format == "sd_scripts_args" and config.method == "lora"
    assert config.dataset.general.resolution == [768, 512]
    assert (config.optimizer.text_encoder_lr, config.optimizer.text_encoder2_lr) == (5e-5, 2e-5)
    assert config.optimizer.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99]}
    assert config.optimizer.lr_warmup_steps == 0.05
    network = config.network
    assert (network.network_type, network.conv_dim, network.conv_alpha) == ("loha", 4, 2.0)
    assert network.network_args == {"preset": "attn-mlp", "use_tucker": True}
    assert network.module_dropout == 0
    assert (config.training.max_train_epochs, config.training.max_train_steps) == (10, 0)
    assert skipped(result)["max_train_steps"] == 2000
    assert notes_about(result, "max_train_steps = 2000 is not imported")
    assert config.training.attention == "sdpa"
    assert config.sampling.sample_prompts_file == "/train/mychar/prompts.txt" and config.sampling.sample_prompts == []
    assert config.dataset.config_file == "/train/mychar/dataset.toml"
    assert skipped(result) == {"max_train_steps": 2000, "network_args.loraplus_unet_lr_ratio": 4,
                               "fp8_base": True, "lowram": True}
    # bucket_no_upscale is not in the file: sd-scripts' default (false) is kept
    assert config.dataset.general.bucket_no_upscale is False
    assert notes_about(result, "dataset.general.bucket_no_upscale = False")
    assert_every_key_accounted(data, result)


def test_sd_scripts_args_pins_sd_scripts_defaults_for_missing_keys(tmp_path):
    path = tmp_path / "args.toml"
    path.write_text('[model_arguments]\npretrained_model_name_or_path = "/m/v1-5.safetensors"\n'
                    '[additional_network_arguments]\nnetwork_module = "networks.lora"\n'
                    'network_args = ["conv_dim=8", "conv_alpha=4", "block_dims=2,4"]\n'
                    '[training_arguments]\noutput_dir = "/out"\ntrain_data_dir = "/img"\nuse_8bit_adam = true\n'
                    'mem_eff_attn = true\nxformers = true\ntext_encoder_lr = 5e-5\n', encoding="utf-8")
    result = import_file(path)
    config = merged(result)
    pinned = {
        "dataset.general.caption_extension": ".caption", "dataset.general.enable_bucket": False,
        "dataset.general.bucket_no_upscale": False, "dataset.general.max_bucket_reso": 1024,
        "optimizer.lr_scheduler": "constant", "optimizer.learning_rate": 2e-6,
        "training.mixed_precision": "no", "training.cache_latents": False, "network.network_dim": 4,
    }
    for path_, value in pinned.items():
        section, *rest = path_.split(".")
        node = getattr(config, section)
        for part in rest:
            node = getattr(node, part)
        assert node == value, path_
        assert notes_about(result, f"{path_} = {value!r}"), path_
    assert (config.training.max_train_steps, config.training.max_train_epochs) == (1600, 0)
    assert notes_about(result, "1600 steps")
    # [sections] are flattened like sd-scripts does; networks.lora with conv_dim is kohya's LoCon
    assert config.network.network_type == "locon" and config.network.conv_dim == 8
    assert skipped(result)["network_args.block_dims"] == [2, 4]
    assert config.optimizer.optimizer_type == "AdamW8bit" and config.optimizer.text_encoder_lr == 5e-5
    assert config.training.attention == "sdpa" and skipped(result)["xformers"] is True  # mem_eff_attn first
    assert notes_about(result, "random one")  # no seed in the file


def test_sd_scripts_args_fine_tuning(tmp_path):
    path = tmp_path / "fine_tune.toml"
    path.write_text('pretrained_model_name_or_path = "/m/sd15.safetensors"\noutput_dir = "/out"\n'
                    'train_data_dir = "/img"\nin_json = "/img/meta_lat.json"\nlearning_rate = 5e-6\n'
                    'max_train_epochs = 4\nsave_model_as = "safetensors"\n', encoding="utf-8")
    data, result = read_document(path), import_file(path)
    config = merged(result)
    assert config.method == "finetune" and notes_about(result, "in_json")
    [subset] = config.dataset.datasets[0].subsets
    assert (subset.image_dir, subset.metadata_file) == ("/img", "/img/meta_lat.json")
    assert config.dataset.train_data_dir == "" and config.dataset.in_json == ""
    assert_every_key_accounted(data, result)


# --- sd-scripts dataset configs ---------------------------------------------------------------------------------


def test_dataset_class_identifier_with_regularization():
    data, result = imported("dataset_class_identifier.toml")
    config = merged(result)
    assert result.format == "sd_scripts_dataset" and config.method == "lora"
    general = config.dataset.general
    assert (general.shuffle_caption, general.caption_extension, general.keep_tokens) == (True, ".txt", 1)
    [dataset] = config.dataset.datasets
    assert (dataset.resolution, dataset.batch_size) == ([512, 512], 4)
    train, reg = dataset.subsets
    assert (train.image_dir, train.class_tokens, train.num_repeats, train.is_reg) == ("C:\\hoge", "hoge girl", 10,
                                                                                       False)
    assert (reg.image_dir, reg.class_tokens, reg.num_repeats, reg.is_reg) == ("C:\\reg", "girl", 1, True)
    assert train.shuffle_caption is None  # still inherits rather than copying [general]
    assert_every_key_accounted(data, result)


def test_dataset_precedence_after_import():
    _, result = imported("dataset_class_identifier.toml")
    config = merged(result)
    [resolved] = resolve_datasets(config.dataset.general, config.dataset.datasets)
    subset = resolved.subsets[0]
    assert subset.params["shuffle_caption"] is True
    assert subset.source_of("shuffle_caption") == "dataset.general.shuffle_caption"
    assert resolved.params["resolution"] == [512, 512]
    assert resolved.params["batch_size"] == 4
    # enable_bucket is set nowhere in the file: sd-scripts' command-line default (off) is pinned
    assert resolved.params["enable_bucket"] is False
    assert notes_about(result, "dataset.general.enable_bucket = False")


def test_dataset_captions_in_files():
    data, result = imported("dataset_captions.toml")
    config = merged(result)
    [dataset] = config.dataset.datasets
    assert dataset.resolution == [768, 768]
    assert [(s.image_dir, s.caption_extension, s.num_repeats, s.class_tokens) for s in dataset.subsets] == [
        ("C:\\hoge", ".caption", 10, None), ("C:\\fuga", ".txt", 5, None)]
    assert config.dataset.general.enable_bucket is True  # set in [general], so not pinned
    assert not notes_about(result, "enable_bucket")
    [resolved] = resolve_datasets(config.dataset.general, config.dataset.datasets)
    assert [s.params["flip_aug"] for s in resolved.subsets] == [False, True]
    assert_every_key_accounted(data, result)


def test_dataset_fine_tuning_metadata():
    data, result = imported("dataset_finetune.toml")
    config = merged(result)
    assert config.method == "lora" and notes_about(result, "fine-tuning style")
    [subset] = config.dataset.datasets[0].subsets
    assert (subset.image_dir, subset.metadata_file, subset.style) == ("C:\\piyo", "C:\\piyo\\piyo_md.json",
                                                                      "finetune")
    assert config.dataset.datasets[0].resolution == [512, 512]
    assert_every_key_accounted(data, result)


def test_dataset_multi_resolution():
    data, result = imported("dataset_multires.toml")
    config = merged(result)
    assert [d.resolution for d in config.dataset.datasets] == [[512, 512], [768, 768]]
    assert {d.subsets[0].image_dir for d in config.dataset.datasets} == {"C:\\hoge"}
    assert config.dataset.general.max_bucket_reso == 1024 and config.dataset.general.caption_extension == ".caption"
    assert_every_key_accounted(data, result)


def test_dataset_json_form_is_read_too(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"datasets": [{"resolution": [640, 512], "subsets": [{"image_dir": "/img"}]}]}))
    assert merged(import_file(path)).dataset.datasets[0].resolution == [640, 512]


def test_invalid_dataset_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nnum_repeats = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        import_file(path)
    assert str(path) in str(error.value) and "datasets[0].subsets[0]" in str(error.value)


# --- detection --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("kohya_lora_sdxl.json", "kohya_gui"), ("kohya_lora_flux.json", "kohya_gui"),
    ("kohya_dreambooth.json", "kohya_gui"), ("kohya_textual_inversion.json", "kohya_gui"),
    ("kohya_finetune.json", "kohya_gui"),
    ("sd_scripts_args_sdxl_loha.toml", "sd_scripts_args"), ("dataset_class_identifier.toml", "sd_scripts_dataset"),
    ("dataset_captions.toml", "sd_scripts_dataset"), ("dataset_finetune.toml", "sd_scripts_dataset"),
    ("dataset_multires.toml", "sd_scripts_dataset"),
])
def test_formats_are_detected(name, expected):
    path = FIXTURES / name
    assert detect_format(path, read_document(path)) == expected


def test_registry_order_puts_dataset_before_args():
    names = list(IMPORTERS)
    assert names.index("sd_scripts_dataset") < names.index("sd_scripts_args")
    assert set(names) == {"kohya_gui", "sd_scripts_dataset", "sd_scripts_args"}


def test_an_atelier_config_is_not_mistaken_for_sd_scripts_args(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(RunConfig.model_validate({}, context={"check_packages": False})))
    assert detect_format(path, read_document(path)) is None


@pytest.mark.parametrize(("name", "text"), [
    ("list.json", "[1, 2, 3]"),
    ("tool.toml", "[tool.black]\nline-length = 88\n"),
    ("other.json", '{"name": "my-package", "version": "1.0.0"}'),
])
def test_unrecognised_files_give_a_config_error_naming_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        import_file(path)
    assert str(path) in str(error.value)


def test_an_unknown_format_name_is_refused():
    with pytest.raises(ConfigError, match="unknown import format"):
        import_file(FIXTURES / "dataset_multires.toml", format="onetrainer")


def test_skipped_entries_read_well():
    assert str(Skipped("fp8_base", True, "not supported by Atelier")) == "fp8_base = True: not supported by Atelier"


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
