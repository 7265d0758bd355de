"""The metadata written into trained network files: sd-scripts' `ss_*` keys, ModelSpec 1.0.1 and model hashes.

A1111, ComfyUI, Civitai and sd-webui-additional-networks read these keys from kohya files, so they follow
sd-scripts' train_network.py exactly (spec §5.3): the same names, and every value `str()`-ed the way sd-scripts
does it (None -> "None", True -> "True", tuples as "(512, 512)", nested data as JSON).
Pure Python: importing this module imports no torch.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import __version__
from engine.config.choices import NETWORK_TYPES
from engine.config.schema import RunConfig
from engine.data.captions import folder_tag_frequency
from engine.data.records import DatasetPlan, SubsetPlan
from engine.data.scan import bucket_manager
from engine.models.families import family_info

MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION_VERSION = f"atelier/{__version__}"
STABILITY_AI_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
DEFAULT_TIMESTEPS = (0, 1000)  # sd-scripts' range when neither min_timestep nor max_timestep is given

_LEGACY_HASH_OFFSET = 0x100000  # A1111's old "model hash": 64 KiB read at 1 MiB
_LEGACY_HASH_LENGTH = 0x10000
_CHUNK = 1024 * 1024

# ss_* keys of options Atelier does not offer, with the value sd-scripts writes when they are not given.
UNSUPPORTED_OPTION_DEFAULTS: dict[str, Any] = {
    "ss_lowram": False,
    "ss_scale_weight_norms": None,
    "ss_fp8_base": False,
    "ss_fp8_base_unet": False,
    "ss_max_validation_steps": None,
    "ss_validate_every_n_epochs": None,
    "ss_validate_every_n_steps": None,
}


@dataclass
class TrainingFacts:
    """What the metadata needs that the config does not hold: decided at the start of a run, or measured.

    `model_hashes` comes from `model_hash_metadata()`, which reads the whole base model once (seconds for a
    multi-GB file): the trainer calls it once per run and stores the result here, not once per save.
    """

    session_id: int
    started_at: float  # unix time
    family: str  # "sd1", "sd2" or "sdxl" (resolved, never "auto")
    v_prediction: bool
    num_train_images: int  # including repeats
    num_reg_images: int  # including repeats, before balancing
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    warmup_steps: int
    optimizer_description: str  # sd-scripts' "<module.Class>(<args>)"
    datasets: list[DatasetPlan]
    model_path: str  # the base model as given (a file, a diffusers folder or a hub id), paths resolved
    vae_path: str | None = None
    network_module: str = "networks.lora"
    resolution: tuple[int, int] | None = None  # (width, height); None = the family's default for modelspec
    num_validation_images: int = 0
    model_hashes: dict[str, str] = field(default_factory=dict)


def new_session_id() -> int:
    """A random id shared by every file of one run (sd-scripts: random.randint(0, 2**32))."""
    return secrets.randbelow(2**32 + 1)


# --- hashes ----------------------------------------------------------------------------------------------------


def legacy_hash_of_bytes(data: bytes) -> str:
    """First 8 hex digits of sha256 over the 64 KiB at offset 1 MiB (empty when the data is shorter)."""
    return hashlib.sha256(data[_LEGACY_HASH_OFFSET:_LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]).hexdigest()[:8]


def a1111_legacy_hash(path: str | Path) -> str:
    """A1111's old model hash (sd-scripts' `model_hash`): reads only 64 KiB, so it is instant on any file."""
    with open(path, "rb") as stream:
        stream.seek(_LEGACY_HASH_OFFSET)
        return hashlib.sha256(stream.read(_LEGACY_HASH_LENGTH)).hexdigest()[:8]


def sha256_file(path: str | Path) -> str:
    """The full-file sha256 (A1111's new model hash, sd-scripts' `calculate_sha256`), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_hash_metadata(model_path: str | None, vae_path: str | None = None) -> dict[str, str]:
    """ss_sd_model_hash / ss_new_sd_model_hash and the VAE's, for whichever of the two is a local file.

    Folders (diffusers layouts) and hub ids get no hash: sd-scripts would write "IsADirectory" or nothing.
    Slow on big files; call once per run and keep the result in `TrainingFacts.model_hashes`.
    """
    hashes = {}
    for path, old_key, new_key in ((model_path, "ss_sd_model_hash", "ss_new_sd_model_hash"),
                                   (vae_path, "ss_vae_hash", "ss_new_vae_hash")):
        if path and os.path.isfile(path):
            hashes[old_key] = a1111_legacy_hash(path)
            hashes[new_key] = sha256_file(path)
    return hashes


