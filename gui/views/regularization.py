"""The Regularization tab's logic, without gradio: class folders, the balancing numbers in plain words, and the
command line of `python -m engine class-images`.

Balancing is sd-scripts' rule (engine.data.balance): regularization images get repeats until there are as many
regularization samples per epoch as training samples, and images not reached on the first pass are never used.
The numbers come from scanning the same folders training scans (engine.data.scan), so they match the run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from engine.cli.class_images_cmd import TASK as CLASS_IMAGES_TASK
from engine.cli.class_images_cmd import ClassImagesOptions
from engine.cli.options import to_argv
from engine.config.dataset import parse_legacy_folder_name
from engine.config.errors import ConfigError
from engine.config.io import deep_merge, default_config_dict, validate_config
from engine.config.paths import get_path
from engine.data.images import is_image_file
from engine.data.records import Finding, ScanResult
from engine.models.families import FAMILY_INFO
from gui.browse import FileRoots, PathNotAllowed

MODEL_PATH = "model.pretrained_model_name_or_path"
TRAIN_DIR = "dataset.train_data_dir"
REG_DIR = "dataset.reg_data_dir"
PRIOR_LOSS_WEIGHT = "training.prior_loss_weight"
# the tab's path fields, as their labels name them in messages
PARENT_LABEL, FOLDER_LABEL, TRAIN_LABEL, MODEL_LABEL = ("Regularization folder", "Class image folder",
                                                        "Training folder", "Base model")
VAE_LABEL = "model.vae (Parameters tab)"  # generation uses the Parameters tab's VAE with its model
# FLUX.1/Chroma and SD3: the Parameters tab's component files go with its model too; each config path names the
# class-images option of the same name (model.clip_l -> ClassImagesOptions.clip_l, --clip-l)
COMPONENT_PATHS = ("model.clip_l", "model.clip_g", "model.t5xxl", "model.ae", "model.tokenizer_cache_dir")
# The loaders (FamilyInfo.loader) of families whose text encoders may be files of their own
COMPONENT_LOADERS = ("flux", "sd3")
T5_LENGTH, T5_MASK, LG_MASK = "model.t5xxl_max_token_length", "model.apply_t5_attn_mask", "model.apply_lg_attn_mask"
LOCATION_LABELS = (MODEL_LABEL, VAE_LABEL)  # a local file/folder or a Hugging Face hub id
_BAD_CLASS_CHARACTERS = re.compile(r"[/\\\x00]")
# What the balance text says itself, or what only concerns a missing training folder.
_FINDINGS_SAID = {"reg-unused", "no-images", "no-dataset"}
_SEVERITY_MARK = {"error": "✖", "warning": "⚠"}  # not emoji: those need an emoji font


@cache
def field_help(path: str) -> str:
    """The config field's description: help text lives once, in the config model."""
    from engine.config.describe import iter_fields

    return next(spec.description for spec in iter_fields() if spec.path == path)


def config_value(config: Mapping[str, Any] | None, path: str, default: Any = "") -> Any:
    """A value of the Parameters tab's config dict (nested), or `default` while there is none."""
    return get_path(config, path, default) if config else default


def outside_roots(fields: Mapping[str, str], roots: FileRoots) -> str:
    """A sentence naming the first field (label -> path) whose path the app may not use (gui.browse's one rule and
    message), or '' when all may be used. Empty ones are skipped; a model or VAE may also be a hub id."""
    for label, path in fields.items():
        if not path.strip():
            continue
        check = roots.check_location if label in LOCATION_LABELS else roots.check
        try:
            check(path.strip(), label)
        except PathNotAllowed as error:
            return f"**{error}**"
    return ""


