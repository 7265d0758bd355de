"""`python -m engine cache-latents CONFIG`: encode every training image with the VAE once, ahead of training.

The command always writes the cache to disk, whatever training.cache_latents_to_disk says: a cache that vanished
when the command exits would be work thrown away. Entries whose key still matches are kept (``--force`` re-encodes
them); training then reuses them. A problem with a caption (a caption file that is not UTF-8) is printed as a warning
and does not stop the command: latents do not depend on captions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK, add_override_option, print_problems
from engine.cli.options import add_arguments, option
from engine.config.errors import ConfigError
from engine.config.io import load_config
from engine.models.locations import model_location
from engine.startup import start_up_done

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.events import EventWriter

TASK = "cache-latents"
# training.mixed_precision → the dtype the VAE encodes in on a GPU (sd-scripts: the weight dtype).
@dataclass(frozen=True, kw_only=True)
class CacheLatentsOptions:
    """The options of `cache-latents`, declared once: its parser's flags and the command line of the GUI's Tools tab
    (gui.tools_commands.cache_args). `--set` is engine.cli.common's, shared with the other config commands."""

    config: str = option(positional=True, help="run config .toml (or a .json preset)")
    # group "reuse": at most one of the two
    force: bool = option(False, group="reuse",
                         help="re-encode every entry, also those whose cache key matches the current settings (by "
                              "default those are kept; stale entries are rebuilt either way)")
    skip_existing: bool = option(False, group="reuse",
                                 help="keep entries whose cache key matches: the default, accepted for older scripts")
    events: str | None = option(None, metavar="FILE", help="append start/progress/warning/done events (JSON lines)")
    workers: int | None = option(None, metavar="N", help="threads decoding and resizing images (default: "
                                                         "training.max_data_loader_n_workers, at least 1)")
    device: str | None = option(None, choices=("cpu", "cuda"), help="where the VAE runs (default: cuda if available)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        TASK, help="encode the dataset's images with the VAE and store the latents (.npz) for training",
        description="Scan the config's datasets, load the VAE and write one latent cache file per image and bucket. "
                    "Each file records what it depends on (VAE, bucket, crop, flip, resize settings, the image "
                    "file), so training never reuses a stale one. Exit 0 with a summary (failed images are listed), "
                    "2 when the config or dataset must be fixed or nothing could be cached.",
    )
    add_override_option(parser)
    add_arguments(parser, CacheLatentsOptions, groups={"reuse": parser.add_mutually_exclusive_group()})
    parser.set_defaults(handler=run)
    return parser