def _model_name(path: str) -> str:
    """sd-scripts stores the basename of a local model and a hub id as given."""
    return os.path.basename(os.path.normpath(path)) if os.path.exists(path) else path


# --- the ss_* keys -------------------------------------------------------------------------------------------


def build_metadata(config: RunConfig, facts: TrainingFacts) -> dict[str, str]:
    """Every ss_* key sd-scripts' train_network.py writes for the same run, as strings.

    The progress keys (ss_steps, ss_epoch, ss_training_finished_at) are added per save by `with_progress`;
    the ModelSpec keys come from `modelspec_metadata`.
    """
    metadata: dict[str, Any] = {
        **_run_keys(config, facts), **_network_keys(config, facts), **_training_keys(config),
        **_dataset_option_keys(config), **UNSUPPORTED_OPTION_DEFAULTS,
    }
    metadata.update(dataset_metadata(facts.datasets))
    if config.dataset.train_data_dir:
        metadata.update(_legacy_folder_keys(config, facts.datasets))
    network_args = network_args_metadata(config)
    if network_args:
        metadata["ss_network_args"] = json.dumps(network_args)
    metadata.update(_model_keys(facts))
    return {key: str(value) for key, value in metadata.items()}


def _run_keys(config: RunConfig, facts: TrainingFacts) -> dict[str, Any]:
    optimizer = config.optimizer
    return {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.started_at,
        "ss_output_name": config.saving.output_name,
        "ss_learning_rate": optimizer.learning_rate,
        "ss_text_encoder_lr": optimizer.text_encoder_lr,
        "ss_unet_lr": optimizer.unet_lr,
        "ss_num_train_images": facts.num_train_images,
        "ss_num_validation_images": facts.num_validation_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": config.training.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.training.gradient_accumulation_steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": facts.warmup_steps,
        "ss_lr_scheduler": optimizer.lr_scheduler,
        "ss_optimizer": facts.optimizer_description,
        "ss_max_grad_norm": optimizer.max_grad_norm,
        "ss_seed": config.training.seed,
        "ss_training_comment": config.saving.metadata.training_comment or None,
        # sd-scripts records its git commit here; ours is the engine version.
        "ss_sd_scripts_commit_hash": IMPLEMENTATION_VERSION,
    }


def _network_keys(config: RunConfig, facts: TrainingFacts) -> dict[str, Any]:
    network, model = config.network, config.model
    return {
        "ss_network_module": facts.network_module,
        "ss_network_dim": network.network_dim,
        "ss_network_alpha": network.network_alpha,
        "ss_network_dropout": network.network_dropout,
        "ss_v2": facts.family == "sd2",
        "ss_base_model_version": family_info(facts.family).base_model_version(facts.v_prediction),
        "ss_clip_skip": model.clip_skip,
        "ss_max_token_length": model.max_token_length,
    }


def _training_keys(config: RunConfig) -> dict[str, Any]:
    training = config.training
    return {
        "ss_mixed_precision": training.mixed_precision,
        "ss_full_fp16": training.full_fp16,
        "ss_cache_latents": training.cache_latents,
        "ss_noise_offset": training.noise_offset,
        "ss_noise_offset_random_strength": training.noise_offset_random_strength,
        "ss_multires_noise_iterations": training.multires_noise_iterations,
        "ss_multires_noise_discount": training.multires_noise_discount,
        "ss_adaptive_noise_scale": training.adaptive_noise_scale,
        "ss_zero_terminal_snr": training.zero_terminal_snr,
        "ss_ip_noise_gamma": training.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": training.ip_noise_gamma_random_strength,
        "ss_prior_loss_weight": training.prior_loss_weight,
        "ss_min_snr_gamma": training.min_snr_gamma,
        "ss_debiased_estimation": training.debiased_estimation_loss,
        "ss_loss_type": training.loss_type,
        "ss_huber_schedule": training.huber_schedule,
        "ss_huber_scale": training.huber_scale,
        "ss_huber_c": training.huber_c,
    }


