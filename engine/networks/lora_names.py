"""Which layers a kohya LoRA trains, the names it gives them in saved files (spec §5.1), and its settings.

kohya searches "parent" modules by class name (``Transformer2DModel`` in the UNet, plus the ResNet, down- and
upsampling blocks for LoCon; the CLIP attention and MLP blocks in the text encoders) and wraps every ``Linear`` and
``Conv2d`` inside them. A module's name is ``<prefix>.<module path>`` with every ``.`` replaced by ``_``.

The module paths are kohya's, which are not always diffusers' or transformers':

* SD1/SD2: kohya's ``original_unet`` uses diffusers' module paths, so those are used as they are.
* SDXL: kohya's ``sdxl_original_unet`` uses the original (SAI / LDM) layout, e.g. ``input_blocks.4.1`` for
  ``down_blocks.1.attentions.0``. The mapping is derived from :func:`engine.models.ldm_keys.unet_to_ldm`, the same
  code that writes single-file checkpoints, so there is one table for both.
* FLUX.1 / Chroma (naming "bfl", sd-scripts ``networks/lora_flux.py``, spec §5.1): the transformer's own module
  paths are BFL's, e.g. ``lora_unet_double_blocks_0_img_attn_qkv``; the parents are ``DoubleStreamBlock`` and
  ``SingleStreamBlock`` (``final_layer`` is never wrapped), and ``in_dims`` adds the conditioning layers
  (``img_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``txt_in``) that the model has.
* SD3 / SD3.5 (naming "mmdit", sd-scripts ``networks/lora_sd3.py``, spec §8.6): the MMDiT's own module paths are
  SAI's, e.g. ``lora_unet_joint_blocks_0_x_block_attn_qkv``; the parent is ``DismantledBlock`` (each joint block's
  ``context_block`` and ``x_block``), and ``emb_dims`` adds the embedders and the final layer, including the
  ``x_embedder.proj`` Conv2d (:mod:`engine.networks.lora_sd3`).
* Text encoders: kohya's CLIP paths start with ``text_model.`` (transformers 4's ``CLIPTextModel`` wrapper).
  transformers >= 5.6 ``CLIPTextModel`` has no wrapper while ``CLIPTextModelWithProjection`` keeps one, so the
  prefix is added where it is missing. T5 (FLUX's and SD3's ``lora_te3``) keeps its own paths
  (``encoder.block.0.layer.0.SelfAttention.q``); its parents are ``T5Attention`` and ``T5DenseGatedActDense``.

Which naming a family uses is the family's ``unet_naming`` field (``engine.models.families``), never its name.

Settings come as keyword arguments and as kohya's ``network_args``. Left out of the latter: ``block_dims``,
``block_alphas``, ``conv_block_dims``, ``conv_block_alphas`` and the block learning-rate weights (``down_lr_weight``,
``mid_lr_weight``, ``up_lr_weight``, ``block_lr_zero_threshold``); they are rejected with a message that says so.
A naming may accept more network_args (FLUX's, :mod:`engine.networks.lora_flux`; SD3's,
:mod:`engine.networks.lora_sd3`); other namings refuse them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from engine.models.families import family_info
from engine.models.ldm_keys import UNET_PREFIX, unet_to_ldm
from engine.networks.arg_values import arg_number
from engine.networks.lora_flux import FLUX_NETWORK_ARGS, IN_DIM_LAYERS, FluxLoRAArgs, parse_flux_args, split_parts
from engine.networks.lora_sd3 import (
    EMB_DIM_LAYERS,
    MMDIT_BLOCK_CLASSES,
    SD3_NETWORK_ARGS,
    SD3_REFUSED_ARGS,
    SD3LoRAArgs,
    parse_sd3_args,
    sd3_split_parts,
)

if TYPE_CHECKING:  # torch is imported where layers are searched, so the config rules can parse network_args
    from torch import nn

__all__ = [
    "NETWORK_ARGS",
    "TEXT_ENCODER_PATH_PREFIX",
    "UNET_CONV_TARGET_CLASSES",
    "UNET_LORA_PREFIX",
    "UNET_NAMING",
    "UNET_TARGET_CLASSES",
    "LoRAOptions",
    "LoRATarget",
    "UnetNaming",
    "is_t5_encoder",
    "resolve_options",
    "text_encoder_path",
    "text_encoder_targets",
    "unet_naming",
    "unet_naming_kind",
    "unet_targets",
]

UNET_LORA_PREFIX = "lora_unet"
UNET_TARGET_CLASSES = frozenset({"Transformer2DModel"})
UNET_CONV_TARGET_CLASSES = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})
# kohya lists CLIPAttention, CLIPSdpaAttention and CLIPMLP; transformers has had other attention variants
# (CLIPFlashAttention2), all named CLIP*Attention, so the pattern covers them and any future one.
_TEXT_ENCODER_TARGET = re.compile(r"CLIP\w*Attention|CLIPMLP")
# T5 (FLUX's third text encoder): sd-scripts' lora_flux parents. T5DenseActDense is the ungated T5 v1.0 MLP.
_T5_TARGET = re.compile(r"T5Attention|T5DenseGatedActDense|T5DenseActDense")
TEXT_ENCODER_PATH_PREFIX = "text_model."
BFL_TARGET_CLASSES = frozenset({"DoubleStreamBlock", "SingleStreamBlock"})


@dataclass(frozen=True)
class LoRATarget:
    """One layer to wrap.

    Attributes:
        name: the kohya module name, e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``.
        module: the ``nn.Linear`` or ``nn.Conv2d`` to wrap.
        alias: another name the same layer has in files written by other tools (diffusers-style paths for
            SDXL, which kohya converts when it loads them), or None.
        embedder: one of the naming's conditioning layers (FLUX's in_dims, SD3's emb_dims): its rank comes from
            those network_args, even for a conv (SD3's 2x2 patch embedding).
    """

    name: str
    module: nn.Linear | nn.Conv2d
    alias: str | None = None
    embedder: bool = False

    @property
    def is_spatial_conv(self) -> bool:
        """A conv with a kernel larger than 1x1: it takes conv_dim/conv_alpha instead of dim/alpha."""
        from torch import nn

        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def _kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def _wrapped_layers(root: nn.Module, is_parent: Callable[[nn.Module], bool]) -> Iterable[tuple[str, nn.Module]]:
    """Yield (path, layer) for every Linear/Conv2d inside a parent module, in kohya's order."""
    from torch import nn

    for parent_path, parent in root.named_modules():
        if not is_parent(parent):
            continue
        for child_path, child in parent.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                yield f"{parent_path}.{child_path}" if parent_path else child_path, child


def _collect(prefix: str, layers: Iterable[tuple[str, nn.Module]], rename: Callable[[str], str],
             alias: Callable[[str], str | None], embedders: Iterable[tuple[str, nn.Module]] = ()) -> list[LoRATarget]:
    targets: dict[str, LoRATarget] = {}
    for (path, layer), embedder in [*((item, False) for item in layers), *((item, True) for item in embedders)]:
        name = _kohya_name(prefix, rename(path))
        if name in targets:
            # kohya asserts the same; two layers under one name would overwrite each other in the file.
            raise ValueError(f"two layers map to the LoRA module name {name!r} (the second is at {path!r})")
        targets[name] = LoRATarget(name, layer, alias(path), embedder)
    return list(targets.values())


def _sai_paths(unet: nn.Module) -> dict[str, str]:
    """diffusers module path -> SAI/LDM module path, for every module of the UNet that has a weight."""
    # unet_to_ldm only renames keys; giving it each key as its own "tensor" returns {ldm key: diffusers key}.
    keys = {key: key for key in unet.state_dict()}
    ldm = unet_to_ldm(keys, unet.config)  # type: ignore[arg-type]
    return {diffusers_key.removesuffix(".weight"): ldm_key.removeprefix(UNET_PREFIX).removesuffix(".weight")
            for ldm_key, diffusers_key in ldm.items() if diffusers_key.endswith(".weight")}


Rename = Callable[[str], str]
Alias = Callable[[str], "str | None"]


def _diffusers_unet_naming(unet: nn.Module) -> tuple[Rename, Alias]:
    return (lambda path: path), (lambda path: None)


def _sai_unet_naming(unet: nn.Module) -> tuple[Rename, Alias]:
    paths = _sai_paths(unet)

    def rename(path: str) -> str:
        if path not in paths:
            raise ValueError(f"the SDXL UNet layer {path!r} has no original (SAI) name; is this an SDXL UNet?")
        return paths[path]

    return rename, (lambda path: _kohya_name(UNET_LORA_PREFIX, path))


@dataclass(frozen=True)
class UnetNaming:
    """How one kind of denoiser is named and targeted by kohya's LoRA.

    Attributes:
        parents: classes whose Linear/Conv2d children are wrapped.
        conv_parents: more parents searched for LoCon (conv_dim > 0).
        names: for a model, (its module path -> kohya path, its module path -> another tool's name or None).
        embedders: module paths wrapped on request (FLUX's in_dims, SD3's emb_dims), in that argument's order.
        network_args: extra network_args this naming accepts: key -> (field, parser) of ``args_parser``'s result.
        args_parser: builds the naming's settings from those keys (None: the naming has none).
        refused_args: network_args refused with a reason of their own (an option of another naming's LoRA).
        wants_embedders: whether the naming's settings train any of ``embedders``.
        check_model: refuses settings the model cannot take (block indices it does not have).
        split_parts: split_qkv's output widths for a layer (module path, out, in), or None for one it keeps whole.
        label: the family name used in messages ("FLUX", "SD3").
        lycoris_classes: the only LyCORIS preset module classes kept for this naming (None: the preset's own).
        lycoris_preset_classes: preset class -> this model's class of the same block (sd-scripts' ``SingleDiTBlock``
            is SAI's ``DismantledBlock``).
        lycoris_text_classes: text-encoder module classes added to LyCORIS presets (T5).
    """

    parents: frozenset[str]
    conv_parents: frozenset[str]
    names: Callable[[nn.Module], tuple[Rename, Alias]]
    embedders: tuple[str, ...] = ()
    network_args: Mapping[str, tuple[str, Callable[[str, Any], Any]]] = field(default_factory=dict)
    args_parser: Callable[[Mapping[str, Any]], Any] | None = None
    refused_args: Mapping[str, str] = field(default_factory=dict)
    wants_embedders: Callable[[Any], bool] = lambda args: False
    check_model: Callable[[Any, nn.Module], None] = lambda args, model: None
    split_parts: Callable[[str, int, int], Sequence[int] | None] = lambda path, out_features, in_features: None
    label: str = ""
    lycoris_classes: frozenset[str] | None = None
    lycoris_preset_classes: Mapping[str, str] = field(default_factory=dict)
    lycoris_text_classes: frozenset[str] = frozenset()


_T5_CLASSES = frozenset({"T5Attention", "T5DenseGatedActDense", "T5DenseActDense"})


def _check_flux_blocks(args: FluxLoRAArgs, model: nn.Module) -> None:
    args.check_block_counts(*(len(getattr(model, name, ())) for name in ("double_blocks", "single_blocks")))


def _check_sd3_blocks(args: SD3LoRAArgs, model: nn.Module) -> None:
    args.check_block_count(len(getattr(model, "joint_blocks", ())))


# The kohya namings, keyed by FamilyInfo.unet_naming.
UNET_NAMING: dict[str, UnetNaming] = {
    "diffusers": UnetNaming(UNET_TARGET_CLASSES, UNET_CONV_TARGET_CLASSES, _diffusers_unet_naming),
    "sai": UnetNaming(UNET_TARGET_CLASSES, UNET_CONV_TARGET_CLASSES, _sai_unet_naming),
    # BFL's module paths are the names ComfyUI and sd-scripts use (spec §5.5), so no renaming and no alias.
    # LyCORIS presets list many architectures' classes; on FLUX only the blocks LoRA wraps are kept (never the
    # final layer), and T5's attention and MLP classes are added for train_t5xxl.
    "bfl": UnetNaming(BFL_TARGET_CLASSES, frozenset(), _diffusers_unet_naming, IN_DIM_LAYERS, FLUX_NETWORK_ARGS,
                      parse_flux_args, wants_embedders=lambda args: bool(args.in_dims),
                      check_model=_check_flux_blocks, split_parts=split_parts, label="FLUX",
                      lycoris_classes=BFL_TARGET_CLASSES, lycoris_text_classes=_T5_CLASSES),
    # SAI's module paths are the names ComfyUI and sd-scripts use (spec §5.5, §8.9): no renaming, no alias.
    # LyCORIS presets name the block sd-scripts' way (SingleDiTBlock); only those blocks are kept, as for LoRA.
    "mmdit": UnetNaming(MMDIT_BLOCK_CLASSES, frozenset(), _diffusers_unet_naming, EMB_DIM_LAYERS, SD3_NETWORK_ARGS,
                        parse_sd3_args, SD3_REFUSED_ARGS, wants_embedders=lambda args: args.trains_embedders,
                        check_model=_check_sd3_blocks, split_parts=sd3_split_parts, label="SD3",
                        lycoris_classes=MMDIT_BLOCK_CLASSES,
                        lycoris_preset_classes={"SingleDiTBlock": "DismantledBlock"},
                        lycoris_text_classes=_T5_CLASSES),
}


def unet_naming_kind(family: str) -> str:
    """The family's ``unet_naming`` ("diffusers", "sai", "bfl" or "mmdit").

    Raises:
        ValueError: an unknown family.
    """
    info = family_info(family)
    kind = getattr(info, "unet_naming", None)
    if kind is None:  # a families.py without the field yet: SDXL (size conditioning) is the SAI-named one
        kind = "sai" if info.uses_size_conditioning else "diffusers"
    return kind


def unet_naming(family: str) -> UnetNaming:
    kind = unet_naming_kind(family)
    if kind not in UNET_NAMING:
        raise ValueError(f"the model family {family!r} names its LoRA modules {kind!r}, which this version does "
                         f"not know; expected one of {', '.join(UNET_NAMING)}")
    return UNET_NAMING[kind]


def _embedder_layers(unet: nn.Module, paths: Iterable[str]) -> Iterable[tuple[str, nn.Module]]:
    """(path, Linear or Conv2d) in each named layer the model has (schnell has no guidance_in, Chroma no time_in)."""
    from torch import nn

    for path in paths:
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            continue
        for child_path, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                yield f"{path}.{child_path}" if child_path else path, child


def unet_targets(unet: nn.Module, family: str, *, include_conv_blocks: bool,
                 include_embedders: bool = False) -> list[LoRATarget]:
    """The UNet (or FLUX transformer) layers a kohya LoRA wraps, with their kohya names.

    Args:
        unet: a diffusers ``UNet2DConditionModel``, the FLUX transformer (engine.models.flux) or the SD3 MMDiT
            (engine.models.sd3).
        family: a family of ``FAMILY_INFO``; its ``unet_naming`` decides the naming (see the module docstring).
        include_conv_blocks: also search ResNet, Downsample and Upsample blocks (LoCon; kohya does this when
            conv_dim is given). The caller decides which of those layers get a rank.
        include_embedders: also the naming's conditioning layers (FLUX's in_dims, SD3's emb_dims layers) that the
            model has.

    Raises:
        ValueError: an unknown family, or two layers with the same name.
    """
    naming = unet_naming(family)
    parents = naming.parents | (naming.conv_parents if include_conv_blocks else frozenset())
    rename, alias = naming.names(unet)
    layers = _wrapped_layers(unet, lambda module: type(module).__name__ in parents)
    embedders = _embedder_layers(unet, naming.embedders) if include_embedders else ()
    return _collect(UNET_LORA_PREFIX, layers, rename, alias, embedders)


def _is_text_encoder_parent(module: nn.Module) -> bool:
    # The MRO, so that a subclass of CLIPAttention (an attention-implementation variant) is found too.
    return any(_TEXT_ENCODER_TARGET.fullmatch(cls.__name__) or _T5_TARGET.fullmatch(cls.__name__)
               for cls in type(module).__mro__)


def is_t5_encoder(text_encoder: nn.Module) -> bool:
    """A T5 encoder (FLUX's and SD3's lora_te3): kohya trains it only with network_args train_t5xxl."""
    return any(cls.__name__.startswith("T5") for cls in type(text_encoder).__mro__)


def text_encoder_path(text_encoder: nn.Module) -> Rename:
    """Module path -> kohya path: CLIP paths get the ``text_model.`` wrapper when missing; T5 paths stay."""
    if is_t5_encoder(text_encoder):
        return lambda path: path
    return lambda path: path if path.startswith(TEXT_ENCODER_PATH_PREFIX) else TEXT_ENCODER_PATH_PREFIX + path


def text_encoder_targets(text_encoder: nn.Module, prefix: str) -> list[LoRATarget]:
    """The layers of one text encoder a kohya LoRA wraps, named ``<prefix>_text_model_...`` (CLIP) or
    ``<prefix>_encoder_block_...`` (T5).

    Args:
        text_encoder: a transformers ``CLIPTextModel``, ``CLIPTextModelWithProjection`` or ``T5EncoderModel``.
        prefix: ``lora_te`` (SD1/SD2), ``lora_te1`` or ``lora_te2`` (SDXL), ``lora_te1`` / ``lora_te3`` (FLUX),
            ``lora_te1`` / ``lora_te2`` / ``lora_te3`` (SD3: CLIP-L, CLIP-G, T5).
    """
    return _collect(prefix, _wrapped_layers(text_encoder, _is_text_encoder_parent), text_encoder_path(text_encoder),
                    lambda path: None)


# --- settings -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoRAOptions:
    """The resolved settings of a network (keyword arguments merged with network_args)."""

    dim: int
    alpha: float
    conv_dim: int = 0
    conv_alpha: float = 1.0
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    # the naming's own network_args: FluxLoRAArgs ("bfl"), SD3LoRAArgs ("mmdit"); None for the SD namings
    naming_args: FluxLoRAArgs | SD3LoRAArgs | None = None

    @property
    def flux(self) -> FluxLoRAArgs | None:
        return self.naming_args if isinstance(self.naming_args, FluxLoRAArgs) else None

    @property
    def sd3(self) -> SD3LoRAArgs | None:
        return self.naming_args if isinstance(self.naming_args, SD3LoRAArgs) else None

    def rank_and_alpha(self, target: LoRATarget) -> tuple[int, float]:
        """3x3 convs take conv_dim/conv_alpha (0 = not trained); Linear and 1x1 convs take dim/alpha, or with
        FLUX's or SD3's network_args the rank they give (engine.networks.lora_flux, lora_sd3), as do the naming's
        conditioning layers (SD3's x_embedder is a 2x2 conv)."""
        if target.is_spatial_conv and not target.embedder:
            return self.conv_dim, self.conv_alpha
        args = self.naming_args
        return (args.rank(target.name, self.dim) if args else self.dim), self.alpha


# --- network_args ------------------------------------------------------------------------------------------------

def _number(path: str, value: Any) -> float:
    return arg_number(path, value, "a number")


def _rank(path: str, value: Any) -> int:
    number = _number(path, value)
    if number < 0 or number != int(number):
        raise ValueError(f"{path} must be a whole number of at least 0, got {value!r}")
    return int(number)


def _positive_rank(path: str, value: Any) -> int:
    rank = _rank(path, value)
    if rank < 1:
        raise ValueError(f"{path} must be at least 1, got {value!r}")
    return rank


def _alpha(path: str, value: Any) -> float:
    number = _number(path, value)
    if number < 0:
        raise ValueError(f"{path} must not be negative, got {value!r}")
    return number


def _probability(path: str, value: Any) -> float:
    number = _number(path, value)
    if not 0 <= number < 1:
        raise ValueError(f"{path} must be at least 0 and below 1, got {value!r}")
    return number


def _ratio(path: str, value: Any) -> float:
    number = _number(path, value)
    if number <= 0:
        raise ValueError(f"{path} must be above 0, got {value!r}")
    return number


# network_args this network understands: key -> parser(path, value). The first five are also keyword arguments.
NETWORK_ARGS: dict[str, Callable[[str, Any], Any]] = {
    "conv_dim": _rank,
    "conv_alpha": _alpha,
    "dropout": _probability,
    "rank_dropout": _probability,
    "module_dropout": _probability,
    "loraplus_lr_ratio": _ratio,
    "loraplus_unet_lr_ratio": _ratio,
    "loraplus_text_encoder_lr_ratio": _ratio,
}
# The keyword settings: config path (for messages) and check.
_KEYWORDS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "dim": ("network.network_dim", _positive_rank),
    "alpha": ("network.network_alpha", _alpha),
    "conv_dim": ("network.conv_dim", _rank),
    "conv_alpha": ("network.conv_alpha", _alpha),
    "dropout": ("network.network_dropout", _probability),
    "rank_dropout": ("network.rank_dropout", _probability),
    "module_dropout": ("network.module_dropout", _probability),
}
_DEFAULTS = {field.name: field.default for field in fields(LoRAOptions)}
_LEFT_OUT_ARGS = frozenset({"block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                            "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"})


def _parse_network_args(network_args: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                        refused: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse the generic keys; keys of ``extra`` (the naming's own) are skipped here, others refused."""
    parsed: dict[str, Any] = {}
    extra = extra or {}
    accepted = ", ".join([*NETWORK_ARGS, *extra])
    for key, value in network_args.items():
        path = f"network.network_args.{key}"
        if key in (refused or {}):
            raise ValueError(f"{path} is not supported: {refused[key]}")  # type: ignore[index]
        if key in _LEFT_OUT_ARGS:
            raise ValueError(f"{path}: per-block ranks and learning-rate weights are not supported by Atelier's "
                             f"LoRA; accepted keys: {accepted}")
        if key in extra:
            continue
        if key not in NETWORK_ARGS:
            raise ValueError(f"{path} is not an option of the LoRA network for this model family; accepted keys: "
                             f"{accepted}")
        parsed[key] = NETWORK_ARGS[key](path, value)
    return parsed


def resolve_options(keywords: Mapping[str, Any], network_args: Mapping[str, Any] | None,
                    naming: str = "diffusers") -> LoRAOptions:
    """Check the keyword settings and merge kohya's network_args into them.

    Args:
        keywords: ``dim``, ``alpha``, ``conv_dim``, ``conv_alpha``, ``dropout``, ``rank_dropout``,
            ``module_dropout`` (all required).
        network_args: :data:`NETWORK_ARGS` keys with numbers or numeric strings; a setting that is also a keyword
            (conv_dim, ...) may be given in either place, as kohya allows, but not differently in both. With the
            "bfl" naming also FLUX's keys (:data:`engine.networks.lora_flux.FLUX_NETWORK_ARGS`), with "mmdit" SD3's
            (:data:`engine.networks.lora_sd3.SD3_NETWORK_ARGS`).
        naming: the family's ``unet_naming`` (see :func:`unet_naming_kind`).

    Raises:
        ValueError: an unknown or unsupported key, a bad value or a contradiction; the message names the config
            path (``network.network_args.<key>``, ``network.network_dim``, ...).
    """
    args = dict(network_args or {})
    spec = UNET_NAMING[naming]
    merged: dict[str, Any] = {key: check(path, keywords[key]) for key, (path, check) in _KEYWORDS.items()}
    for key, value in _parse_network_args(args, spec.network_args, spec.refused_args).items():
        if key in merged and merged[key] not in (_DEFAULTS[key], value):
            raise ValueError(f"network.network_args.{key} = {value!r} contradicts {_KEYWORDS[key][0]} = "
                             f"{merged[key]!r}; set it in one place")
        merged[key] = value
    if spec.args_parser is not None:
        merged["naming_args"] = spec.args_parser({key: value for key, value in args.items()
                                                  if key in spec.network_args})
    return LoRAOptions(**merged)