def _fail(message: str, events: EventWriter, hint: str = "") -> int:
    print(f"error: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)
    events.emit("error", message=message, hint=hint)
    events.emit("done", task=TASK, ok=False)
    return EXIT_BAD_INPUT


def run(args: argparse.Namespace) -> int:
    from engine.events import EventWriter

    try:
        config = load_config(args.config, args.overrides, check_packages=False)
    except ConfigError as error:
        print(f"{error.source or args.config}: {len(error.problems)} problem(s)", file=sys.stderr)
        print_problems(error.problems)
        return EXIT_BAD_INPUT
    with EventWriter(args.events) as events:
        try:
            return _cache(config, Path(args.config).resolve().parent, args, events)
        except Exception as error:  # an unexpected failure still ends the event stream for a GUI tailing it
            events.emit("error", message=f"{type(error).__name__}: {error}", hint="this is a bug; please report it")
            events.emit("done", task=TASK, ok=False)
            raise


def _cache(config: RunConfig, base_dir: Path, args: argparse.Namespace, events: EventWriter) -> int:
    import torch

    from engine.cache.latent_jobs import latent_errors
    from engine.cache.latents import build_latent_cache, jobs_from_scan
    from engine.data.scan import scan_config
    from engine.events import Progress
    from engine.models.single_file import ModelLoadError
    from engine.models.vae import vae_dtype
    from engine.train.precision import PRECISION_DTYPES

    scan = scan_config(config, base_dir)
    blocking = latent_errors(scan.findings)
    for finding in scan.findings:
        if finding.severity == "error" and finding not in blocking:  # a caption problem: latents do not need it
            _caption_warning(finding, events)
        elif finding.severity != "info":
            print(f"{finding.severity}: {finding.where}: {finding.message}", file=sys.stderr)
    if blocking:
        return _fail("the dataset has errors (listed above)", events, "fix them, or run `python -m engine doctor`")
    try:
        jobs = jobs_from_scan(scan)
    except ValueError as error:
        return _fail(str(error), events)
    if not jobs:
        return _fail("no images to cache", events)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weight_dtype = PRECISION_DTYPES[config.training.mixed_precision]
    try:
        loaded = latent_encoder(config, base_dir, dtype=vae_dtype(config.model.no_half_vae, device, weight_dtype),
                                device=device)
    except ModelLoadError as error:  # VaeLoadError is one
        return _fail(str(error), events)
    workers = args.workers or max(1, config.training.max_data_loader_n_workers)
    progress = Progress(TASK, len(jobs), events if args.events else None)
    try:
        report = build_latent_cache(jobs, loaded, to_disk=True, batch_size=config.training.vae_batch_size,
                                    workers=workers, skip_existing=not args.force, progress=progress)
    finally:
        progress.close()
    for image, message in report.failed:
        print(f"failed: {message}", file=sys.stderr)
        events.emit("warning", message=message, where=str(image), hint="the image is skipped; re-save or remove it")
    # Grouped by reason: a changed setting makes thousands of entries stale at once, for one reason.
    for reason, paths in _by_reason(report.rebuilt_stale).items():
        others = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
        print(f"rebuilt: {reason}: {paths[0]}{others}", file=sys.stderr)
    cached = report.encoded + report.reused
    events.emit("done", task=TASK, ok=cached > 0, total=report.total, encoded=report.encoded, reused=report.reused,
                rebuilt_stale=len(report.rebuilt_stale), failed=len(report.failed))
    print(report.summary())
    return EXIT_OK if cached > 0 else EXIT_BAD_INPUT


def _caption_warning(finding: Any, events: EventWriter) -> None:
    hint = f"{finding.hint}; the latents are cached anyway, but training stops on it until it is fixed"
    print(f"warning: {finding.where}: {finding.message} ({hint})", file=sys.stderr)
    events.emit("warning", message=finding.message, where=finding.where, hint=hint)


def latent_encoder(config: RunConfig, base_dir: Path, *, dtype: Any, device: str) -> Any:
    """The VAE (SD, SD3: ``model.vae`` or the model's own) or AE (FLUX: ``model.ae``, or the diffusers folder's own)
    that the run's latents come from, without loading the rest of the model."""
    from engine.models.families import family_info
    from engine.models.loading import detect_model_family

    model = config.model
    location = model_location(model.pretrained_model_name_or_path, base_dir)
    family = model.model_family
    if family == "auto" and location:
        family = detect_model_family(location)
    loader = family_info(family).loader if family != "auto" else "ldm"
    encoder = _LATENT_ENCODERS[loader](model, location, base_dir, family, dtype, device)
    start_up_done()  # the imports and the encoder: the heavy part of the cache command's start-up is over
    return encoder


def _flux_ae(model: Any, location: str, base_dir: Path, family: str, dtype: Any, device: str) -> Any:
    from engine.models.flux.ae import load_flux_ae

    source = model_location(model.ae, base_dir) or location
    return load_flux_ae(source, family=family, dtype=dtype, device=device,
                        what="model.ae" if model.ae else "model.pretrained_model_name_or_path")


def _sd3_vae(model: Any, location: str, base_dir: Path, family: str, dtype: Any, device: str) -> Any:
    from engine.models.sd3.loading import load_sd3_latent_vae

    return load_sd3_latent_vae(location, model_location(model.vae, base_dir), dtype=dtype, device=device)


def _sd_vae(model: Any, location: str, base_dir: Path, family: str, dtype: Any, device: str) -> Any:
    from engine.models.vae import load_vae

    return load_vae(location, model_location(model.vae, base_dir), family=family, dtype=dtype, device=device)


# By FamilyInfo.loader: (model section, location, base dir, family, dtype, device) -> LoadedVae.
_LATENT_ENCODERS: dict[str, Callable[..., Any]] = {"ldm": _sd_vae, "flux": _flux_ae, "sd3": _sd3_vae}


def _by_reason(entries: list[tuple[Path, str]]) -> dict[str, list[Path]]:
    grouped: dict[str, list[Path]] = {}
    for path, reason in entries:
        grouped.setdefault(reason, []).append(path)
    return grouped