def _dataset_option_keys(config: RunConfig) -> dict[str, Any]:
    """Keys that sd-scripts takes from command-line arguments; [dataset.general] plays that role here."""
    general = config.dataset.general
    crop_range = general.face_crop_aug_range
    return {
        "ss_caption_dropout_rate": general.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": general.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": general.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": tuple(crop_range) if crop_range is not None else None,  # sd-scripts parses a tuple
        "ss_validation_seed": general.validation_seed,
        "ss_validation_split": general.validation_split,
        "ss_resize_interpolation": general.resize_interpolation,
    }


def _model_keys(facts: TrainingFacts) -> dict[str, str]:
    names = {"ss_sd_model_name": _model_name(facts.model_path)} if facts.model_path else {}
    if facts.vae_path:
        names["ss_vae_name"] = _model_name(facts.vae_path)
    return {**names, **facts.model_hashes}


def network_args_metadata(config: RunConfig) -> dict[str, Any]:
    """The network's keyword arguments as sd-scripts records them in ss_network_args (empty = key not written).

    kohya_ss passes conv_dim, dropouts and LyCORIS' algo as `key=value` strings in --network_args, so they are
    recorded here the same way; train_network.py then adds `dropout` (its LyCORIS workaround).
    """
    network = config.network
    args: dict[str, Any] = {key: _arg_text(value) for key, value in network.network_args.items()}
    if NETWORK_TYPES[network.network_type].backend == "lycoris":
        args.setdefault("algo", network.network_type)
    if network.conv_dim:
        args.setdefault("conv_dim", str(network.conv_dim))
        args.setdefault("conv_alpha", str(network.conv_alpha))
    for key in ("rank_dropout", "module_dropout"):
        if getattr(network, key):
            args.setdefault(key, str(getattr(network, key)))
    if args:
        args.setdefault("dropout", network.network_dropout)
    return args


def _arg_text(value: Any) -> str:
    """A network argument as the text after `key=` on sd-scripts' command line (lists are comma-separated)."""
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


# --- datasets --------------------------------------------------------------------------------------------------


def dataset_metadata(datasets: list[DatasetPlan]) -> dict[str, str]:
    """ss_datasets, ss_tag_frequency and ss_dataset_dirs as sd-scripts writes them with a dataset config.

    Also ss_bucket_info when there is a single dataset (sd-scripts' legacy key, which describes one dataset);
    with several, each dataset's buckets are in its ss_datasets entry.
    """
    entries, tag_frequency, dataset_dirs = [], {}, {}
    for dataset in datasets:
        entries.append(_dataset_entry(dataset))
        for folder, counts in dataset_tag_frequency(dataset).items():
            tag_frequency.setdefault(folder, counts)  # a folder used by several datasets is counted once
        for subset in dataset.subsets:
            name = _dir_name(subset)
            if name is not None:
                dataset_dirs[_unique(name, dataset_dirs)] = _dir_info(subset)
    metadata = {"ss_datasets": json.dumps(entries), "ss_tag_frequency": json.dumps(tag_frequency),
                "ss_dataset_dirs": json.dumps(dataset_dirs)}
    if len(datasets) == 1:
        metadata["ss_bucket_info"] = json.dumps(bucket_info(datasets[0]))
    return metadata


def _dataset_entry(dataset: DatasetPlan) -> dict[str, Any]:
    params = dataset.params
    is_dreambooth = not any(subset.params.get("metadata_file") for subset in dataset.subsets)
    return {
        "is_dreambooth": is_dreambooth,
        "batch_size_per_device": params["batch_size"],
        "num_train_images": sum(_images_with_repeats(s) for s in dataset.subsets if not s.is_reg),
        "num_reg_images": sum(_images_with_repeats(s) for s in dataset.subsets if s.is_reg),
        "resolution": list(params["resolution"]),
        "enable_bucket": bool(params["enable_bucket"]),
        "min_bucket_reso": params["min_bucket_reso"],
        "max_bucket_reso": params["max_bucket_reso"],
        "tag_frequency": dataset_tag_frequency(dataset),
        "bucket_info": bucket_info(dataset),
        "resize_interpolation": _shared_value(dataset.subsets, "resize_interpolation"),
        "subsets": [_subset_entry(subset, is_dreambooth) for subset in dataset.subsets],
    }


