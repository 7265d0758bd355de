"""Assembling a `Session`: scan, load, cache, then create the method, optimizer and schedules, in that order.

The order matters for memory: latents and text-encoder outputs are cached while nothing trainable exists yet, and
the VAE (and frozen text encoders) leave the GPU before the first step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.config.io import resolve_path
from engine.config.schema import RunConfig
from engine.data.records import ScanResult
from engine.data.sampler import BucketBatchSampler
from engine.data.scan import scan_config
from engine.models.families import family_info
from engine.models.locations import model_location
from engine.train.conditioning import check_text_options
from engine.train.dataset import TrainingDataset, batch_sizes, caches_on_device, examples_from_scan
from engine.train.methods import create_method
from engine.train.placement import check_compile_backend, compile_denoiser, place_models, store_frozen_in_fp8
from engine.train.reporting import RunLog
from engine.train.setup import (
    RunInputError,
    Session,
    compute_schedule,
    configure_attention,
    make_accelerator,
    weight_dtype,
)


def build_session(config: RunConfig, base_dir: Path, run_dir: Path, log: RunLog, *,
                  accelerator: Any = None, checkpoint: Callable[[str], None] | None = None) -> Session:
    """`checkpoint(phase)` is called after each long phase; it raises to end the run there (a stop was asked)."""
    checkpoint = checkpoint or (lambda phase: None)
    accelerator = accelerator or make_accelerator(config, base_dir)
    check_compile_backend(config, accelerator.device)
    scan = scan_dataset(config, base_dir, log, defer=_deferred_findings(config))
    checkpoint("while scanning the dataset")
    model = load_base_model(config, base_dir, accelerator)
    check_text_options(config, model.family)  # a detected family may not read weighted captions
    _TRAINING_OPTIONS.get(family_info(model.family).loader, _no_options)(config, model, scan)
    checkpoint("while loading the model")
    dtype = weight_dtype(config)
    store_frozen_in_fp8(config, model, dtype)  # before caching (the encoders run in fp8 too) and before the LoRA
    latents = cache_latents(config, scan, model, accelerator, log) if config.training.cache_latents else None
    refuse_scan_errors(scan)  # the caption problems deferred past the latent cache
    texts = cache_texts(config, scan, model, accelerator, log) if config.training.cache_text_encoder_outputs else None
    checkpoint("while caching")
    from accelerate.utils import set_seed

    set_seed(config.training.seed)  # the network's initial weights come from the global generators
    method = create_method(config, model, base_dir)
    swapper = place_models(config, model, method, accelerator, dtype, latents_cached=latents is not None,
                           texts_cached=texts is not None)
    if swapper is not None:
        log.line(f"block swap: {swapper.blocks_to_swap} blocks kept on the CPU between uses "
                 f"({', '.join(swapper.swapped_names)})")
    compile_denoiser(config, model, log)
    examples = examples_from_scan(scan)  # the sampler and the dataset index this one list
    sampler = BucketBatchSampler([example.record for example in examples], batch_sizes(scan),
                                 seed=config.training.seed,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    schedule = compute_schedule(config, len(sampler))
    if config.training.cache_on_device:
        latents, texts = caches_on_device(latents, texts, accelerator.device)
    dataset = TrainingDataset(examples, seed=config.training.seed,
                              max_train_steps=schedule.total_steps, latents=latents, texts=texts)
    built, lr_scheduler = build_optimization(config, method, schedule)
    for warning in built.warnings:
        log.event("warning", message=warning, where="optimizer", hint="")
    output_dir = resolve_path(config.saving.output_dir, base_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output_name = choose_output_name(config, base_dir, output_dir, log)
    session = Session(
        config=config, base_dir=base_dir, run_dir=run_dir, output_dir=output_dir,
        output_name=output_name, accelerator=accelerator, log=log, scan=scan, model=model,
        method=method, dataset=dataset, sampler=sampler, schedule=schedule, optimizer=built.optimizer,
        built_optimizer=built, lr_scheduler=lr_scheduler, facts=None,
        text_cached=texts is not None, latents_cached=latents is not None, block_swapper=swapper,
    )
    session.facts = training_facts(session)
    return session


def _no_options(config: RunConfig, model: Any, scan: ScanResult) -> None:
    return None


def _sd3_options(config: RunConfig, model: Any, scan: ScanResult) -> None:
    from engine.train.sd3_objective import configure_positions

    configure_positions(config, model, scan)


# Training-only options a family's denoiser takes once loaded, by FamilyInfo.loader (SD3's position tables, §8.5).
_TRAINING_OPTIONS: dict[str, Callable[[RunConfig, Any, ScanResult], None]] = {"sd3": _sd3_options}


def choose_output_name(config: RunConfig, base_dir: Path, output_dir: Path, log: RunLog) -> str:
    """The configured name, or a suffixed one when files of that name from another run are already there."""
    from engine.rundir.naming import unique_output_name

    resume = str(resolve_path(config.saving.resume, base_dir)) if config.saving.resume else None
    name, changed = unique_output_name(output_dir, config.saving.output_name, config.saving.save_model_as,
                                       resume_from=resume)
    if changed:
        log.event("warning", where="saving.output_name",
                  message=f"{output_dir} already has files named {config.saving.output_name!r} from another run; "
                          f"this run saves as {name!r} so nothing is overwritten",
                  hint="choose another saving.output_name or output_dir to pick the name yourself")
    return name


def examples_records(scan: ScanResult) -> list:
    # The sampler and the dataset must index the same list: both come from examples_from_scan's order.
    return [example.record for example in examples_from_scan(scan)]


def _deferred_findings(config: RunConfig) -> frozenset[str]:
    """Scan errors refused only after the latents are cached: caption problems, when the latents go to disk (they do
    not depend on captions, so the encoding is kept and a fixed caption costs no re-encoding)."""
    from engine.cache.latent_jobs import CAPTION_ONLY_FINDINGS

    training = config.training
    return CAPTION_ONLY_FINDINGS if training.cache_latents and training.cache_latents_to_disk else frozenset()


def scan_dataset(config: RunConfig, base_dir: Path, log: RunLog, *, defer: frozenset[str] = frozenset()) -> ScanResult:
    """The dataset scan, its warnings logged; raises on its errors but those whose code is in ``defer``."""
    scan = scan_config(config, base_dir)
    for finding in scan.findings:
        if finding.severity == "warning":
            log.event("warning", message=finding.message, where=finding.where, hint=finding.hint)
    refuse_scan_errors(scan, skip=defer)
    return scan


def refuse_scan_errors(scan: ScanResult, *, skip: frozenset[str] = frozenset()) -> None:
    """Raise RunInputError on the scan's first error (whose code is not in ``skip``), counting the others."""
    errors = [finding for finding in scan.findings if finding.severity == "error" and finding.code not in skip]
    if errors:
        first = errors[0]
        others = f" (and {len(errors) - 1} more problem(s); `python -m engine doctor CONFIG` lists them all)" \
            if len(errors) > 1 else ""
        raise RunInputError(f"{first.where}: {first.message}{others}", first.hint, first.where)


