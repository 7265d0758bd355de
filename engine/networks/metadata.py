"""The metadata written into trained network files: sd-scripts' `ss_*` keys, ModelSpec 1.0.1 and model hashes.

A1111, ComfyUI, Civitai and sd-webui-additional-networks read these keys from kohya files, so they follow
sd-scripts' train_network.py exactly (spec §5.3): the same names, and every value `str()`-ed the way sd-scripts
does it (None -> "None", True -> "True", tuples as "(512, 512)", nested data as JSON).
FLUX.1 / Chroma files (spec §5.4) get sd-scripts' flux keys (``ss_model_type``, the flow-matching settings),
``networks.lora_flux`` as the kohya network module, ``flux-1-dev/lora`` style architectures picked by the base file's
variant, and no ``modelspec.prediction_type``. SD3 / SD3.5 files (spec §8.6) get ``networks.lora_sd3``, the variant
as ``ss_base_model_version`` (``medium``, ``5-medium``, ``5-large``) and in the architecture
(``stable-diffusion-3-5-large/lora``), sd-scripts' SD3 keys (``ss_apply_lg_attn_mask``, ``ss_apply_t5_attn_mask``,
the weighting settings) and no ``modelspec.prediction_type`` either (sd-scripts writes ``epsilon`` there, an artefact
of its SD1 code path, spec appendix A.5). What differs per family comes from ``FamilyInfo`` fields (``objective``,
``model_type``, ``kohya_network_module``, ``variant_architectures``, ``base_version_is_variant``), never from its
name.
Pure Python: importing this module imports no torch.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import __version__
from engine.config.choices import NETWORK_TYPES
from engine.config.schema import RunConfig
from engine.data.records import DatasetPlan
from engine.models.families import family_info
from engine.networks.dataset_metadata import dataset_metadata, legacy_folder_keys

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
    # The base file's variant (LoadedModel.scheduler_config["variant"]: "dev", "schnell", "chroma"; SD3 "medium",
    # "5-medium", "5-large"; "" for SD): FLUX.1 dev and schnell share a family but not a modelspec architecture, and
    # SD3's variant is its ss_base_model_version.
    variant: str = ""
    # The mixed precision the run used (accelerate's "no", "fp16" or "bf16"): a CPU run asked for fp16 trains in
    # float32 and records "no", as sd-scripts would for that run. "" = the config's setting.
    mixed_precision: str = ""


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
        **_run_keys(config, facts), **_network_keys(config, facts), **_training_keys(config, facts),
        **_dataset_option_keys(config, facts), **UNSUPPORTED_OPTION_DEFAULTS, **_fp8_keys(config),
        **_flow_keys(config, facts),
    }
    metadata.update(dataset_metadata(facts.datasets))
    if config.dataset.train_data_dir:
        metadata.update(legacy_folder_keys(config, facts.datasets))
    network_args = network_args_metadata(config)
    if network_args:
        metadata["ss_network_args"] = json.dumps(network_args)
    if _flag_arg(network_args.get("split_qkv")):
        metadata[SPLIT_QKV_ALPHA_KEY] = SPLIT_QKV_ALPHA_CONVENTION
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
        "ss_network_module": _network_module(facts),
        "ss_network_dim": network.network_dim,
        "ss_network_alpha": network.network_alpha,
        "ss_network_dropout": network.network_dropout,
        "ss_v2": family_info(facts.family).kohya_v2,
        "ss_base_model_version": family_info(facts.family).base_model_version(facts.v_prediction, facts.variant),
        "ss_clip_skip": model.clip_skip,
        "ss_max_token_length": model.max_token_length,
    }


def _network_module(facts: TrainingFacts) -> str:
    """Our kohya-format LoRA is sd-scripts' ``networks.lora`` on SD and ``networks.lora_flux`` on FLUX/Chroma (the
    family's ``kohya_network_module``); other modules (``lycoris.kohya``) are the same on every family."""
    if facts.network_module == "networks.lora":
        return getattr(family_info(facts.family), "kohya_network_module", facts.network_module)
    return facts.network_module


def _fp8_keys(config: RunConfig) -> dict[str, Any]:
    model = config.model
    return {"ss_fp8_base": getattr(model, "fp8_base", False),
            "ss_fp8_base_unet": getattr(model, "fp8_base_unet", False)}