def _images_with_repeats(subset: SubsetPlan) -> int:
    """Images times the subset's repeats, before regularization balancing changes per-image repeats."""
    return len(subset.records) * subset.params["num_repeats"]


def image_counts(datasets: Iterable[DatasetPlan]) -> tuple[int, int]:
    """(num_train_images, num_reg_images) for TrainingFacts, counted as sd-scripts does: images times repeats,
    regularization before balancing."""
    subsets = [subset for dataset in datasets for subset in dataset.subsets]
    return (sum(_images_with_repeats(s) for s in subsets if not s.is_reg),
            sum(_images_with_repeats(s) for s in subsets if s.is_reg))


def _shared_value(subsets: Iterable[SubsetPlan], key: str) -> Any:
    """A subset-level setting as one dataset value: the value every subset has, else None."""
    values = {subset.params.get(key) for subset in subsets}
    return values.pop() if len(values) == 1 else None


def _subset_entry(subset: SubsetPlan, is_dreambooth: bool) -> dict[str, Any]:
    params = subset.params
    entry: dict[str, Any] = {
        "img_count": len(subset.records),
        "num_repeats": params["num_repeats"],
        **{key: bool(params[key]) for key in ("color_aug", "flip_aug", "random_crop", "shuffle_caption")},
        **{key: params[key] for key in ("keep_tokens", "keep_tokens_separator", "secondary_separator")},
        "enable_wildcard": bool(params["enable_wildcard"]),
        **{key: params[key] for key in ("caption_prefix", "caption_suffix", "resize_interpolation")},
    }
    if params.get("image_dir"):
        entry["image_dir"] = _basename(params["image_dir"])
    if is_dreambooth:
        entry.update(class_tokens=params.get("class_tokens"), is_reg=subset.is_reg)
    else:
        entry["metadata_file"] = _basename(params["metadata_file"])
    return entry


def _dir_name(subset: SubsetPlan) -> str | None:
    """The name ss_dataset_dirs lists a subset under; regularization subsets are not listed."""
    if subset.params.get("metadata_file"):
        return _basename(subset.params["metadata_file"])
    if subset.is_reg or not subset.params.get("image_dir"):
        return None
    return _basename(subset.params["image_dir"])


def _dir_info(subset: SubsetPlan) -> dict[str, int]:
    return {"n_repeats": subset.params["num_repeats"], "img_count": len(subset.records)}


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    """sd-scripts' naming of a folder listed twice: 'name', then 'name (2)', 'name (3)', ..."""
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name} ({number})", number + 1
    return candidate


