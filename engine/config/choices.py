"""Named choices of the config and what each one needs.

Choices that are closed sets are `Literal` types (strict-mode friendly and readable by the GUI). Choices that
need an optional package are described in small registries, so validation can say exactly which package and
which extra to install, without importing anything heavy.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from engine.models.families import FAMILY_INFO

Method = Literal["lora", "dreambooth", "finetune", "textual_inversion"]
ModelFamily = Literal["auto", "sd1", "sd2", "sdxl", "flux1", "chroma", "sd3"]
MixedPrecision = Literal["no", "fp16", "bf16"]
Attention = Literal["sdpa", "xformers", "none"]
LossType = Literal["l2", "huber", "smooth_l1", "l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
SaveModelAs = Literal["safetensors", "ckpt", "pt", "diffusers", "diffusers_safetensors"]
SavePrecision = Literal["float", "fp16", "bf16"]
LogWith = Literal["tensorboard", "wandb", "all"]
DynamoBackend = Literal["no", "inductor", "eager", "aot_eager", "cudagraphs"]
MaxTokenLength = Literal[75, 150, 225]
# Flow matching (FLUX.1, Chroma, SD3; spec §4.2, §4.4, §4.5, §8.4).
TimestepSampling = Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift"]
ModelPredictionType = Literal["raw", "additive", "sigma_scaled"]
WeightingScheme = Literal["uniform", "none", "sigma_sqrt", "logit_normal", "mode", "cosmap"]
ResizeInterpolation = Literal["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"]

LrScheduler = Literal[
    "constant",
    "constant_with_warmup",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "linear",
    "polynomial",
    "inverse_sqrt",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
]

# sd-scripts' sampler names (spec §7), mapped later to diffusers schedulers by the sampling code.
Sampler = Literal[
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
]

# Model families grouped by what applies to them. A setting declares the families it applies to
# (`setting(..., families=FLUX_FAMILIES)`): the GUI hides it for the others and a rule refuses a changed value there.
SD_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
FLUX_FAMILIES: tuple[str, ...] = ("flux1", "chroma")
SD3_FAMILIES: tuple[str, ...] = ("sd3",)  # SD3 medium, SD3.5 medium and large: the variant is read from the file
# Families trained with flow matching (the [flow] section); which of its settings each uses is per field.
FLOW_FAMILIES: tuple[str, ...] = FLUX_FAMILIES + SD3_FAMILIES


# Before a family is declared ("auto") only what every family accepts is enforced.
AUTO_BUCKET_MULTIPLE = 32


def family_label(name: str) -> str:
    info = FAMILY_INFO.get(name)
    return info.label if info else name


def family_names(names: Iterable[str]) -> str:
    """Families as messages list them: 'FLUX.1', 'FLUX.1 and Chroma', 'SD1.x, SD2.x and SDXL' (commas, since a
    label such as 'SD3 / SD3.5' holds a slash itself)."""
    labels = [family_label(name) for name in names]
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"


# Which parts of a full model each save format can hold: LoRA and embeddings are single files only.
SMALL_FILE_FORMATS = ("safetensors", "ckpt", "pt")
FULL_MODEL_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors")


@dataclass(frozen=True)
class OptionalPackage:
    """An importable module that a choice needs, and how a user gets it."""

    module: str
    pip_name: str
    extra: str | None = None  # the extra of pyproject.toml that installs it, if any

    def is_installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def install_hint(self) -> str:
        if self.extra is None:
            return f"install it with `pip install {self.pip_name}`"
        return (f"install it with `pip install {self.pip_name}` (or the `{self.extra}` extra: "
                f"pip install -e .[{self.extra}])")


BITSANDBYTES = OptionalPackage("bitsandbytes", "bitsandbytes", "gpu")
XFORMERS = OptionalPackage("xformers", "xformers", "gpu")
LYCORIS = OptionalPackage("lycoris", "lycoris-lora", "lycoris")
PRODIGY = OptionalPackage("prodigyopt", "prodigyopt", "optimizers")
DADAPTATION = OptionalPackage("dadaptation", "dadaptation", "optimizers")
LION = OptionalPackage("lion_pytorch", "lion-pytorch", "optimizers")
SCHEDULEFREE = OptionalPackage("schedulefree", "schedulefree", "optimizers")
# Not behind a name of OPTIMIZERS, but what sd-scripts users give as class paths (e.g. 'came_pytorch.CAME').
CAME = OptionalPackage("came_pytorch", "came-pytorch")
PYTORCH_OPTIMIZER = OptionalPackage("pytorch_optimizer", "pytorch-optimizer")
WANDB = OptionalPackage("wandb", "wandb", "wandb")

# The only top-level packages a class path in a config (optimizer_type) may be imported from. Importing a module
# runs its code, and a config can come from anywhere (an import, a shared preset, the GUI's HTTP API), so a path
# like 'os.system' or 'mypkg.evil.Opt' is refused by `validate`, and again right before importing.
CLASS_PATH_PACKAGES: dict[str, OptionalPackage | None] = {
    "torch": None, "transformers": None, "diffusers": None,  # always installed
    **{package.module: package for package in (BITSANDBYTES, PRODIGY, DADAPTATION, LION, SCHEDULEFREE, CAME,
                                               PYTORCH_OPTIMIZER)},
}

# Caption files are plain text. Only these extensions are read or written as captions, so that neither a config nor
# the caption tools (whose extension the GUI's HTTP API accepts) can make Atelier write a file that another program
# loads as code or data (a .pt state, a .py module). sd-scripts' form without the dot ('txt') is accepted too.
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption", ".cap", ".tags", ".text")


@dataclass(frozen=True)
class OptimizerInfo:
    """What the config needs to know about an optimizer; building it is the trainer's registry's job."""

    package: OptionalPackage | None = None
    schedule_free: bool = False
    # D-Adaptation and Prodigy estimate the step size themselves and expect learning_rate around 1.0.
    adaptive_lr: bool = False


_DADAPT = OptimizerInfo(DADAPTATION, adaptive_lr=True)
OPTIMIZERS: dict[str, OptimizerInfo] = {
    "AdamW": OptimizerInfo(),
    "AdamW8bit": OptimizerInfo(BITSANDBYTES),
    "PagedAdamW": OptimizerInfo(BITSANDBYTES),
    "PagedAdamW8bit": OptimizerInfo(BITSANDBYTES),
    "PagedAdamW32bit": OptimizerInfo(BITSANDBYTES),
    "Lion": OptimizerInfo(LION),
    "Lion8bit": OptimizerInfo(BITSANDBYTES),
    "PagedLion8bit": OptimizerInfo(BITSANDBYTES),
    "SGDNesterov": OptimizerInfo(),
    "SGDNesterov8bit": OptimizerInfo(BITSANDBYTES),
    "DAdaptation": _DADAPT,
    "DAdaptAdamPreprint": _DADAPT,
    "DAdaptAdaGrad": _DADAPT,
    "DAdaptAdam": _DADAPT,
    "DAdaptAdan": _DADAPT,
    "DAdaptAdanIP": _DADAPT,
    "DAdaptLion": _DADAPT,
    "DAdaptSGD": _DADAPT,
    "Prodigy": OptimizerInfo(PRODIGY, adaptive_lr=True),
    "Adafactor": OptimizerInfo(),
    "AdamWScheduleFree": OptimizerInfo(SCHEDULEFREE, schedule_free=True),
    "RAdamScheduleFree": OptimizerInfo(SCHEDULEFREE, schedule_free=True),
    "SGDScheduleFree": OptimizerInfo(SCHEDULEFREE, schedule_free=True),
}
_OPTIMIZERS_BY_LOWER = {name.lower(): name for name in OPTIMIZERS}


def canonical_optimizer_name(name: str) -> str | None:
    """The registry's spelling of an optimizer name given in any letter case, or None if it is not a known name."""
    return _OPTIMIZERS_BY_LOWER.get(name.lower())


