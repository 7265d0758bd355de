"""Network file metadata (ss_*, ModelSpec, hashes) and network file writing, checked against sd-scripts' rules."""

import datetime
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from engine.config.io import validate_config
from engine.data.scan import bucket_manager, scan_config
from engine.networks.dataset_metadata import image_counts
from engine.networks.metadata import (
    TrainingFacts,
    a1111_legacy_hash,
    build_metadata,
    model_hash_metadata,
    modelspec_metadata,
    new_session_id,
    sha256_file,
    with_progress,
)
from engine.networks.network_file import read_network_file, save_dtype, save_network_file

# The "always written" table of spec §5.3, in its order.
ALWAYS_WRITTEN = (
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr",
    "ss_unet_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images", "ss_num_batches_per_epoch",
    "ss_num_epochs", "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps",
    "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_dropout", "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip",
    "ss_max_token_length", "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset",
    "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale", "ss_zero_terminal_snr",
    "ss_training_comment", "ss_sd_scripts_commit_hash", "ss_optimizer", "ss_max_grad_norm", "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_face_crop_aug_range",
    "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms", "ss_ip_noise_gamma",
    "ss_debiased_estimation", "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength", "ss_loss_type",
    "ss_huber_schedule", "ss_huber_scale", "ss_huber_c", "ss_fp8_base", "ss_fp8_base_unet", "ss_validation_seed",
    "ss_validation_split", "ss_max_validation_steps", "ss_validate_every_n_epochs", "ss_validate_every_n_steps",
    "ss_resize_interpolation"
)
LEGACY_FOLDER_KEYS = ("ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_reg_dataset_dirs",
                      "ss_enable_bucket", "ss_keep_tokens")
INSTANCE, REG = "10_sks dog", "1_dog"
GENERAL = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_no_upscale": False}


def legacy_config(dataset: Path, general: dict | None = None, **sections):
    data = {"dataset": {"train_data_dir": str(dataset / "img"), "reg_data_dir": str(dataset / "reg"),
                        "general": {**GENERAL, **(general or {})}}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return validate_config(data, check_packages=False)


def facts_for(config, datasets, **overrides) -> TrainingFacts:
    values = dict(session_id=new_session_id(), started_at=1_700_000_000.5, family="sd1", v_prediction=False,
                  num_train_images=60, num_reg_images=8, num_batches_per_epoch=120, num_epochs=10,
                  max_train_steps=1200, warmup_steps=0, optimizer_description="torch.optim.adamw.AdamW",
                  datasets=datasets, model_path="runwayml/stable-diffusion-v1-5")
    values.update(overrides)
    return TrainingFacts(**values)


@pytest.fixture(scope="module")
def dataset(tiny_models) -> Path:
    return Path(tiny_models["dataset"])


@pytest.fixture(scope="module")
def scanned(dataset):
    config = legacy_config(dataset)
    return config, scan_config(config, dataset).datasets


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})


# --- ss_* keys -------------------------------------------------------------------------------------------------


def test_every_always_written_key_is_present_and_every_value_is_a_string(scanned):
    config, datasets = scanned
    metadata = build_metadata(config, facts_for(config, datasets))
    missing = [key for key in ALWAYS_WRITTEN if key not in metadata]
    assert not missing
    for key in ("ss_datasets", "ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", *LEGACY_FOLDER_KEYS):
        assert key in metadata
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in metadata.items())
    assert "ss_network_args" not in metadata  # plain LoRA without arguments, as sd-scripts