def load_base_model(config: RunConfig, base_dir: Path, accelerator: Any) -> Any:
    from engine.models.loading import ModelLoadError, load_model

    location = model_location(config.model.pretrained_model_name_or_path, base_dir)
    if not location:
        raise RunInputError("no base model is set", "set model.pretrained_model_name_or_path to a .safetensors "
                            "file, a diffusers folder or a hub id", "model.pretrained_model_name_or_path")
    section = config.model
    vae = model_location(section.vae, base_dir)
    files = {name: model_location(getattr(section, name), base_dir)
             for name in ("clip_l", "t5xxl", "ae", "clip_g")}
    try:
        model = load_model(location, family=section.model_family, vae_path=vae, **files,
                           dtype=_frozen_load_dtype(config, location),
                           tokenizer_cache_dir=model_location(section.tokenizer_cache_dir, base_dir),
                           fp8=section.fp8_base or section.fp8_base_unet)
    except ModelLoadError as error:
        raise RunInputError(str(error), "check model.pretrained_model_name_or_path and model.model_family",
                            "model.pretrained_model_name_or_path") from error
    configure_attention(model.unet, config)
    return model


def _frozen_load_dtype(config: RunConfig, location: str) -> torch.dtype | None:
    """FLUX / SD3 LoRA: the base model is read in the mixed-precision dtype it is kept in anyway, which halves the RAM
    a FLUX.1 transformer needs while loading (24 GB in bf16 instead of 48 GB in float32). Others load in float32."""
    from engine.models.loading import ModelLoadError, detect_model_family

    if config.method != "lora":
        return None
    family = config.model.model_family
    if family == "auto":
        try:
            family = detect_model_family(location)
        except ModelLoadError:
            return None  # load_model reports it with its own message
    return weight_dtype(config) if family_info(family).loader in _LOW_PRECISION_LOADERS else None


_LOW_PRECISION_LOADERS = ("flux", "sd3")  # loaders that read weights straight into a given dtype