def generate_paths(request: GenerateRequest, config: Mapping[str, Any] | None) -> dict[str, str]:
    """The paths generation reads and writes, by field label, for `outside_roots`: the class folder, the model and,
    when the model is the Parameters tab's, its VAE and FLUX / SD3 component files (see _model_flags)."""
    model = request.model.strip()
    configured = bool(config) and model == config_value(config, MODEL_PATH)
    vae = config_value(config, "model.vae") if configured else ""
    components = _components(config) if configured else {}
    return {FOLDER_LABEL: request.out, MODEL_LABEL: model, VAE_LABEL: vae or ""} | \
        {f"{path} (Parameters tab)": value for path, value in components.items()}


def reg_patch(parent: str, prior_loss_weight: float) -> dict[str, Any]:
    """What the Parameters tab gets: the regularization folder (the parent of the class folders) and the weight."""
    return {REG_DIR: parent.strip(), PRIOR_LOSS_WEIGHT: float(prior_loss_weight)}


# --- class folders ------------------------------------------------------------------------------------------------


def class_folder_name(repeats: float | int | None, class_prompt: str) -> str:
    """'<repeats>_<class>', e.g. '1_dog'.

    Raises:
        ValueError: no class, a class with a path separator, or repeats below 1; the message says what to change.
    """
    text = " ".join(class_prompt.split())
    if not text:
        raise ValueError("Type the class prompt first, e.g. 'dog' or 'woman'.")
    if _BAD_CLASS_CHARACTERS.search(text):
        raise ValueError(f"The class prompt '{text}' cannot name a folder: remove '/' and '\\'.")
    if repeats is None or int(repeats) != repeats or repeats < 1:
        raise ValueError(f"Repeats must be a whole number of 1 or more, not {repeats}.")
    return f"{int(repeats)}_{text}"


def create_class_folder(parent: str, repeats: float | int | None, class_prompt: str,
                        roots: FileRoots) -> tuple[Path, str]:
    """Create (or reuse) `<parent>/<repeats>_<class>`; returns it and a sentence for the page.

    Raises:
        ValueError: no parent, a parent outside the allowed folders, a parent that is a file, or a bad name.
    """
    if not parent.strip():
        raise ValueError("Choose the regularization folder first (e.g. your project's 'reg' folder).")
    root = roots.check(parent.strip(), PARENT_LABEL)  # PathNotAllowed is a ValueError
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder; choose a folder.")
    folder = root / class_folder_name(repeats, class_prompt)
    if folder.is_dir():
        return folder, f"`{folder}` already exists; its images are kept and used."
    folder.mkdir(parents=True)
    return folder, f"Created `{folder}`."


@dataclass(frozen=True)
class ClassFolder:
    """What a class folder's name says: '<repeats>_<class>' inside the regularization folder."""

    parent: Path
    repeats: int
    class_prompt: str


def read_class_folder(path: str) -> ClassFolder | None:
    """The repeats and class of a folder named '<repeats>_<class>'; None for any other name."""
    if not path.strip():
        return None
    folder = Path(path.strip()).expanduser()
    parsed = parse_legacy_folder_name(folder.name)
    if parsed is None or parsed.repeats < 1 or not parsed.class_tokens:
        return None
    return ClassFolder(folder.parent, parsed.repeats, parsed.class_tokens)


def image_names(folder: str | Path) -> set[str]:
    """Names of the images in a folder (none when it does not exist)."""
    path = Path(folder)
    return {entry.name for entry in path.iterdir() if is_image_file(entry.name)} if path.is_dir() else set()


def new_images(folder: str | Path, before: set[str], limit: int) -> list[str]:
    """Paths of the images that appeared since `before` was taken, in name order, the newest `limit` of them."""
    names = sorted(image_names(folder) - before)
    return [str(Path(folder) / name) for name in names[-limit:]] if limit > 0 else []


# --- balancing ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BalanceNumbers:
    """One epoch of the legacy folders, after sd-scripts' balancing."""

    train_images: int
    train_samples: int  # images × their folders' repeats
    reg_images: int
    reg_samples: int  # regularization samples used per epoch
    reg_unused: int  # regularization images never used
    findings: list[Finding] = field(default_factory=list)