def test_values_take_sd_scripts_string_forms(dataset, scanned):
    _, datasets = scanned
    config = legacy_config(dataset, training={"gradient_checkpointing": True, "min_snr_gamma": 5.0,
                                              "cache_latents": False},
                           optimizer={"learning_rate": 2e-4, "unet_lr": None, "text_encoder_lr": 5e-5},
                           saving={"metadata": {"training_comment": "trigger: sks"}},
                           general={"face_crop_aug_range": [2.0, 4.0], "enable_bucket": False})
    facts = facts_for(config, datasets, family="sd2", v_prediction=True, warmup_steps=30)
    metadata = build_metadata(config, facts)
    assert metadata["ss_unet_lr"] == "None"
    assert metadata["ss_learning_rate"] == str(2e-4) and metadata["ss_text_encoder_lr"] == str(5e-5)
    assert metadata["ss_gradient_checkpointing"] == "True" and metadata["ss_full_fp16"] == "False"
    # Set, but the images trained (scanned with buckets on, no face boxes in their names) were not cropped: not
    # claimed. (A run that
    # crops writes it as sd-scripts' tuple: tests/test_train_datakeys.py.)
    assert metadata["ss_face_crop_aug_range"] == "None"
    assert metadata["ss_resolution"] == "(64, 64)"
    assert metadata["ss_scale_weight_norms"] == "None" and metadata["ss_lowram"] == "False"
    assert metadata["ss_v2"] == "True" and metadata["ss_base_model_version"] == "sd_v2_v"
    assert metadata["ss_min_snr_gamma"] == "5.0" and metadata["ss_lr_warmup_steps"] == "30"
    assert metadata["ss_training_comment"] == "trigger: sks"
    assert metadata["ss_session_id"] == str(facts.session_id)
    assert metadata["ss_training_started_at"] == str(facts.started_at)
    assert metadata["ss_total_batch_size"] == str(config.dataset.general.batch_size)
    default = build_metadata(legacy_config(dataset), facts_for(config, datasets, family="sdxl"))
    assert default["ss_training_comment"] == "None"  # not given, as sd-scripts writes it
    assert default["ss_v2"] == "False" and default["ss_base_model_version"] == "sdxl_base_v1-0"


def test_ss_datasets_describes_a_real_scan(dataset, scanned):
    config, datasets = scanned
    metadata = build_metadata(config, facts_for(config, datasets))
    instance_images = images_in(dataset / "img" / INSTANCE)
    reg_images = images_in(dataset / "reg" / REG)
    [entry] = json.loads(metadata["ss_datasets"])
    assert entry["is_dreambooth"] is True
    assert entry["num_train_images"] == 10 * len(instance_images)
    assert entry["num_reg_images"] == 1 * len(reg_images)
    assert image_counts(datasets) == (entry["num_train_images"], entry["num_reg_images"])
    assert entry["resolution"] == [64, 64] and entry["batch_size_per_device"] == 1
    subsets = {subset["image_dir"]: subset for subset in entry["subsets"]}
    assert set(subsets) == {INSTANCE, REG}
    assert subsets[INSTANCE]["img_count"] == len(instance_images) and subsets[INSTANCE]["num_repeats"] == 10
    assert subsets[INSTANCE]["class_tokens"] == "sks dog" and subsets[INSTANCE]["is_reg"] is False
    assert subsets[REG]["is_reg"] is True and subsets[REG]["class_tokens"] == "dog"
    expected_subset_keys = {"img_count", "num_repeats", "color_aug", "flip_aug", "random_crop", "shuffle_caption",
                            "keep_tokens", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
                            "caption_prefix", "caption_suffix", "resize_interpolation", "image_dir",
                            "class_tokens", "is_reg"}
    assert all(set(subset) == expected_subset_keys for subset in entry["subsets"])
    # Only training folders are listed in ss_dataset_dirs; regularization folders are not.
    assert json.loads(metadata["ss_dataset_dirs"]) == {INSTANCE: {"n_repeats": 10, "img_count": len(instance_images)}}
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {REG: {"n_repeats": 1, "img_count": len(reg_images)}}


def test_tag_frequency_counts_caption_files_and_class_tokens(dataset, scanned):
    config, datasets = scanned
    metadata = build_metadata(config, facts_for(config, datasets))
    expected: dict[str, int] = {}
    for image in images_in(dataset / "img" / INSTANCE):
        for tag in image.with_suffix(".txt").read_text().splitlines()[0].split(","):
            if tag.strip():
                expected[tag.strip().lower()] = expected.get(tag.strip().lower(), 0) + 1
    frequency = json.loads(metadata["ss_tag_frequency"])
    assert frequency[INSTANCE] == expected
    assert frequency[REG] == {"dog": len(images_in(dataset / "reg" / REG))}  # uncaptioned: the class tokens
    assert json.loads(metadata["ss_datasets"])[0]["tag_frequency"] == frequency