def cache_latents(config: RunConfig, scan: ScanResult, model: Any, accelerator: Any, log: RunLog) -> dict:
    """Latents of every trained image, from disk entries when they match, encoded otherwise."""
    from engine.cache.latent_files import cache_path, load_entry
    from engine.cache.latent_jobs import jobs_from_scan
    from engine.cache.latents import build_latent_cache
    from engine.models.vae import vae_dtype

    try:
        jobs = jobs_from_scan(scan)
    except ValueError as error:
        raise RunInputError(str(error), "turn off random_crop or training.cache_latents (or give the image one "
                            "mask)", "training.cache_latents") from error
    vae = model.vae
    dtype = vae_dtype(config.model.no_half_vae, accelerator.device.type, weight_dtype(config))
    torch.nn.Module.to(vae.vae, device=accelerator.device, dtype=dtype)
    to_disk = config.training.cache_latents_to_disk
    # Each process encodes its own share of a disk cache would race on files; the main process writes, others wait.
    with accelerator.main_process_first():
        report = build_latent_cache(jobs, vae, to_disk=to_disk, batch_size=config.training.vae_batch_size,
                                    workers=max(1, config.training.max_data_loader_n_workers))
    for image, message in report.failed:
        raise RunInputError(f"{image}: cannot be encoded ({message})", "fix or remove the image", str(image))
    log.line(f"latents: {report.summary()}")
    if not to_disk:
        return dict(report.latents or {})
    family = vae.family
    try:
        return {(job.record.path, tuple(job.record.bucket)): load_entry(cache_path(job.record.path, job.record.bucket,
                                                                                   family))
                for job in jobs}
    except (OSError, ValueError) as error:  # NaN/inf or a damaged file: each message names the cache file
        raise RunInputError(str(error), "delete that cache file (this run then encodes the image again) or run "
                            "`python -m engine cache-latents CONFIG --force`",
                            str(getattr(error, "path", "") or "training.cache_latents_to_disk")) from error


def cache_texts(config: RunConfig, scan: ScanResult, model: Any, accelerator: Any, log: RunLog) -> dict:
    from engine.cache.text_encoder import build_text_encoder_cache, jobs_from_scan
    from engine.models.text_encoding import encoding_options

    try:
        jobs = jobs_from_scan(scan)
    except ValueError as error:
        raise RunInputError(str(error), "turn training.cache_text_encoder_outputs off",
                            "training.cache_text_encoder_outputs") from error
    for encoder in model.text.encoders:
        torch.nn.Module.to(encoder, device=accelerator.device)
    with torch.no_grad():
        options = encoding_options(config.model, model.scheduler_config.get("variant", ""))
        report = build_text_encoder_cache(jobs, model.text, **options, to_disk=False)
    for image, message in report.failed:  # e.g. NaN outputs: training on them would make the loss NaN
        raise RunInputError(message, "fix the caption or turn training.cache_text_encoder_outputs off", str(image))
    log.line(f"text encoder outputs: {report.summary()}")
    return dict(report.outputs or {})


def build_optimization(config: RunConfig, method: Any, schedule: Any) -> tuple[Any, Any]:
    from engine.train.lr_schedulers import build_lr_scheduler
    from engine.train.optimizers import OptimizerConfigError, build_optimizer

    groups = method.param_groups()
    if not groups:
        raise RunInputError("nothing would be trained: every learning rate is 0 or every part is frozen",
                            "set optimizer.unet_lr or optimizer.text_encoder_lr above 0", "optimizer")
    try:
        built = build_optimizer(config.optimizer, groups)
        scheduler = build_lr_scheduler(config.optimizer, built.optimizer, schedule.total_steps,
                                       num_processes=1, schedule_free=built.schedule_free)
    except (OptimizerConfigError, ValueError) as error:
        raise RunInputError(str(error), "check the optimizer section", "optimizer") from error
    # Nothing goes through accelerate's wrappers: the step runner scales the loss for fp16 itself
    # (engine.train.update), gradients are averaged across processes by the trainer, and the schedule is stepped
    # once per update whatever the process count.
    return built, scheduler


def training_facts(session: Session) -> Any:
    """What the saved files' metadata needs beyond the config; the model hash is computed here, once per run."""
    from engine.networks.dataset_metadata import image_counts
    from engine.networks.metadata import TrainingFacts, model_hash_metadata, new_session_id
    from engine.train.lr_schedulers import warmup_steps

    scan, config = session.scan, session.config
    num_train, num_reg = image_counts(scan.datasets)
    resolution = scan.datasets[0].params.get("resolution", 512) if scan.datasets else 512
    width, height = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    model_file = getattr(session.model, "model_file", None)
    model_path = str(model_file) if model_file else str(session.model.source)
    vae_path = model_location(config.model.vae, session.base_dir) or None
    hashes = model_hash_metadata(model_path, vae_path) if session.is_main else {}
    return TrainingFacts(
        session_id=new_session_id(), started_at=time.time(), family=session.model.family,
        variant=session.model.scheduler_config.get("variant", ""),
        v_prediction=config.model.v_parameterization, num_train_images=num_train, num_reg_images=num_reg,
        num_validation_images=sum(len(subset.validation) for dataset in scan.datasets for subset in dataset.subsets),
        num_batches_per_epoch=session.schedule.batches_per_epoch, num_epochs=session.schedule.num_epochs,
        max_train_steps=session.schedule.total_steps,
        warmup_steps=warmup_steps(config.optimizer, session.schedule.total_steps),
        optimizer_description=session.built_optimizer.description, datasets=scan.datasets,
        model_path=model_path, vae_path=vae_path,
        network_module=getattr(session.method, "network_module", "networks.lora"),
        resolution=(int(width), int(height)), model_hashes=hashes,
        mixed_precision=session.precision.mode,
    )
