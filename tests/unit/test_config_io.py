"""TOML round trips, --set overrides, presets as overlays, and reading referenced dataset files."""

import json
import tomllib
from pathlib import Path

import pytest

from engine.config.errors import ConfigError
from engine.config.io import (
    apply_overrides,
    config_to_toml,
    deep_merge,
    diff_from_defaults,
    load_config,
    load_preset,
    save_config,
    save_preset,
    validate_config,
)

RICH_CONFIG = {
    "method": "lora",
    "model": {"pretrained_model_name_or_path": "/models/base.safetensors", "model_family": "sdxl", "clip_skip": 2},
    # preset and use_tucker are LyCORIS settings: kohya's LoRA/LoCon refuses them at validation
    "network": {"network_type": "loha", "network_dim": 16, "network_alpha": 8.0, "conv_dim": 4, "conv_alpha": 1.0,
                "network_args": {"preset": "attn-mlp", "use_tucker": True}},
    "dataset": {
        "general": {"resolution": [1024, 768], "shuffle_caption": True, "keep_tokens": 1,
                    "caption_prefix": "sks", "face_crop_aug_range": [2.0, 4.0], "bucket_reso_steps": 32,
                    "enable_bucket": False},  # face-crop augmentation runs with buckets off, from pixels
        "datasets": [{"batch_size": 2, "subsets": [
            {"image_dir": "img/a", "num_repeats": 10, "class_tokens": "sks girl"},
            {"image_dir": "reg/girl", "is_reg": True, "custom_attributes": {"diff_output_preservation": True}},
        ]}, {"resolution": 768, "subsets": [{"metadata_file": "meta.jsonl", "image_dir": "ft"}]}],
    },
    "optimizer": {"optimizer_type": "AdamW", "learning_rate": 3e-5, "text_encoder2_lr": 1e-5,
                  "optimizer_args": {"weight_decay": 0.01, "betas": [0.9, 0.99]}, "lr_warmup_steps": 0.05},
    "training": {"max_train_epochs": 0, "max_train_steps": 2000, "mixed_precision": "bf16", "full_bf16": True,
                 "cache_latents": False},
    "saving": {"save_every_n_steps": 500, "metadata": {"title": "Mine", "tags": "a, b"}},
    "sampling": {"sample_every_n_steps": 250, "sample_prompts": ["sks girl --n blurry --w 1024 --h 1024 --d 7"]},
    "launch": {"num_processes": 2, "multi_gpu": True, "gpu_ids": [0, 1]},
}


def test_toml_round_trip_is_lossless(tmp_path):
    config = validate_config(RICH_CONFIG, check_packages=False)
    path = tmp_path / "run.toml"
    save_config(config, path)
    again = load_config(path, check_packages=False)
    assert again == config
    assert again.model_dump() == config.model_dump()
    assert tomllib.loads(path.read_text())["schema_version"] == 1


def test_int_and_float_keep_their_meaning_through_toml():
    steps = validate_config({"optimizer": {"lr_warmup_steps": 10}})
    ratio = validate_config({"optimizer": {"lr_warmup_steps": 0.1}})
    assert isinstance(validate_config(tomllib.loads(config_to_toml(steps))).optimizer.lr_warmup_steps, int)
    assert validate_config(tomllib.loads(config_to_toml(ratio))).optimizer.lr_warmup_steps == 0.1


def test_only_changed_toml_reads_back_to_the_same_config(tmp_path):
    config = validate_config(RICH_CONFIG, check_packages=False)
    path = tmp_path / "small.toml"
    save_config(config, path, only_changed=True)
    text = path.read_text()
    assert "caption_separator" not in text  # a default, left out
    assert load_config(path, check_packages=False) == config


def test_header_is_written_as_comments(tmp_path):
    path = tmp_path / "x.toml"
    save_config(validate_config({}), path, header="line one\nline two")
    assert path.read_text().startswith("# line one\n# line two\n")