@pytest.mark.parametrize("general", [{"resolution": 128}, {"bucket_no_upscale": True}])
def test_bucket_info_counts_repeats_and_numbers_buckets_like_sd_scripts(dataset, general):
    config = legacy_config(dataset, general=general)
    datasets = scan_config(config, dataset).datasets
    info = json.loads(build_metadata(config, facts_for(config, datasets))["ss_bucket_info"])
    records = [record for subset in datasets[0].subsets for record in subset.records]
    # Regularization is balanced to the training samples, so every bucket count together is twice those.
    train_samples = sum(record.num_repeats for record in records if not record.is_reg)
    assert sum(bucket["count"] for bucket in info["buckets"].values()) == 2 * train_samples
    # Numbered by position in the sorted bucket list: all predefined buckets, or those in use without upscaling.
    order = bucket_manager(datasets[0].params).buckets or sorted({record.bucket for record in records})
    assert order == sorted(order)
    for index, bucket in info["buckets"].items():
        size = order[int(index)]
        assert tuple(bucket["resolution"]) == size
        assert bucket["count"] == sum(record.num_repeats for record in records if record.bucket == size)
    used = [record for record in records if record.num_repeats]
    errors = []
    for record in used:
        with Image.open(record.path) as image:
            width, height = image.size
        errors.append(abs(record.bucket[0] / record.bucket[1] - width / height))
    assert info["mean_img_ar_error"] == pytest.approx(sum(errors) / len(errors))


def test_duplicate_folders_get_numbered_names_and_tags_are_counted_once(dataset):
    folder = str(dataset / "img" / INSTANCE)
    config = validate_config({"dataset": {"general": dict(GENERAL), "datasets": [
        {"subsets": [{"image_dir": folder, "num_repeats": 2}]},
        {"resolution": 128, "subsets": [{"image_dir": folder, "num_repeats": 3}]},
    ]}}, check_packages=False)
    datasets = scan_config(config, dataset).datasets
    metadata = build_metadata(config, facts_for(config, datasets))
    count = len(images_in(dataset / "img" / INSTANCE))
    assert json.loads(metadata["ss_dataset_dirs"]) == {INSTANCE: {"n_repeats": 2, "img_count": count},
                                                       f"{INSTANCE} (2)": {"n_repeats": 3, "img_count": count}}
    entries = json.loads(metadata["ss_datasets"])
    assert [entry["resolution"] for entry in entries] == [[64, 64], [128, 128]]
    assert list(json.loads(metadata["ss_tag_frequency"])) == [INSTANCE]
    assert "ss_bucket_info" not in metadata and "ss_resolution" not in metadata  # not a legacy single dataset


def test_network_args_are_recorded_like_kohya_ss_passes_them(dataset, scanned):
    _, datasets = scanned
    locon = legacy_config(dataset, network={"network_type": "locon", "conv_dim": 4, "conv_alpha": 2.0})
    args = json.loads(build_metadata(locon, facts_for(locon, datasets))["ss_network_args"])
    assert args == {"conv_dim": "4", "conv_alpha": "2.0", "dropout": 0.0}
    loha = legacy_config(dataset, network={"network_type": "loha", "network_dropout": 0.1,  # needs bypass_mode
                                           "network_args": {"preset": "attn-mlp", "use_tucker": True,
                                                            "bypass_mode": True}})
    metadata = build_metadata(loha, facts_for(loha, datasets, network_module="lycoris.kohya"))
    # conv_dim 0 is written for LyCORIS, which would read a missing conv_dim as network_dim.
    assert json.loads(metadata["ss_network_args"]) == {"preset": "attn-mlp", "use_tucker": "True",
                                                       "bypass_mode": "True", "algo": "loha", "conv_dim": "0",
                                                       "conv_alpha": "1.0", "dropout": 0.1}
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["ss_network_dropout"] == "0.1"
    # sd-scripts' DyLoRA: its unit is always recorded (kohya_ss passes unit=1 by default)
    dylora = legacy_config(dataset, network={"network_type": "dylora"})
    metadata = build_metadata(dylora, facts_for(dylora, datasets, network_module="networks.dylora"))
    assert json.loads(metadata["ss_network_args"]) == {"unit": "1", "dropout": 0.0}
    assert metadata["ss_network_module"] == "networks.dylora"


def test_ss_mixed_precision_records_what_ran(scanned):
    config, datasets = scanned
    asked = config.model_copy(update={"training": config.training.model_copy(update={"mixed_precision": "fp16"})})
    assert build_metadata(asked, facts_for(asked, datasets))["ss_mixed_precision"] == "fp16"  # nothing measured
    # a CPU run asked for fp16 trains in float32; accelerate says "no", as sd-scripts' --mixed_precision would
    assert build_metadata(asked, facts_for(asked, datasets, mixed_precision="no"))["ss_mixed_precision"] == "no"