def _scan(train_dir: str, reg_dir: str, config: Mapping[str, Any] | None) -> ScanResult:
    """Scan the folders with the current settings (caption extension, buckets), or the defaults."""
    from engine.data.scan import scan_config  # reads image headers only; no torch

    folders = {"dataset": {"train_data_dir": train_dir, "reg_data_dir": reg_dir, "config_file": "", "datasets": [],
                           "in_json": ""}}
    try:
        run_config = validate_config(deep_merge(deep_merge(default_config_dict(), dict(config or {})), folders),
                                     check_packages=False)
    except ConfigError:  # the Parameters tab has a problem to fix; the folders alone can still be counted
        run_config = validate_config(deep_merge(default_config_dict(), folders), check_packages=False)
    return scan_config(run_config, Path.cwd())


def _reg_only(reg_dir: str) -> BalanceNumbers:
    """Without a training folder there is nothing to balance (nor a valid config): count the class images."""
    from engine.data.legacy import legacy_subset_params

    subsets, findings = legacy_subset_params(Path(reg_dir).expanduser(), is_reg=True, base={})
    count = sum(len(image_names(params["image_dir"])) for _, params in subsets)
    return BalanceNumbers(0, 0, count, 0, 0, [f for f in findings if f.severity in _SEVERITY_MARK])


def balance_numbers(train_dir: str, reg_dir: str, config: Mapping[str, Any] | None = None) -> BalanceNumbers:
    """Count both folders as training would: train samples, reg images, reg samples used and images unused."""
    if not train_dir.strip():
        return _reg_only(reg_dir.strip())
    result = _scan(train_dir.strip(), reg_dir.strip(), config)
    records = [record for dataset in result.datasets for subset in dataset.subsets for record in subset.records]
    train = [record for record in records if not record.is_reg]
    reg = [record for record in records if record.is_reg]
    findings = [finding for finding in result.findings
                if finding.severity in _SEVERITY_MARK and finding.code not in _FINDINGS_SAID]
    used = sum(record.num_repeats for record in reg) if train else 0
    unused = sum(1 for record in reg if record.num_repeats == 0) if train else 0
    return BalanceNumbers(len(train), sum(record.num_repeats for record in train), len(reg), used, unused, findings)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def balance_summary(numbers: BalanceNumbers) -> str:
    """One or two sentences saying what the numbers mean for training."""
    if not numbers.reg_images:
        return "There are no regularization images yet: create a class folder and add or generate images."
    if not numbers.train_images:
        return "Choose the training folder to see how many regularization images each epoch uses."
    epoch = (f"An epoch then has {numbers.train_samples + numbers.reg_samples} samples: regularization doubles the "
             "steps per epoch.")
    if numbers.reg_unused:
        return (f"{numbers.reg_unused} of the {numbers.reg_images} regularization images are never used: training "
                f"takes only as many regularization samples as it has training samples "
                f"({numbers.train_samples}). More training images or repeats would use them. {epoch}")
    if numbers.reg_samples > numbers.reg_images:
        times = numbers.reg_samples / numbers.reg_images
        return (f"Every regularization image is used, about {times:.1f} times per epoch, to match the "
                f"{numbers.train_samples} training samples. {epoch}")
    return f"Every regularization image is used once per epoch. {epoch}"


def balance_markdown(numbers: BalanceNumbers) -> str:
    """The numbers as a small table, what they mean, and the scan's problems with these folders."""
    used = str(numbers.reg_samples) if numbers.train_images else "–"
    unused = str(numbers.reg_unused) if numbers.train_images else "–"
    lines = [
        "| Per epoch | Count |", "|---|---|",
        f"| Training samples (images × repeats) | **{numbers.train_samples}** "
        f"({_plural(numbers.train_images, 'image')}) |",
        f"| Regularization images | **{numbers.reg_images}** |",
        f"| Regularization samples used | **{used}** |",
        f"| Unused regularization images | **{unused}** |",
        "", balance_summary(numbers),
    ]
    if numbers.findings:
        lines += ["", *(f"- {_SEVERITY_MARK[f.severity]} `{f.where}`: {f.message}" + (f" ({f.hint})" if f.hint else "")
                        for f in numbers.findings[:8])]
        if len(numbers.findings) > 8:
            lines.append(f"- … and {len(numbers.findings) - 8} more (the Dataset tab's doctor lists them all)")
    return "\n".join(lines)