def test_overrides_set_nested_values_and_list_items():
    data = apply_overrides(RICH_CONFIG, ["training.seed=7", "model.vae=/models/vae.safetensors",
                                         "dataset.datasets[0].subsets[1].num_repeats=3",
                                         "sampling.sample_prompts=['a', 'b']", "training.gradient_checkpointing=true"])
    config = validate_config(data, check_packages=False)
    assert config.training.seed == 7
    assert config.model.vae == "/models/vae.safetensors"
    assert config.dataset.datasets[0].subsets[1].num_repeats == 3
    assert config.sampling.sample_prompts == ["a", "b"]
    assert config.training.gradient_checkpointing is True
    assert RICH_CONFIG["training"].get("seed") is None  # the caller's dict is untouched


def test_override_with_bad_shape_or_missing_item_is_an_error():
    with pytest.raises(ConfigError) as caught:
        apply_overrides({}, ["training.seed", "dataset.datasets[3].num_repeats=1"])
    paths = [problem.path for problem in caught.value.problems]
    assert paths == ["--set", "dataset.datasets[3].num_repeats"]


def test_override_of_a_misspelled_key_fails_validation_with_its_path():
    with pytest.raises(ConfigError) as caught:
        validate_config(apply_overrides({}, ["training.epochs=3"]))
    assert caught.value.problems[0].path == "training.epochs"


def test_deep_merge_merges_tables_and_replaces_lists():
    merged = deep_merge({"a": {"x": 1, "y": [1, 2]}, "b": 1}, {"a": {"y": [3]}, "c": 2})
    assert merged == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}


def test_preset_saves_only_what_differs_and_loads_back(tmp_path):
    config = validate_config({"network": {"network_dim": 32, "network_alpha": 16.0},
                              "training": {"seed": 1}})
    path = tmp_path / "mine.json"
    save_preset(config, path, "Mine", "my settings")
    document = json.loads(path.read_text())
    assert document["config"] == {"network": {"network_dim": 32, "network_alpha": 16.0}, "training": {"seed": 1}}
    assert document["title"] == "Mine"
    assert load_preset(path) == config


def test_diff_from_defaults_of_defaults_is_empty():
    assert diff_from_defaults(validate_config({})) == {}


def test_bare_json_overlay_loads_as_a_preset(tmp_path):
    path = tmp_path / "overlay.json"
    path.write_text(json.dumps({"training": {"max_train_epochs": 3}}))
    assert load_preset(path).training.max_train_epochs == 3


def test_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[training\nseed = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems[0].path == str(path)
    assert "not valid TOML" in caught.value.problems[0].message


def test_dataset_config_file_is_read_relative_to_the_config_and_checked(tmp_path):
    (tmp_path / "data.toml").write_text('[general]\ncolor_aug = true\n[[datasets]]\n[[datasets.subsets]]\n'
                                        'image_dir = "img"\n')
    (tmp_path / "run.toml").write_text('[dataset]\nconfig_file = "data.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "run.toml")
    assert [p.path for p in caught.value.problems] == ["[data.toml].general.color_aug"]


def test_missing_or_invalid_dataset_config_file_is_reported(tmp_path):
    (tmp_path / "run.toml").write_text('[dataset]\nconfig_file = "nope.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "run.toml")
    assert "file not found" in caught.value.problems[0].message
    (tmp_path / "bad.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dri = "x"\n')
    (tmp_path / "run.toml").write_text('[dataset]\nconfig_file = "bad.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "run.toml")
    messages = [str(p) for p in caught.value.problems]
    assert any("datasets[0].subsets[0].image_dri" in m and "did you mean 'image_dir'" in m for m in messages)


def test_json_config_with_preset_wrapper_loads_via_load_config(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "atelier-preset", "title": "t", "config": {"training": {"seed": 5}}}))
    assert load_config(path).training.seed == 5


def test_no_file_is_written_half(tmp_path, monkeypatch):
    path = tmp_path / "keep.toml"
    path.write_text("original")

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", explode)
    with pytest.raises(OSError):
        save_config(validate_config({}), path)
    assert path.read_text() == "original"
    assert [p.name for p in Path(tmp_path).iterdir()] == ["keep.toml"]