# FamilyInfo.objective of the flow-matching families: FLUX.1 / Chroma ("flow") and SD3 ("sd3", x0 flow matching).
FLOW_OBJECTIVES = frozenset({"flow", "sd3"})


def is_flow_family(family: str) -> bool:
    """Flow matching: no modelspec prediction type (neither epsilon nor v) and the flow ss_* keys."""
    return getattr(family_info(family), "objective", "ddpm") in FLOW_OBJECTIVES


# The weighting keys both flow trainers' update_metadata write: ss_* key -> [flow] setting, with sd-scripts'
# defaults for a config without the flow section.
_WEIGHTING_KEYS: dict[str, tuple[str, Any]] = {
    "ss_weighting_scheme": ("weighting_scheme", "uniform"),
    "ss_logit_mean": ("logit_mean", 0.0),
    "ss_logit_std": ("logit_std", 1.0),
    "ss_mode_scale": ("mode_scale", 1.29),
}
# The flow-matching keys sd-scripts' flux_train_network.update_metadata writes besides those.
_FLOW_KEYS: dict[str, tuple[str, Any]] = {
    **_WEIGHTING_KEYS,
    "ss_guidance_scale": ("guidance_scale", 3.5),
    "ss_timestep_sampling": ("timestep_sampling", "sigma"),
    "ss_sigmoid_scale": ("sigmoid_scale", 1.0),
    "ss_model_prediction_type": ("model_prediction_type", "raw"),
    "ss_discrete_flow_shift": ("discrete_flow_shift", 3.0),
}


def _flux_keys(config: RunConfig, facts: TrainingFacts) -> dict[str, Any]:
    """FLUX.1 / Chroma: ss_model_type, ss_apply_t5_attn_mask and the flow settings (spec §5.4)."""
    flow = getattr(config, "flow", None)
    keys: dict[str, Any] = {"ss_model_type": getattr(family_info(facts.family), "model_type", "") or None,
                            "ss_apply_t5_attn_mask": getattr(config.model, "apply_t5_attn_mask", False)}
    keys.update({key: getattr(flow, name, default) for key, (name, default) in _FLOW_KEYS.items()})
    return keys


def _sd3_keys(config: RunConfig, facts: TrainingFacts) -> dict[str, Any]:
    """SD3 / SD3.5: sd3_train_network.update_metadata's keys (spec §8.6; no ss_training_shift, as there)."""
    flow = getattr(config, "flow", None)
    keys: dict[str, Any] = {"ss_apply_lg_attn_mask": getattr(config.model, "apply_lg_attn_mask", False),
                            "ss_apply_t5_attn_mask": getattr(config.model, "apply_t5_attn_mask", False)}
    keys.update({key: getattr(flow, name, default) for key, (name, default) in _WEIGHTING_KEYS.items()})
    return keys


# FamilyInfo.objective -> the trainer-specific ss_* keys of its files (none for SD's "ddpm").
_OBJECTIVE_KEYS = {"flow": _flux_keys, "sd3": _sd3_keys}


def _flow_keys(config: RunConfig, facts: TrainingFacts) -> dict[str, Any]:
    """The flow-matching families' own ss_* keys (spec §5.4, §8.6); none for SD."""
    keys = _OBJECTIVE_KEYS.get(getattr(family_info(facts.family), "objective", "ddpm"))
    return keys(config, facts) if keys else {}