# --- generation ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateRequest:
    """The Generate form. Sizes of 0 mean the model's native size; a seed below 0 a random one."""

    model: str
    out: str
    prompt: str
    negative: str = ""
    count: int = 10
    steps: int = 30
    width: int = 0
    height: int = 0
    seed: int = -1


def _takes_components(config: Mapping[str, Any] | None) -> bool:
    """Whether the configured family loads separate component files (FLUX.1, Chroma, SD3), or may ("auto")."""
    family = config_value(config, "model.model_family", "auto")
    return family == "auto" or (family in FAMILY_INFO and FAMILY_INFO[family].loader in COMPONENT_LOADERS)


def _components(config: Mapping[str, Any] | None) -> dict[str, str]:
    """The set component files and tokenizer folder of the Parameters tab (config path -> value), for a family that
    loads them; an "auto" model that is SD ignores them."""
    if not _takes_components(config):
        return {}
    return {path: str(value) for path in COMPONENT_PATHS if (value := config_value(config, path))}


def _option_name(path: str) -> str:
    """The class-images option a model config path goes to: model.vae -> vae (ClassImagesOptions' field)."""
    return path.removeprefix("model.")


def _model_values(model: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Parameters tab's family, VAE, v-prediction, FLUX / SD3 components and text encoder options (class-images
    option -> value), when the model is the one configured there."""
    if not config or model != config_value(config, MODEL_PATH):
        return {}
    values = {"model_family": config_value(config, "model.model_family", "auto"),
              "vae": config_value(config, "model.vae") or None,
              "v_parameterization": bool(config_value(config, "model.v_parameterization", False))}
    values |= {_option_name(path): value for path, value in _components(config).items()}
    if _takes_components(config):
        length = config_value(config, T5_LENGTH, None)
        values |= {"t5xxl_max_token_length": None if length is None else int(length)}
        values |= {_option_name(path): bool(config_value(config, path, False)) for path in (T5_MASK, LG_MASK)}
    return values


def class_images_args(request: GenerateRequest, config: Mapping[str, Any] | None = None) -> list[str]:
    """`python -m engine` arguments for the request (without --events, which EngineJob adds), written from the
    engine's declaration of the command's options (ClassImagesOptions).

    Raises:
        ValueError: a missing model, folder or prompt, or a count or step count below 1; the message says which.
    """
    model, out, prompt = request.model.strip(), request.out.strip(), " ".join(request.prompt.split())
    problems = ((not model, "Choose the base model (a .safetensors/.ckpt file or a diffusers folder)."),
                (not out, "Choose or create the class image folder first."),
                (not prompt, "Type a prompt or a class prompt, e.g. 'a photo of a dog'."),
                (request.count < 1, "Generate at least 1 image."),
                (request.steps < 1, "Use at least 1 step."))
    for failed, message in problems:
        if failed:
            raise ValueError(message)
    # None leaves an option out: 0 sizes are the model's native size, a negative seed a random one
    values = {"model": model, "prompt": prompt, "count": int(request.count), "out": out,
              "steps": int(request.steps), **_model_values(model, config),
              "negative": request.negative.strip() or None,
              "width": int(request.width) if request.width else None,
              "height": int(request.height) if request.height else None,
              "seed": int(request.seed) if request.seed >= 0 else None}
    return [CLASS_IMAGES_TASK, *to_argv(ClassImagesOptions, values)]