def _basename(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def dataset_tag_frequency(dataset: DatasetPlan) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over every scanned caption, regularization folders included, as sd-scripts counts.

    Fine-tuning subsets are listed under their metadata file; their count uses the whole caption (sd-scripts
    counts only the metadata's `tags` field, which the scan folds into the caption).
    """
    pairs = []
    for subset in dataset.subsets:
        folder = _basename(subset.params.get("metadata_file") or subset.params["image_dir"])
        pairs.extend((folder, record.caption) for record in subset.records)
        if not subset.records:
            pairs.append((folder, ""))  # sd-scripts lists a folder even when it holds no captions
    return folder_tag_frequency(pairs)


def bucket_info(dataset: DatasetPlan) -> dict[str, Any] | None:
    """sd-scripts' bucket_info: images per bucket including repeats, and the mean |aspect-ratio error|.

    Buckets are numbered by their position in the sorted bucket list (all predefined buckets, or the buckets in
    use with bucket_no_upscale), as sd-scripts numbers them. None when bucketing is off, as in sd-scripts.
    """
    if not dataset.params["enable_bucket"]:
        return None
    used = [record for subset in dataset.subsets for record in subset.records if record.num_repeats > 0]
    order = bucket_manager(dataset.params).buckets or sorted({record.bucket for record in used})
    counts: dict[tuple[int, int], int] = {}
    for record in used:
        counts[record.bucket] = counts.get(record.bucket, 0) + record.num_repeats
    buckets = {index: {"resolution": list(size), "count": counts[size]}
               for index, size in enumerate(order) if counts.get(size)}
    errors = [abs(r.bucket[0] / r.bucket[1] - r.size[0] / r.size[1]) for r in used]
    return {"buckets": buckets, "mean_img_ar_error": statistics.fmean(errors) if errors else 0}


def _legacy_folder_keys(config: RunConfig, datasets: list[DatasetPlan]) -> dict[str, Any]:
    """The keys sd-scripts writes instead of ss_datasets for train_data_dir/reg_data_dir runs (one dataset)."""
    general = config.dataset.general
    dataset = datasets[0] if datasets else None
    reg_dirs = {_basename(s.params["image_dir"]): _dir_info(s) for s in (dataset.subsets if dataset else [])
                if s.is_reg}
    return {
        "ss_batch_size_per_device": general.batch_size,
        "ss_total_batch_size": general.batch_size * config.launch.num_processes
        * config.training.gradient_accumulation_steps,
        "ss_resolution": tuple(general.resolution),
        **{f"ss_{key}": bool(getattr(general, key)) for key in (
            "color_aug", "flip_aug", "random_crop", "shuffle_caption", "enable_bucket", "bucket_no_upscale")},
        "ss_min_bucket_reso": general.min_bucket_reso,
        "ss_max_bucket_reso": general.max_bucket_reso,
        "ss_keep_tokens": general.keep_tokens,
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
    }


# --- per save --------------------------------------------------------------------------------------------------


def with_progress(metadata: Mapping[str, str], *, steps: int, epoch: int, finished_at: float) -> dict[str, str]:
    """A copy of the run's metadata with the keys sd-scripts updates at every save."""
    return {**metadata, "ss_training_finished_at": str(finished_at), "ss_steps": str(steps), "ss_epoch": str(epoch)}


# --- ModelSpec -------------------------------------------------------------------------------------------------

MODELSPEC_KINDS = ("lora", "textual-inversion", "")  # the architecture suffix: LoRA, embedding, full checkpoint


def _implementation(kind: str, family: str) -> str:
    """LoRA files depend on the family (diffusers for SD1/2, SGM for SDXL); embeddings and checkpoints are SGM."""
    if kind not in MODELSPEC_KINDS:
        raise ValueError(f"unknown modelspec kind {kind!r}; expected one of {MODELSPEC_KINDS}")
    return family_info(family).modelspec_implementation if kind == "lora" else STABILITY_AI_IMPLEMENTATION


def modelspec_metadata(config: RunConfig, facts: TrainingFacts, *, kind: str = "lora",
                       now: float | None = None) -> dict[str, str]:
    """ModelSpec 1.0.1 keys as sd-scripts' sai_model_spec writes them (spec §5.3).

    Args:
        kind: "lora", "textual-inversion", or "" for a full checkpoint (the architecture's suffix).
        now: unix time of the save, for modelspec.date (default: now).
    """
    info = family_info(facts.family)
    v_prediction = facts.v_prediction
    width, height = facts.resolution or (info.resolution_for(v_prediction),) * 2
    timestamp = int(now if now is not None else time.time())  # sd-scripts drops the microseconds
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": info.modelspec_architecture(v_prediction, kind),
        "modelspec.implementation": _implementation(kind, facts.family),
        "modelspec.title": config.saving.metadata.title or config.saving.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(timestamp).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.encoder_layer": str(config.model.clip_skip),
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
    }
    timesteps = (config.training.min_timestep, config.training.max_timestep)
    if timesteps != DEFAULT_TIMESTEPS:
        spec["modelspec.timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    user = config.saving.metadata
    for key in ("author", "description", "license", "tags"):
        if getattr(user, key):
            spec[f"modelspec.{key}"] = getattr(user, key)
    return spec
