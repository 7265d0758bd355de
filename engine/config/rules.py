"""Cross-field rules: combinations that each field alone allows but that cannot work together.

Every rule is a small function registered with `@rule`; it yields `Problem`s whose path names the field to change
and whose message says what to do. `RunConfig` runs them all after field validation; errors stop validation,
warnings are returned by `config_warnings()` for the CLI and GUI to show. The FLUX.1 / Chroma / flow-matching
rules are in `engine.config.rules_flux`, SD3's in `engine.config.rules_sd3`, and the refusal of settings that only
other families use in `engine.config.rules_families`, all imported at the end of this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from engine.config.choices import (
    AUTO_BUCKET_MULTIPLE,
    FLUX_FAMILIES,
    FULL_MODEL_FORMATS,
    NETWORK_TYPES,
    OPTIMIZERS,
    SMALL_FILE_FORMATS,
    WANDB,
    XFORMERS,
    OptionalPackage,
    family_label,
    module_package,
)
from engine.config.dataset import ResolvedDataset, ResolvedSubset, resolve_datasets, resolve_general_only
from engine.config.dataset_keys import CAPTION_DROPOUT_KEYS
from engine.config.rule_registry import RULES, Problem, RuleContext, rule
from engine.models.families import FAMILY_INFO

if TYPE_CHECKING:
    from engine.config.schema import RunConfig


def effective_datasets(config: RunConfig, context: RuleContext) -> list[ResolvedDataset]:
    """Every dataset with sd-scripts' precedence applied; legacy folders inherit [dataset.general] whole."""
    section = config.dataset
    if section.config_file:
        if context.dataset_file is None:
            return []  # not read yet: the file is checked when the caller loads it
        return resolve_datasets(section.general, context.dataset_file.datasets, context.dataset_file.general,
                                source=f"[{context.dataset_file_name or section.config_file}]")
    if section.datasets:
        return resolve_datasets(section.general, section.datasets)
    return [resolve_general_only(section)]


def check(config: RunConfig, context: RuleContext | None = None) -> list[Problem]:
    """Run every rule; returns errors and warnings."""
    context = context or RuleContext()
    context.datasets = effective_datasets(config, context)
    return [problem for each in RULES for problem in each(config, context)]


def _subsets(context: RuleContext) -> Iterator[ResolvedSubset]:
    for dataset in context.datasets:
        yield from dataset.subsets


# --- caching ---------------------------------------------------------------------------------------------------


