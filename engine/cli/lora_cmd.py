"""`python -m engine lora inspect|merge|resize|extract|convert`: tools for kohya LoRA files.

Every tool writes a new file and refuses to overwrite one (or an input). Reports are readable text, or JSON with
--json; with --events FILE the report is also the `done` event's fields (docs/events.md), which is where the GUI's
Tools tab reads it. Exit 0 on success, 2 when an input must be fixed (the message names the file and says what to
do) or when inspect finds a file it does not understand or NaN/inf weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.cli.common import EXIT_BAD_INPUT, EXIT_OK
from engine.cli.options import add_arguments, option
from engine.config.choices import SavePrecision

TASK = "lora"
_PRECISIONS = typing.get_args(SavePrecision)


# `lora convert` namings and families (engine.networks.tools.convert_lora.TARGETS / convertible_families; not
# imported here, they load torch).
CONVERT_TARGETS = ("diffusers", "kohya")
CONVERT_FAMILIES = ("flux1", "chroma", "sd3")

# Text encoders a FLUX-style merge writes to their own files: option stem -> label (engine.networks.tools.
# model_files.FILE_MODELS names the same stems; not imported here, it loads torch).
TEXT_ENCODER_OPTIONS = {"clip-l": "CLIP-L", "clip-g": "CLIP-G", "t5xxl": "T5-XXL"}

# --- options: each tool's declared once, for its parser and for the command lines of the GUI's Tools tab ---------


def _precision(default: str | None = "float", default_text: str = "float: float32") -> Any:
    return option(default, choices=_PRECISIONS, help=f"dtype of the saved weights (default {default_text})")


def _output(help_text: str, required: bool = True) -> Any:
    return option(**({} if required else {"default": None}), flags=("-o", "--output"), help=help_text)


def _encoder_file(option_stem: str) -> Any:
    label = TEXT_ENCODER_OPTIONS[option_stem]
    return option(None, metavar="FILE", help=f"with --into-model on FLUX.1/Chroma/SD3: the {label} file to merge the "
                                             f"LoRA's {label} modules into")


def _encoder_new_file(option_stem: str) -> Any:
    label = TEXT_ENCODER_OPTIONS[option_stem]
    return option(None, metavar="NEW_FILE", help=f"the new {label} file (with --{option_stem})")


@dataclass(frozen=True, kw_only=True)
class ReportOptions:
    """What every tool takes: how its report comes out."""

    json: bool = option(False, help="print the report as JSON")
    events: str | None = option(None, metavar="FILE", help="append start/error/done events (JSON lines); `done` "
                                                           "holds the report")


@dataclass(frozen=True, kw_only=True)
class InspectOptions:
    file: str = option(positional=True, help="a .safetensors, .ckpt or .pt file")


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    loras: list[str] = option(positional=True, nargs="+", metavar="LORA[:RATIO]",
                              help="LoRA files, each with an optional ratio (default 1), e.g. style.safetensors:0.7")
    output: str = _output("the new file (.safetensors)")
    into_model: str | None = option(None, metavar="BASE", help="a base model (single file or diffusers folder; for "
                                                               "FLUX.1/Chroma the BFL transformer file)")
    svd: int | None = option(None, metavar="RANK", help="without --into-model: re-factor every module to this rank "
                                                        "instead of concatenating")
    conv_rank: int | None = option(None, metavar="RANK", help="with --svd: the rank of 3x3 conv modules")
    # sd-scripts' flux_merge_lora.py --clip_l/--t5xxl/--clip_l_save_to/--t5xxl_save_to: FLUX keeps its text
    # encoders in their own files, so the LoRA's text-encoder modules are merged into new copies of those.
    clip_l: str | None = _encoder_file("clip-l")
    clip_l_save_to: str | None = _encoder_new_file("clip-l")
    clip_g: str | None = _encoder_file("clip-g")
    clip_g_save_to: str | None = _encoder_new_file("clip-g")
    t5xxl: str | None = _encoder_file("t5xxl")
    t5xxl_save_to: str | None = _encoder_new_file("t5xxl")
    # None: float32 for LoRAs and SD models (computed and loaded in float32); FLUX files keep their own dtype (a
    # 12B transformer in float32 is 48 GB).
    save_precision: str | None = _precision(None, "float32; with --into-model on FLUX.1/Chroma each file's own dtype")


@dataclass(frozen=True, kw_only=True)
class ResizeOptions:
    file: str = option(positional=True, help="a kohya LoRA/LoCon file")
    output: str = _output("the new file (.safetensors, .ckpt or .pt)")
    # group "rule": exactly one of the three (a required mutually exclusive group)
    rank: int | None = option(None, group="rule", help="the new rank of every module")
    sv_ratio: float | None = option(None, group="rule", metavar="X",
                                    help="keep singular values at least the largest / X")
    sv_fro: float | None = option(None, group="rule", metavar="Y",
                                  help="keep the smallest rank that holds this fraction (0-1) of each module's "
                                       "Frobenius norm")
    conv_rank: int | None = option(None, metavar="RANK", help="with --rank: the rank of 3x3 conv modules")
    save_precision: str = _precision()


@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    base: str = option(help="the base model (single file or diffusers folder)")
    tuned: str = option(help="the fine-tuned model, of the same family")
    output: str = _output("the new LoRA file (.safetensors, .ckpt or .pt)")
    rank: int = option(flags=("--rank", "--dim"), help="rank of Linear and 1x1 conv modules (sd-scripts calls it "
                                                       "--dim)")
    conv_rank: int = option(0, help="rank of 3x3 convs (default 0: none)")
    min_diff: float | None = option(None, metavar="D", help="leave out a text encoder whose largest weight change "
                                                            "is at most D (default: kohya's 0.01)")
    device: str = option("cpu", help="where the SVDs run, e.g. cuda (default cpu)")
    clamp_quantile: float | None = option(None, metavar="Q", help="clip each module's factors at this quantile of "
                                          "their values, as sd-scripts does with 0.99 (default: no clipping, the "
                                          "best approximation at the rank)")
    save_precision: str = _precision()


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    file: str = option(positional=True, help="a LoRA .safetensors file")
    to: str = option(choices=CONVERT_TARGETS, help="the naming of the new file")
    output: str | None = _output("the new file (default: <stem>_diffusers.safetensors or <stem>_kohya.safetensors "
                                 "beside the input)", required=False)
    family: str | None = option(None, choices=CONVERT_FAMILIES, help="the model, when a diffusers file cannot tell "
                                "(names both FLUX.1 and SD3 have, no metadata)")
    overwrite: bool = option(False, help="replace the output file if it exists (never the input)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        TASK, help="inspect, merge, resize, extract or convert kohya LoRA files",
        description="Tools for kohya-format LoRA/LoCon files (the format Atelier, sd-scripts, A1111 and ComfyUI "
                    "use). Each writes a new file and never overwrites one.",
    )
    tools = parser.add_subparsers(dest="lora_command", metavar="TOOL", required=True)
    for add in TOOLS.values():
        add_arguments(add(tools), ReportOptions)
    return parser


def _add_inspect(tools: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = tools.add_parser(
        "inspect", help="format, modules, ranks, metadata and weight checks of a LoRA/LyCORIS/embedding file",
        description="Report a file's format (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, Textual Inversion), its modules "
                    "per model part, ranks, alphas, base model, training metadata and change norms. Exit 2 for a "
                    "file it does not understand or one with NaN/inf weights (named by module).")
    add_arguments(parser, InspectOptions)
    parser.set_defaults(handler=_run_inspect)
    return parser


def _add_merge(tools: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = tools.add_parser(
        "merge", help="merge LoRAs into a base model, or into one LoRA",
        description="With --into-model: add each LoRA (times its ratio) to the base model's weights and save a new "
                    "single-file checkpoint. Without: combine the LoRAs into one LoRA by concatenating their ranks "
                    "(exact), or with --svd re-factor to one rank.")
    add_arguments(parser, MergeOptions)
    parser.set_defaults(handler=_run_merge)
    return parser


def _add_resize(tools: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = tools.add_parser(
        "resize", help="change the rank of a LoRA by SVD",
        description="Re-factor each module at a new rank: fixed (--rank), or per module from its singular values "
                    "(--sv-ratio, --sv-fro). The report gives the fraction of each change that is kept.")
    add_arguments(parser, ResizeOptions, groups={"rule": parser.add_mutually_exclusive_group(required=True)})
    parser.set_defaults(handler=_run_resize)
    return parser


def _add_extract(tools: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = tools.add_parser(
        "extract", help="a LoRA from the difference between a fine-tuned model and its base",
        description="SVD of the weight difference of every layer a LoRA trains (the same layers as training), cut "
                    "to --rank; with --conv-rank also the ResNet convolutions (LoCon).")
    add_arguments(parser, ExtractOptions)
    parser.set_defaults(handler=_run_extract)
    return parser


def _add_convert(tools: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = tools.add_parser(
        "convert", help="a FLUX.1/Chroma/SD3 LoRA under diffusers' (PEFT) names, or back to kohya's",
        description="Write the LoRA under the other naming as a new file: --to diffusers turns kohya names "
                    "(lora_unet_..., lora_te1_...) into the transformer.* / text_encoder.* names that diffusers' "
                    "FluxPipeline and StableDiffusion3Pipeline load (alpha baked into the weights; T5 modules are "
                    "left out, diffusers loads no LoRA into T5); --to kohya turns such files, and those of "
                    "diffusers' training scripts, into kohya names. Exact both ways. LoHa/LoKr files do not "
                    "convert.")
    add_arguments(parser, ConvertOptions)
    parser.set_defaults(handler=_run_convert)
    return parser


# tool name -> function adding its parser (with `handler` set)
TOOLS: dict[str, Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = {
    "inspect": _add_inspect,
    "merge": _add_merge,
    "resize": _add_resize,
    "extract": _add_extract,
    "convert": _add_convert,
}
# tool name -> its options (the GUI builds each tool's command line from these)
TOOL_OPTIONS: dict[str, type] = {"inspect": InspectOptions, "merge": MergeOptions, "resize": ResizeOptions,
                                 "extract": ExtractOptions, "convert": ConvertOptions}


# --- handlers ----------------------------------------------------------------------------------------------------


def _report(args: argparse.Namespace, work: Callable[[], Any]) -> int:
    """Run a tool; print its report (text or JSON), or its ToolError as `error: ...` with exit 2. With --events the
    same report (or refusal) is the `done` event, after an `error` event for a refusal."""
    from engine.events import EventWriter
    from engine.networks.tools.lora_file import ToolError

    with EventWriter(args.events) as events:
        events.emit("start", task=TASK, tool=args.lora_command)
        try:
            report = work()
        except ToolError as error:
            print(f"error: {error}", file=sys.stderr)
            if args.json:
                print(json.dumps({"ok": False, "error": str(error)}))
            events.emit("error", message=str(error), hint="")
            events.emit("done", task=TASK, tool=args.lora_command, ok=False, error=str(error))
            return EXIT_BAD_INPUT
        payload = {"ok": True, **report.to_dict()}
        print(json.dumps(payload, indent=2) if args.json else report.to_text())
        events.emit("done", task=TASK, tool=args.lora_command, **payload)
    return EXIT_OK if payload["ok"] else EXIT_BAD_INPUT


def _dtype(args: argparse.Namespace) -> Any:
    from engine.networks.network_file import save_dtype

    return save_dtype(args.save_precision)


def _run_inspect(args: argparse.Namespace) -> int:
    from engine.networks.tools.inspect_file import inspect_network_file

    return _report(args, lambda: inspect_network_file(args.file))


def _run_merge(args: argparse.Namespace) -> int:
    from engine.networks.tools.lora_file import ToolError, parse_lora_source
    from engine.networks.tools.merge import merge_loras
    from engine.networks.tools.merge_model import merge_into_model

    sources = [parse_lora_source(text) for text in args.loras]
    text_encoders = {option: (getattr(args, _dest(option)), getattr(args, _dest(f"{option}-save-to")))
                     for option in TEXT_ENCODER_OPTIONS}
    given = [f"--{option}" for option, pair in text_encoders.items() if any(pair)]

    def work() -> Any:
        if args.into_model is None:
            if given:
                raise ToolError(f"{', '.join(given)} go with --into-model (merging into a FLUX.1/Chroma/SD3 model)")
            return merge_loras(sources, args.output, svd_rank=args.svd, conv_rank=args.conv_rank,
                               save_dtype=_dtype(args))
        if args.svd is not None or args.conv_rank is not None:
            raise ToolError("--svd and --conv-rank apply when merging LoRAs into one LoRA, not with --into-model")
        return merge_into_model(args.into_model, sources, args.output, save_dtype=_dtype(args),
                                text_encoders=text_encoders)

    return _report(args, work)


def _dest(option: str) -> str:
    return option.replace("-", "_")


def _run_resize(args: argparse.Namespace) -> int:
    from engine.networks.tools.resize import resize_lora

    rule, value = next((rule, value) for rule, value in (("rank", args.rank), ("sv_ratio", args.sv_ratio),
                                                          ("sv_fro", args.sv_fro)) if value is not None)
    return _report(args, lambda: resize_lora(args.file, args.output, rule=rule, value=value,
                                             conv_rank=args.conv_rank, save_dtype=_dtype(args)))


def _run_extract(args: argparse.Namespace) -> int:
    from engine.networks.tools.extract import extract_lora

    min_diff = {} if args.min_diff is None else {"min_diff": args.min_diff}
    return _report(args, lambda: extract_lora(args.base, args.tuned, args.output, rank=args.rank,
                                              conv_rank=args.conv_rank, device=args.device, save_dtype=_dtype(args),
                                              clamp_quantile=args.clamp_quantile, **min_diff))


def _run_convert(args: argparse.Namespace) -> int:
    from engine.networks.tools.convert_lora import convert_lora

    return _report(args, lambda: convert_lora(args.file, args.to, args.output, family=args.family,
                                              overwrite=args.overwrite))