def is_dotted_class_path(name: str) -> bool:
    """True for 'package.module.ClassName', the form sd-scripts accepts for optimizers outside its list."""
    parts = name.split(".")
    return len(parts) >= 2 and all(part.isidentifier() for part in parts)


def class_path_problem(path: str) -> str | None:
    """Why the class path `path` may not be imported, or None when it may. Imports nothing.

    Allowed: 'package.module.Class' whose top-level package is one of CLASS_PATH_PACKAGES, with no part starting
    with '_' (private modules and `__main__` scripts are no optimizer's home, and some run code when imported).
    """
    allowed = ", ".join(CLASS_PATH_PACKAGES)
    if not is_dotted_class_path(path):
        return f"{path!r} is not a class path of the form 'package.module.Class'"
    parts = path.split(".")
    if parts[0] not in CLASS_PATH_PACKAGES:
        return (f"{path!r} is not in an allowed package; class paths may only name classes of {allowed} "
                "(importing any other module would run its code)")
    if any(part.startswith("_") for part in parts):
        return f"{path!r} names a private module or class (a part starts with '_'); give the public class path"
    return None


def module_package(module: str) -> OptionalPackage:
    """The package that installs `module` (a dotted name is cut to its top level): one of CLASS_PATH_PACKAGES
    with its install hint, else a package named like the module."""
    top = module.split(".")[0]
    return CLASS_PATH_PACKAGES.get(top) or OptionalPackage(top, top.replace("_", "-"))