def test_model_names_and_hashes(tiny_models, scanned):
    config, datasets = scanned
    checkpoint = Path(tiny_models["sd1_ckpt"])
    hashes = model_hash_metadata(str(checkpoint), str(checkpoint))
    data = checkpoint.read_bytes()
    assert hashes["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest() == hashes["ss_new_vae_hash"]
    assert hashes["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert model_hash_metadata(str(tiny_models["sd1"]), None) == {}  # a diffusers folder has no file hash
    metadata = build_metadata(config, facts_for(config, datasets, model_path=str(checkpoint),
                                                vae_path=str(tiny_models["sd1"]), model_hashes=hashes))
    assert metadata["ss_sd_model_name"] == checkpoint.name and metadata["ss_vae_name"] == Path(tiny_models["sd1"]).name
    assert metadata["ss_new_sd_model_hash"] == hashes["ss_new_sd_model_hash"]
    hub = build_metadata(config, facts_for(config, datasets))
    assert hub["ss_sd_model_name"] == "runwayml/stable-diffusion-v1-5" and "ss_sd_model_hash" not in hub
    assert "ss_vae_name" not in hub


def test_legacy_hash_reads_64_kib_at_1_mib(tmp_path):
    data = bytearray(os.urandom(0x180000))
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    legacy = a1111_legacy_hash(path)
    assert legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    data[0x10] ^= 0xFF  # outside the window: same legacy hash
    path.write_bytes(data)
    assert a1111_legacy_hash(path) == legacy
    data[0x100010] ^= 0xFF  # inside it: a different one
    path.write_bytes(data)
    assert a1111_legacy_hash(path) != legacy
    path.write_bytes(b"short")
    assert a1111_legacy_hash(path) == hashlib.sha256(b"").hexdigest()[:8]


def test_with_progress_adds_the_per_save_keys(scanned):
    config, datasets = scanned
    metadata = build_metadata(config, facts_for(config, datasets))
    saved = with_progress(metadata, steps=250, epoch=3, finished_at=1_700_000_123.25)
    assert (saved["ss_steps"], saved["ss_epoch"], saved["ss_training_finished_at"]) == ("250", "3", "1700000123.25")
    assert "ss_steps" not in metadata and {k: v for k, v in saved.items() if k in metadata} == metadata


# --- ModelSpec -------------------------------------------------------------------------------------------------


def test_modelspec_keys_follow_the_family(dataset, scanned):
    config, datasets = scanned
    now = 1_700_000_000.75
    sd1 = modelspec_metadata(config, facts_for(config, datasets, resolution=(64, 64)), now=now)
    assert sd1["modelspec.sai_model_spec"] == "1.0.1"
    assert sd1["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert sd1["modelspec.implementation"] == "diffusers"
    assert sd1["modelspec.title"] == config.saving.output_name
    assert sd1["modelspec.resolution"] == "64x64" and sd1["modelspec.prediction_type"] == "epsilon"
    assert sd1["modelspec.date"] == datetime.datetime.fromtimestamp(1_700_000_000).isoformat()
    assert sd1["modelspec.encoder_layer"] == str(config.model.clip_skip)
    assert sd1["modelspec.implementation_version"].startswith("atelier/")
    assert "modelspec.timestep_range" not in sd1 and "modelspec.author" not in sd1
    assert all(isinstance(value, str) for value in sd1.values())
    v_model = modelspec_metadata(config, facts_for(config, datasets, family="sd2", v_prediction=True), now=now)
    assert v_model["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v_model["modelspec.resolution"] == "768x768" and v_model["modelspec.prediction_type"] == "v"
    sdxl = modelspec_metadata(config, facts_for(config, datasets, family="sdxl"), kind="textual-inversion")
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert sdxl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert sdxl["modelspec.resolution"] == "1024x1024"
    with pytest.raises(ValueError, match="kind"):
        modelspec_metadata(config, facts_for(config, datasets), kind="lycoris")


def test_modelspec_user_fields_and_timestep_range(dataset, scanned):
    _, datasets = scanned
    user = {"title": "Red Dog", "author": "me", "description": "a dog", "license": "MIT", "tags": "dog, red"}
    config = legacy_config(dataset, saving={"metadata": user}, training={"min_timestep": 100, "max_timestep": 900})
    spec = modelspec_metadata(config, facts_for(config, datasets))
    assert {key: spec[f"modelspec.{key}"] for key in user} == user
    assert spec["modelspec.timestep_range"] == "100,900"
    assert "modelspec.title" not in build_metadata(config, facts_for(config, datasets))


# --- network files ---------------------------------------------------------------------------------------------


def lora_tensors(rows: int = 40_000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"lora_unet_a.lora_down.weight": torch.randn(8, rows, generator=generator),
            "lora_unet_a.lora_up.weight": torch.randn(rows, 8, generator=generator),
            "lora_unet_a.alpha": torch.tensor(4.0)}


def test_safetensors_file_has_string_metadata_and_additional_networks_hashes(tmp_path, scanned):
    config, datasets = scanned
    facts = facts_for(config, datasets)
    metadata = {**with_progress(build_metadata(config, facts), steps=10, epoch=1, finished_at=1.0),
                **modelspec_metadata(config, facts)}
    tensors = lora_tensors()  # 2.5 MB: the legacy hash window at 1 MiB holds tensor data
    path = save_network_file(tmp_path / "out", tensors, metadata, save_as="safetensors")
    assert path == tmp_path / "out.safetensors" and os.listdir(tmp_path) == ["out.safetensors"]
    loaded, stored = read_network_file(path)
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)
    assert all(isinstance(value, str) for value in stored.values())
    assert {key: stored[key] for key in metadata} == metadata
    # Independently: re-serialise with only the ss_* keys, as sd-scripts' precalculate_safetensors_hashes does.
    reference = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert len(reference) > 0x110000
    header = int.from_bytes(reference[:8], "little")
    assert stored["sshs_model_hash"] == hashlib.sha256(reference[8 + header:]).hexdigest()
    assert stored["sshs_legacy_hash"] == hashlib.sha256(reference[0x100000:0x110000]).hexdigest()[:8]
    # The tensor bytes are the same in the final file, so its data section hashes the same.
    written = path.read_bytes()
    assert hashlib.sha256(written[8 + int.from_bytes(written[:8], "little"):]).hexdigest() == stored["sshs_model_hash"]
    # User-editable keys do not change the hashes; training keys do.
    retitled = save_network_file(tmp_path / "b", tensors, {**metadata, "modelspec.title": "x"}, save_as="safetensors")
    assert read_network_file(retitled)[1]["sshs_legacy_hash"] == stored["sshs_legacy_hash"]
    resession = save_network_file(tmp_path / "c", tensors, {**metadata, "ss_session_id": "1"}, save_as="safetensors")
    assert read_network_file(resession)[1]["sshs_legacy_hash"] != stored["sshs_legacy_hash"]


@pytest.mark.parametrize("save_as", ["ckpt", "pt"])
def test_ckpt_and_pt_are_plain_state_dicts(tmp_path, save_as):
    tensors = lora_tensors(rows=16)
    path = save_network_file(tmp_path / "my.lora-v1.safetensors", tensors, {"ss_v2": "False"}, save_as=save_as)
    assert path.name == f"my.lora-v1.{save_as}"
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(tensors) and all(torch.equal(raw[key], tensors[key]) for key in tensors)
    loaded, metadata = read_network_file(path)
    assert metadata == {} and all(torch.equal(loaded[key], tensors[key]) for key in tensors)


def test_save_precision_dtypes_and_file_errors(tmp_path):
    assert (save_dtype("float"), save_dtype("fp16"), save_dtype("bf16"), save_dtype(None)) == (
        torch.float32, torch.float16, torch.bfloat16, None)
    with pytest.raises(ValueError, match="save_precision"):
        save_dtype("fp8")
    tensors = {key: value.to(save_dtype("fp16")) for key, value in lora_tensors(rows=16).items()}
    path = save_network_file(tmp_path / "half", tensors, {}, save_as="safetensors")
    assert {tensor.dtype for tensor in load_file(path).values()} == {torch.float16}
    with pytest.raises(TypeError, match="ss_num_epochs"):
        save_network_file(tmp_path / "bad", tensors, {"ss_num_epochs": 3}, save_as="safetensors")  # type: ignore
    with pytest.raises(ValueError, match="diffusers"):
        save_network_file(tmp_path / "bad", tensors, {}, save_as="diffusers")
    assert sorted(os.listdir(tmp_path)) == ["half.safetensors"]  # failures leave nothing behind