def _training_keys(config: RunConfig, facts: TrainingFacts) -> dict[str, Any]:
    training = config.training
    return {
        "ss_mixed_precision": facts.mixed_precision or training.mixed_precision,  # what ran, not what was asked
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


def _dataset_option_keys(config: RunConfig, facts: TrainingFacts) -> dict[str, Any]:
    """Keys that sd-scripts takes from command-line arguments; [dataset.general] plays that role here."""
    from engine.data.face_crop import face_crop_range_used

    general = config.dataset.general
    crop_range = face_crop_range_used(facts.datasets)  # only when it cropped images (buckets off, face boxes)
    return {
        "ss_caption_dropout_rate": general.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": general.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": general.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": tuple(crop_range) if crop_range is not None else None,  # sd-scripts parses a tuple
        "ss_validation_seed": general.validation_seed,
        "ss_validation_split": general.validation_split,
        "ss_resize_interpolation": general.resize_interpolation,
        **_validation_keys(config),
    }


def _validation_keys(config: RunConfig) -> dict[str, Any]:
    """sd-scripts writes None for "not given"; our 0 means off (steps) or all batches (max_validation_steps)."""
    validation = config.validation
    return {"ss_max_validation_steps": validation.max_validation_steps or None,
            "ss_validate_every_n_epochs": validation.validate_every_n_epochs,
            "ss_validate_every_n_steps": validation.validate_every_n_steps or None}


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
    if NETWORK_TYPES[network.network_type].backend == "dylora":
        args.setdefault("unit", "1")  # sd-scripts' networks.dylora default, written out as kohya_ss passes it
    # LyCORIS reads a missing conv_dim as network_dim, so for it 0 is written out too.
    if network.conv_dim or NETWORK_TYPES[network.network_type].backend == "lycoris":
        args.setdefault("conv_dim", str(network.conv_dim))
        args.setdefault("conv_alpha", str(network.conv_alpha))
    for key in ("rank_dropout", "module_dropout"):
        if getattr(network, key):
            args.setdefault(key, str(getattr(network, key)))
    if args:
        args.setdefault("dropout", network.network_dropout)
    return args


# split_qkv files store k * alpha for the merged modules (engine.networks.lora_modules.SplitLoRAModule,
# spec appendix A.2).
SPLIT_QKV_ALPHA_KEY = "atelier_split_qkv_alpha"
SPLIT_QKV_ALPHA_CONVENTION = ("alpha_times_parts: merged q/k/v(/mlp) modules store alpha x parts, so alpha / lora_down "
                              "rows is the trained scale")


def _flag_arg(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _arg_text(value: Any) -> str:
    """A network argument as the text after `key=` on sd-scripts' command line (lists are comma-separated)."""
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


# --- per save --------------------------------------------------------------------------------------------------


def with_progress(metadata: Mapping[str, str], *, steps: int, epoch: int, finished_at: float) -> dict[str, str]:
    """A copy of the run's metadata with the keys sd-scripts updates at every save."""
    return {**metadata, "ss_training_finished_at": str(finished_at), "ss_steps": str(steps), "ss_epoch": str(epoch)}


# --- ModelSpec -------------------------------------------------------------------------------------------------

MODELSPEC_KINDS = ("lora", "textual-inversion", "")  # the architecture suffix: LoRA, embedding, full checkpoint


def _implementation(kind: str, family: str) -> str:
    """LoRA files depend on the family (diffusers for SD1/2, SGM for SDXL); SD embeddings and checkpoints are SGM.
    FLUX.1 and Chroma files name their own implementation whatever the kind (sd-scripts' sai_model_spec)."""
    if kind not in MODELSPEC_KINDS:
        raise ValueError(f"unknown modelspec kind {kind!r}; expected one of {MODELSPEC_KINDS}")
    if kind == "lora" or is_flow_family(family):
        return family_info(family).modelspec_implementation
    return STABILITY_AI_IMPLEMENTATION


def _architecture(facts: TrainingFacts, kind: str) -> str:
    info = family_info(facts.family)
    if getattr(info, "variant_architectures", ()):
        return info.modelspec_architecture(facts.v_prediction, kind, variant=facts.variant)
    return info.modelspec_architecture(facts.v_prediction, kind)


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
        "modelspec.architecture": _architecture(facts, kind),
        "modelspec.implementation": _implementation(kind, facts.family),
        "modelspec.title": config.saving.metadata.title or config.saving.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(timestamp).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.encoder_layer": str(config.model.clip_skip),
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
    }
    if is_flow_family(facts.family):
        # sd-scripts writes no prediction type for FLUX (it is flow matching, neither epsilon nor v; for SD3 its
        # "epsilon" is an artefact, spec A.5) and no clip skip (neither skips CLIP layers).
        for key in ("modelspec.prediction_type", "modelspec.encoder_layer"):
            del spec[key]
        if family_info(facts.family).objective == "flow":  # FLUX's sampler ignores min/max_timestep; SD3's uses them
            return _user_keys(config, spec)
    timesteps = (config.training.min_timestep, config.training.max_timestep)
    if timesteps != DEFAULT_TIMESTEPS:
        spec["modelspec.timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    return _user_keys(config, spec)


def _user_keys(config: RunConfig, spec: dict[str, str]) -> dict[str, str]:
    user = config.saving.metadata
    for key in ("author", "description", "license", "tags"):
        if getattr(user, key):
            spec[f"modelspec.{key}"] = getattr(user, key)
    return spec
