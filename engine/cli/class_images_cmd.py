"""`python -m engine class-images`: generate class (regularization) images from a base model into a folder."""

from __future__ import annotations

import argparse
import re
import secrets
import signal
import sys
import traceback
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, StopRequested, fail_task, stop_on_sigterm
from engine.cli.options import add_arguments, cli_options, option
from engine.config.choices import Sampler
from engine.models.families import FAMILY_INFO

if TYPE_CHECKING:
    from engine.class_images import ClassImageSettings
    from engine.events import EventWriter

TASK = "class-images"
_MIN_SIDE = 64
_MAX_T5_TOKENS = 512  # T5-XXL's longest input (model.t5xxl_max_token_length's bound)
_CONFIG_KEY = re.compile(r"\bmodel\.\w+")


@dataclass(frozen=True, kw_only=True)
class ClassImagesOptions:
    """The options of `class-images`, declared once: its parser's flags and the command line the GUI's
    Regularization tab builds (gui.views.regularization.class_images_args) both come from these fields."""

    model: str = option(help="base model: a .safetensors/.ckpt file, a diffusers folder or a hub id")
    model_family: str = option("auto", choices=("auto", *FAMILY_INFO))
    vae: str = option("", help="SD, SD3: a separate VAE file or folder (default: the model's own)")
    clip_l: str = option("", group="flux", help="CLIP-L text encoder file (clip_l.safetensors); FLUX.1, SD3")
    clip_g: str = option("", group="flux", help="CLIP-G text encoder file (clip_g.safetensors); SD3 only")
    t5xxl: str = option("", group="flux", help="T5-XXL text encoder file (e.g. t5xxl_fp16.safetensors)")
    ae: str = option("", group="flux", help="the autoencoder file (ae.safetensors)")
    tokenizer_cache_dir: str = option("", group="flux",
                                      help="folder with the CLIP and T5 tokenizers, for a machine without internet")
    t5xxl_max_token_length: int | None = option(None, group="flux",
                                                help="longest prompt T5 reads (default: 512; 256 for FLUX.1 schnell)")
    apply_t5_attn_mask: bool = option(False, group="flux", help="hide T5's padding from the model (Chroma is trained "
                                                                "with it: set it for Chroma)")
    apply_lg_attn_mask: bool = option(False, group="flux",
                                      help="SD3: hide the padding from CLIP-L's and CLIP-G's attention")
    v_parameterization: bool = option(False, help="the model predicts v (SD2 768-v single files; folders say so in "
                                                  "their scheduler)")
    prompt: str = option(help="e.g. 'a photo of a dog'")
    negative: str = option("", help="negative prompt")
    count: int = option(help="how many images to add")
    out: Path = option(help="the class folder, e.g. reg/1_dog (created if missing)")
    width: int | None = option(None, help="default: the model's native size (512, 768 or 1024); floored to a "
                                          "multiple of 8 (16 for FLUX.1/Chroma)")
    height: int | None = option(None, help="default: the model's native size")
    steps: int | None = option(None, help="default: 30 (FLUX.1/Chroma: 20)")
    guidance: float | None = option(None, help="SD: the classifier-free guidance scale (default 7.5); FLUX.1/Chroma: "
                                               "the embedded guidance (default 3.5)")
    cfg_scale: float | None = option(None, help="the classifier-free guidance scale, which also runs the negative "
                                                "prompt (default: --guidance for SD; 1.0 = off for FLUX.1/Chroma)")
    sampler: str = option("euler_a", choices=typing.get_args(Sampler),
                          help="SD only; FLUX.1/Chroma sample with flow-matching Euler")
    seed: int | None = option(None, help="seed of the first image (default: a random one, printed)")
    clip_skip: int = option(1)
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    dtype: str = option("auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="auto: float32 on a CPU; bfloat16 on a GPU that has it (no fp16 overflow in the SDXL "
                             "VAE), else float16")
    events: str | None = option(None, metavar="FILE", help="append start/progress/warning/error/done events")


# The loaders name config keys in their messages; here the user typed flags, so messages name those instead: the
# model section's keys that are options of this command too (model.vae -> --vae), and the model itself.
_FLAG_OF_KEY = {f"model.{declared.name}": declared.flag for declared in cli_options(ClassImagesOptions)} | \
    {"model.pretrained_model_name_or_path": "--model"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        TASK, help="generate class (regularization) images of a prompt from a base model",
        description="Generate COUNT images of PROMPT into OUT as NNNN.png with a NNNN.txt caption holding the "
                    "prompt. Numbering continues after the folder's highest number; no file is ever overwritten. "
                    "Image i uses seed SEED+i. Exit 0 when every image was written, 2 for bad input (model, "
                    "folder, count, size), 1 when generation failed or was stopped.",
    )
    flux = parser.add_argument_group(
        "FLUX.1 / Chroma / SD3", "the components a single model file lacks (a diffusers folder has its own)")
    add_arguments(parser, ClassImagesOptions, groups={"flux": flux})
    parser.set_defaults(handler=run)
    return parser


def _floored(value: int | None, flag: str, multiple: int, events: EventWriter) -> int | None:
    """A size floored to the family's multiple (8; FLUX 16), as sd-scripts does, with a warning when that changes it."""
    if value is None or value % multiple == 0:
        return value
    floored = max(_MIN_SIDE, value // multiple * multiple)
    events.emit("warning", message=f"{flag} {value} is not a multiple of {multiple}; using {floored}", where=flag,
                hint="")
    return floored


def _in_flag_terms(message: str) -> str:
    """A loader's message with the config keys it names (model.ae ...) replaced by this command's flags."""
    return _CONFIG_KEY.sub(lambda match: _FLAG_OF_KEY.get(match.group(0), match.group(0)), message)


def _settings(args: argparse.Namespace, family: str, seed: int, width: int | None,
              height: int | None) -> ClassImageSettings:
    """--guidance is the embedded guidance of a family whose sampler has one (FLUX.1), else the CFG scale (SD)."""
    from engine.class_images import ClassImageSettings
    from engine.train.sampling import prompt_defaults

    embedded = prompt_defaults(family).guidance is not None
    cfg_scale = args.cfg_scale if args.cfg_scale is not None or embedded else args.guidance
    return ClassImageSettings(prompt=args.prompt, count=args.count, seed=seed, negative_prompt=args.negative,
                              width=width, height=height, steps=args.steps, cfg_scale=cfg_scale,
                              guidance=args.guidance if embedded else None, sampler=args.sampler,
                              clip_skip=args.clip_skip)


def _input_problem(args: argparse.Namespace) -> tuple[str, str] | None:
    """(message, hint) for input that cannot work, checked before the model loads."""
    checks = (
        (args.count < 1, f"--count {args.count}: nothing to generate", "ask for 1 image or more"),
        (args.steps is not None and args.steps < 1, f"--steps {args.steps}: at least 1 step is needed",
         "30 is usual (20 for FLUX.1/Chroma)"),
        (args.t5xxl_max_token_length is not None and not 1 <= args.t5xxl_max_token_length <= _MAX_T5_TOKENS,
         f"--t5xxl-max-token-length {args.t5xxl_max_token_length}: must be 1 to {_MAX_T5_TOKENS}",
         "leave it out for the model's default"),
        (not args.prompt.strip(), "--prompt is empty", "describe the class, e.g. 'a photo of a dog'"),
        (args.out.exists() and not args.out.is_dir(), f"{args.out}: is a file, not a folder",
         "choose a folder for the class images (it is created if missing)"),
        (args.clip_skip < 1, f"--clip-skip {args.clip_skip}: must be 1 or more", "1 uses the last layer"),
        *((side is not None and side < _MIN_SIDE, f"{flag} {side}: images must be at least {_MIN_SIDE} pixels",
           "use 64 or more, a multiple of 8") for flag, side in (("--width", args.width), ("--height", args.height))),
    )
    return next(((message, hint) for failed, message, hint in checks if failed), None)


def _folder_name_warning(out: Path, events: EventWriter) -> None:
    from engine.config.dataset import parse_legacy_folder_name
    from engine.data.legacy import suggest_folder_name

    parsed = parse_legacy_folder_name(out.name)
    if parsed is None or parsed.repeats < 1:
        events.emit("warning", where=str(out),
                    message=f"the folder name '{out.name}' is not '<repeats>_<class>', so training's "
                            "dataset.reg_data_dir would skip it",
                    hint=f"name it like '{suggest_folder_name(out.name)}' inside the regularization folder")


def _device_and_dtype(device: str, dtype: str) -> tuple[str, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, getattr(torch, dtype)


_fail = partial(fail_task, task=TASK)


def run(args: argparse.Namespace) -> int:
    from engine.events import EventWriter

    with EventWriter(args.events) as events:
        problem = _input_problem(args)
        if problem is not None:
            return _fail(events, *problem, EXIT_BAD_INPUT, written=0)
        _folder_name_warning(args.out, events)
        seed = args.seed if args.seed is not None else secrets.randbits(32)
        previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
        try:
            return _generate(args, events, seed)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _generate(args: argparse.Namespace, events: EventWriter, seed: int) -> int:
    from engine.class_images import generate_class_images, sample_request, sampler_parts
    from engine.events import Progress
    from engine.models.loading import ModelLoadError, load_model
    from engine.train.sampling import prompt_defaults

    written: list[Path] = []
    try:
        device, dtype = _device_and_dtype(args.device, args.dtype)
        model = load_model(args.model, family=args.model_family, vae_path=args.vae, dtype=dtype, device=device,
                           clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl, ae=args.ae,
                           tokenizer_cache_dir=args.tokenizer_cache_dir)
        parts = sampler_parts(model, v_prediction=True if args.v_parameterization else None,
                              t5xxl_max_token_length=args.t5xxl_max_token_length,
                              apply_t5_attn_mask=args.apply_t5_attn_mask, apply_lg_attn_mask=args.apply_lg_attn_mask)
        multiple = prompt_defaults(model.family).size_multiple
        width, height = (_floored(side, flag, multiple, events) for flag, side in
                         (("--width", args.width), ("--height", args.height)))
        settings = _settings(args, model.family, seed, width, height)
        first = sample_request(settings, model.family, v_prediction=parts.v_prediction, index=0)
        print(f"{args.count} image(s) of {args.prompt!r} from a {model.family} model on {device}, seed {seed}, "
              f"{first.width}x{first.height}, {first.steps} steps, CFG {first.scale:g}"
              + (f", guidance {first.guidance:g}" if prompt_defaults(model.family).guidance is not None else "")
              + f", into {args.out}", file=sys.stderr)
        progress = Progress(TASK, args.count, events)

        def on_image(path: Path) -> None:
            written.append(path)
            progress.update(file=str(path))

        generate_class_images(parts, settings, args.out, device=device, dtype=dtype, on_image=on_image)
        progress.close()
    except ModelLoadError as error:
        return _fail(events, _in_flag_terms(str(error)),
                     "check --model and --model-family (FLUX.1/Chroma files: also --clip-l, --t5xxl and --ae; SD3 "
                     "files without their text encoders: --clip-l, --clip-g and --t5xxl)",
                     EXIT_BAD_INPUT, written=0)
    except (StopRequested, KeyboardInterrupt):
        print(f"stopped after {len(written)} image(s)", file=sys.stderr)
        events.emit("done", task=TASK, ok=False, stopped=True, written=len(written), seed=seed)
        return EXIT_FAILED
    except Exception as error:  # anything torch or diffusers raise: reported as an event, not a silent exit
        traceback.print_exc()
        return _fail(events, f"generation failed: {type(error).__name__}: {error}",
                     "the output above has the details", EXIT_FAILED, written=len(written), seed=seed)
    print(f"wrote {len(written)} image(s) to {args.out}")
    events.emit("done", task=TASK, ok=True, written=len(written), seed=seed, folder=str(args.out),
                files=[str(path) for path in written])
    return EXIT_OK