@rule
def latent_cache_needs_fixed_images(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if not config.training.cache_latents:
        if config.training.cache_latents_to_disk:
            yield Problem("training.cache_latents_to_disk", "needs training.cache_latents = true")
        return
    for subset in _subsets(context):
        for key in ("color_aug", "random_crop"):
            if subset.params[key]:
                yield Problem(subset.source_of(key), f"{key} changes every image each step, so it cannot be used "
                              "with cached latents; turn it off or set training.cache_latents = false")


_CHANGING_CAPTION_KEYS = ("shuffle_caption", "enable_wildcard", "token_warmup_step", *CAPTION_DROPOUT_KEYS)


def trains_t5xxl(config: RunConfig) -> bool:
    """A FLUX or SD3 LoRA's network_args train_t5xxl (kohya writes it as text, TOML as a boolean)."""
    value = config.network.network_args.get("train_t5xxl", False)
    return value is True or str(value).strip().lower() in ("true", "1")


def _trains_text_encoder(config: RunConfig) -> bool:
    """Whether the text encoder's output changes during training (text_encoder_lr empty = learning_rate)."""
    if config.method == "textual_inversion":
        return True  # the embedding lives inside the text encoder's input
    if config.method == "lora" and config.network.train_unet_only:
        return False
    if config.model.model_family in FLUX_FAMILIES:
        if config.method != "lora":
            return False  # FLUX full fine-tuning trains the transformer only (spec §6.1)
        if "clip_l" not in FAMILY_INFO[config.model.model_family].text_encoder_files and not trains_t5xxl(config):
            return False  # no CLIP-L (Chroma), and T5 trains only with train_t5xxl
    return config.optimizer.text_encoder_lr != 0


@rule
def text_encoder_cache_needs_fixed_captions(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if not config.training.cache_text_encoder_outputs:
        return
    if config.method == "textual_inversion":
        yield Problem("training.cache_text_encoder_outputs", "Textual Inversion trains the text encoder's new "
                      "embedding, so its outputs cannot be cached; turn caching off")
    elif config.method == "lora" and trains_t5xxl(config) and not config.network.train_unet_only:
        yield Problem("network.network_args", "train_t5xxl trains T5, whose outputs then cannot be cached; remove "
                      "train_t5xxl or turn training.cache_text_encoder_outputs off")
    elif _trains_text_encoder(config):
        yield Problem("training.cache_text_encoder_outputs", "cached text-encoder outputs cannot change, but the "
                      "text encoder is being trained; set network.train_unet_only = true (or "
                      "optimizer.text_encoder_lr = 0), or turn caching off")
    for subset in _subsets(context):
        for key in _CHANGING_CAPTION_KEYS:
            if subset.params[key]:
                yield Problem(subset.source_of(key), f"{key} changes captions during training, so text-encoder "
                              "outputs cannot be cached; turn it off or set training.cache_text_encoder_outputs = "
                              "false")


# --- run length, schedule, saving ------------------------------------------------------------------------------


@rule
def run_length_is_set_once(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    epochs, steps = config.training.max_train_epochs, config.training.max_train_steps
    if epochs == 0 and steps == 0:
        yield Problem("training.max_train_epochs", "set the length of the run: max_train_epochs or max_train_steps")
    elif epochs > 0 and steps > 0:
        yield Problem("training.max_train_steps", f"both max_train_epochs ({epochs}) and max_train_steps ({steps}) "
                      "are set; keep one and set the other to 0")


@rule
def warmup_fits_the_schedule(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    optimizer = config.optimizer
    warmup = optimizer.lr_warmup_steps
    if warmup and optimizer.lr_scheduler == "constant":
        yield Problem("optimizer.lr_warmup_steps", "the constant scheduler has no warm-up; use "
                      "lr_scheduler = 'constant_with_warmup' or set lr_warmup_steps = 0")
    steps = config.training.max_train_steps
    if isinstance(warmup, int) and steps and warmup >= steps:
        yield Problem("optimizer.lr_warmup_steps", f"warm-up of {warmup} steps is as long as the whole run "
                      f"({steps} steps); shorten it, or give a fraction such as 0.05")
    if optimizer.lr_scheduler == "adafactor" and optimizer.optimizer_type != "Adafactor":
        yield Problem("optimizer.lr_scheduler", "the adafactor scheduler only works with optimizer_type = "
                      "'Adafactor'; pick another scheduler")


@rule
def saving_needs_a_folder(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    saving = config.saving
    if saving.output_dir.strip():
        return
    for key in ("save_every_n_epochs", "save_every_n_steps", "save_state"):
        if getattr(saving, key):
            yield Problem(f"saving.{key}", "there is no saving.output_dir to save into; set output_dir")


@rule
def retention_has_something_to_keep(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if config.saving.save_last_n_epochs and not config.saving.save_every_n_epochs:
        yield Problem("saving.save_last_n_epochs", "has no effect without save_every_n_epochs", "warning")


@rule
def format_suits_the_method(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    full_model = config.method in ("dreambooth", "finetune")
    allowed = FULL_MODEL_FORMATS if full_model else SMALL_FILE_FORMATS
    if config.saving.save_model_as not in allowed:
        what = "a full model" if full_model else "a network or embedding file"
        yield Problem("saving.save_model_as", f"{config.method} saves {what}; choose one of {', '.join(allowed)}")


# --- model family and network ----------------------------------------------------------------------------------


@rule
def buckets_suit_the_family(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    family = config.model.model_family
    limits = FAMILY_INFO.get(family)
    multiple = limits.bucket_multiple if limits else AUTO_BUCKET_MULTIPLE
    for dataset in context.datasets:
        steps = dataset.params["bucket_reso_steps"]
        if not steps % multiple:
            continue
        if limits is None:
            yield Problem(f"{dataset.path}.bucket_reso_steps", f"{steps} is not a multiple of {multiple}, which "
                          "every supported model accepts; use 64, or set model.model_family (FLUX.1, Chroma and SD3 "
                          "accept multiples of 16)")
        else:
            yield Problem(f"{dataset.path}.bucket_reso_steps", f"{limits.label} needs bucket sides in multiples of "
                          f"{multiple}, not {steps}; use {max(multiple, 64)}")
    info = FAMILY_INFO.get(family)
    if info is not None and info.noise_prediction_only and config.model.v_parameterization:
        yield Problem("model.v_parameterization", f"{family_label(family)} models predict noise; v-prediction is for "
                      "SD2.x 768-v and v-pred SDXL checkpoints", "warning")


@rule
def network_ranks_make_sense(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    network = config.network
    info = NETWORK_TYPES[network.network_type]
    if info.backend == "kohya" and network.network_dim > 1024:
        yield Problem("network.network_dim", f"{network.network_dim} is far above any useful LoRA rank; use 1-1024 "
                      "(only LoKr uses huge dims, for its full-matrix mode)")
    if network.network_alpha > network.network_dim:
        scale = network.network_alpha / network.network_dim
        yield Problem("network.network_alpha", f"alpha {network.network_alpha:g} is above network_dim "
                      f"{network.network_dim}, which scales the network up by {scale:g}x and usually wrecks "
                      "training; use at most network_dim")
    if info.needs_conv_dim and network.conv_dim == 0:
        yield Problem("network.conv_dim", "locon trains convolutions and needs conv_dim above 0 (e.g. 8); or use "
                      "network_type = 'lora'")
    if network.conv_dim and network.conv_alpha > network.conv_dim:
        yield Problem("network.conv_alpha", f"conv_alpha {network.conv_alpha:g} is above conv_dim "
                      f"{network.conv_dim}; use at most conv_dim")
    if network.train_unet_only and network.train_text_encoder_only:
        yield Problem("network.train_text_encoder_only", "train_unet_only and train_text_encoder_only are both "
                      "set, which would train nothing; keep one")


@rule
def embedding_is_defined(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if config.method != "textual_inversion":
        return
    token = config.embedding.token_string
    if not token:
        yield Problem("embedding.token_string", "Textual Inversion needs the new word to train, e.g. 'mychar'")
    elif any(char.isspace() for char in token):
        yield Problem("embedding.token_string", f"{token!r} must be a single word without spaces")
    for subset in _subsets(context):
        for key in CAPTION_DROPOUT_KEYS:
            if subset.params[key]:
                yield Problem(subset.source_of(key), "caption dropout would remove the token being learned; "
                              "Textual Inversion does not support it (set it to 0)")


@rule
def subsets_suit_the_method(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    wanted = {"dreambooth": "dreambooth", "finetune": "finetune"}.get(config.method)
    for dataset in context.datasets:
        for subset in dataset.subsets:
            style = "finetune" if subset.params.get("metadata_file") else "dreambooth"
            if subset.params.get("conditioning_data_dir") and not config.training.masked_loss:
                yield Problem(f"{subset.path}.conditioning_data_dir", "Atelier reads conditioning_data_dir only as "
                              "loss masks (it trains no ControlNet); set training.masked_loss = true to use them, or "
                              "remove conditioning_data_dir")
            elif wanted and style != wanted:
                yield Problem(subset.path, f"method {config.method} trains {wanted}-style subsets, but this one is "
                              f"{style}-style; use method 'lora' for mixed data or change the subset")
    section = config.dataset
    if config.method == "finetune" and section.train_data_dir and not section.in_json:
        yield Problem("dataset.in_json", "fine-tuning reads captions from a metadata file: set in_json, or use "
                      "method 'dreambooth' for folders of images with caption files")


@rule
def buckets_contain_the_resolution(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    for dataset in context.datasets:
        params = dataset.params
        width, height = params["resolution"]
        low, high, step = params["min_bucket_reso"], params["max_bucket_reso"], params["bucket_reso_steps"]
        if low > min(width, height):
            yield Problem(f"{dataset.path}.min_bucket_reso", f"{low} is larger than the resolution's short side "
                          f"({min(width, height)}); lower it")
        if high < max(width, height):
            yield Problem(f"{dataset.path}.max_bucket_reso", f"{high} is smaller than the resolution's long side "
                          f"({max(width, height)}); raise it")
        for key, value in (("min_bucket_reso", low), ("max_bucket_reso", high)):
            if value % step:
                yield Problem(f"{dataset.path}.{key}", f"{value} is not a multiple of bucket_reso_steps ({step}) "
                              "and will be rounded", "warning")


# --- precision, noise, loss ------------------------------------------------------------------------------------


@rule
def precision_is_consistent(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    training = config.training
    if training.full_fp16 and training.full_bf16:
        yield Problem("training.full_bf16", "full_fp16 and full_bf16 are both set; keep one")
    for key, needed in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if getattr(training, key) and training.mixed_precision != needed:
            yield Problem(f"training.{key}", f"needs training.mixed_precision = '{needed}'")
    if training.full_fp16 and training.mixed_precision == "fp16" \
            and config.optimizer.optimizer_type in _FP16_MOMENT_OPTIMIZERS:
        yield Problem("training.full_fp16", f"{config.optimizer.optimizer_type} keeps its moments in the weights' "
                      "float16, where its eps (1e-8) is 0: a weight whose gradient is still 0 (a LoRA's down "
                      "matrices at the first step) becomes NaN; use AdamW8bit (sd-scripts' pairing for full_fp16), "
                      "full_bf16, or mixed precision alone")


# torch's Adam optimizers make their state in each weight's dtype (seen: a LoRA run NaN at step 2 with full_fp16).
_FP16_MOMENT_OPTIMIZERS = ("AdamW",)


@rule
def noise_options_combine(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    training = config.training
    if training.noise_offset and training.multires_noise_iterations:
        yield Problem("training.multires_noise_iterations", "noise_offset and multi-resolution noise cannot be "
                      "used together; set one of them to 0")
    if training.adaptive_noise_scale and not training.noise_offset:
        yield Problem("training.adaptive_noise_scale", "scales the noise offset, so it needs noise_offset above 0")
    if training.min_timestep >= training.max_timestep:
        yield Problem("training.min_timestep", f"{training.min_timestep} must be below max_timestep "
                      f"({training.max_timestep})")
    if training.scale_v_pred_loss_like_noise_pred and not config.model.v_parameterization:
        yield Problem("training.scale_v_pred_loss_like_noise_pred", "only applies to v-prediction models; set "
                      "model.v_parameterization = true or turn this off")
    if training.zero_terminal_snr and not config.model.v_parameterization:
        yield Problem("training.zero_terminal_snr", "is meant for v-prediction; with noise prediction the last "
                      "timestep cannot be learned", "warning")
    if training.persistent_data_loader_workers and not training.max_data_loader_n_workers:
        yield Problem("training.persistent_data_loader_workers", "has no effect with max_data_loader_n_workers = "
                      "0", "warning")
    if training.cache_on_device and not (training.cache_latents or training.cache_text_encoder_outputs):
        yield Problem("training.cache_on_device", "has nothing to keep on the GPU: turn on cache_latents or "
                      "cache_text_encoder_outputs, or turn this off", "warning")
    if training.cache_on_device and training.max_data_loader_n_workers:
        yield Problem("training.cache_on_device", "data-loader worker processes cannot hand out tensors that live "
                      "on the GPU; set max_data_loader_n_workers = 0 (with everything cached, the workers have "
                      "little to do) or turn this off")


# --- optimizer -------------------------------------------------------------------------------------------------


@rule
def optimizer_settings_fit(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    optimizer = config.optimizer
    info = OPTIMIZERS.get(optimizer.optimizer_type)
    if info is None:
        return
    if info.adaptive_lr and optimizer.learning_rate < 0.1:
        yield Problem("optimizer.learning_rate", f"{optimizer.optimizer_type} finds its own step size and expects "
                      f"learning_rate around 1.0, not {optimizer.learning_rate:g}", "warning")
    if info.schedule_free and optimizer.lr_scheduler not in ("constant", "constant_with_warmup"):
        yield Problem("optimizer.lr_scheduler", f"{optimizer.optimizer_type} schedules itself; "
                      f"{optimizer.lr_scheduler} will be ignored", "warning")


# --- sampling and launch ---------------------------------------------------------------------------------------


@rule
def sampling_has_prompts(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    sampling = config.sampling
    if sampling.sample_prompts and sampling.sample_prompts_file:
        yield Problem("sampling.sample_prompts_file", "prompts are given both inline and as a file; keep one")
    wants_samples = sampling.sample_every_n_steps or sampling.sample_every_n_epochs or sampling.sample_at_first
    if wants_samples and not (sampling.sample_prompts or sampling.sample_prompts_file):
        yield Problem("sampling.sample_prompts", "samples are switched on but there are no prompts; add at least "
                      "one prompt")


@rule
def launch_is_consistent(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    launch = config.launch
    if launch.num_processes > 1 and not launch.multi_gpu and launch.num_machines == 1:
        yield Problem("launch.multi_gpu", f"num_processes is {launch.num_processes}: set multi_gpu = true to train "
                      "on several GPUs")
    if launch.multi_gpu and launch.num_processes == 1:
        yield Problem("launch.num_processes", "multi_gpu needs num_processes above 1 (one per GPU)")
    if launch.gpu_ids and len(launch.gpu_ids) != launch.num_processes:
        yield Problem("launch.gpu_ids", f"{len(launch.gpu_ids)} GPU ids for {launch.num_processes} processes; give "
                      "one id per process or leave it empty")
    if launch.machine_rank >= launch.num_machines:
        yield Problem("launch.machine_rank", f"{launch.machine_rank} must be below num_machines "
                      f"({launch.num_machines})")
    if launch.num_machines > 1 and not launch.main_process_ip:
        yield Problem("launch.main_process_ip", "several machines need the main machine's address")


# --- optional packages -----------------------------------------------------------------------------------------


def _needed_packages(config: RunConfig) -> Iterator[tuple[str, str, OptionalPackage]]:
    """(field path, what needs it, package) for every optional package the config relies on."""
    optimizer = config.optimizer.optimizer_type
    info = OPTIMIZERS.get(optimizer)
    if info is not None and info.package is not None:
        yield "optimizer.optimizer_type", optimizer, info.package
    elif info is None and "." in optimizer:  # a bare name is torch.optim's
        # A class path of an allowed package: the field's validator refused any other.
        yield "optimizer.optimizer_type", optimizer, module_package(optimizer)
    network_package = NETWORK_TYPES[config.network.network_type].package
    if config.method == "lora" and network_package is not None:
        yield "network.network_type", config.network.network_type, network_package
    if config.training.attention == "xformers":
        yield "training.attention", "xformers attention", XFORMERS
    if config.logging.logging_dir and config.logging.log_with in ("wandb", "all"):
        yield "logging.log_with", "Weights & Biases logging", WANDB


@rule
def optional_packages_installed(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    if not context.check_packages:
        return
    for path, what, package in _needed_packages(config):
        if not package.is_installed():
            yield Problem(path, f"{what} needs the '{package.module}' package, which is not installed; "
                          f"{package.install_hint()}")


# The FLUX.1 / Chroma / flow-matching rules and SD3's live in their own modules; importing them here registers them
# (after this module's own, in this order), so whoever imports these rules to run `check()` gets every rule.
import engine.config.rules_optimizer  # noqa: E402, F401
from engine.config import (  # noqa: E402, F401
    rules_dataset,
    rules_ema,
    rules_families,
    rules_flux,
    rules_network,
    rules_sd3,
    rules_text,
    rules_validation,
)