def dotted_caption_extension(text: str) -> str:
    """'.txt', or sd-scripts' 'txt', -> '.txt' (letter case kept).

    Raises:
        ValueError: `text` is not one of CAPTION_EXTENSIONS; the message lists them.
    """
    dotted = text if text.startswith(".") else f".{text}"
    if dotted.lower() not in CAPTION_EXTENSIONS:
        raise ValueError(f"{text!r} is not a caption file extension; use one of {', '.join(CAPTION_EXTENSIONS)} "
                         "(captions are text files)")
    return dotted


@dataclass(frozen=True)
class NetworkTypeInfo:
    """What a network type is built with, for validation and for the GUI's help text."""

    backend: Literal["kohya", "lycoris", "dylora"]
    summary: str
    needs_conv_dim: bool = False

    @property
    def package(self) -> OptionalPackage | None:
        return LYCORIS if self.backend == "lycoris" else None


NETWORK_TYPES: dict[str, NetworkTypeInfo] = {
    "lora": NetworkTypeInfo("kohya", "Classic LoRA on attention and feed-forward layers (kohya format)."),
    "locon": NetworkTypeInfo("kohya", "LoRA plus the 3x3 convolutions of ResNet blocks (kohya LoCon).", True),
    "loha": NetworkTypeInfo("lycoris", "LyCORIS LoHa: Hadamard product of two low-rank pairs."),
    "lokr": NetworkTypeInfo("lycoris", "LyCORIS LoKr: Kronecker product; very small files."),
    "dylora": NetworkTypeInfo("dylora", "DyLoRA (sd-scripts' networks.dylora): trains the ranks block by block, so "
                                        "its leading ranks work alone; saves a plain LoRA. SD1.x, SD2.x and SDXL."),
    "ia3": NetworkTypeInfo("lycoris", "LyCORIS (IA)^3: learned rescaling vectors, tiny and fast."),
    "glora": NetworkTypeInfo("lycoris", "LyCORIS GLoRA: generalized LoRA."),
    "boft": NetworkTypeInfo("lycoris", "LyCORIS BOFT: butterfly orthogonal fine-tuning."),
    "diag-oft": NetworkTypeInfo("lycoris", "LyCORIS Diag-OFT: diagonal orthogonal fine-tuning."),
    "full": NetworkTypeInfo("lycoris", "LyCORIS native fine-tuning: full weight differences."),
}
NetworkType = Literal["lora", "locon", "loha", "lokr", "dylora", "ia3", "glora", "boft", "diag-oft", "full"]
