"""LyCORIS network types (LoHa, LoKr, DyLoRA, (IA)^3, GLoRA, BOFT, Diag-OFT, full) through the lycoris-lora package.

lycoris' kohya path (``lycoris.kohya.LycorisNetworkKohya``, what sd-scripts runs for ``--network_module
lycoris.kohya``) chooses the layers from a preset and builds the modules. This module renames them to kohya's names
and gives the network the trainer's interface (:class:`engine.networks.lora.LoRANetwork`'s, which it extends).

Names. Saved files must load where sd-scripts' LyCORIS files load (A1111, ComfyUI): ``lora_unet_*`` / ``lora_te*_``
module names with the algorithm's suffixes (``hada_w1_a``, ``lokr_w1``, ...). lycoris names a module after its path
in the model it is given. For sd-scripts' models that is kohya's name; for diffusers and transformers 5 models it is
not: SDXL's UNet gets diffusers paths (``lora_unet_down_blocks_1_attentions_0_...`` where kohya has the SAI layout,
``lora_unet_input_blocks_4_1_...``), and transformers >= 5.6 ``CLIPTextModel`` has no ``text_model`` wrapper, so the
text encoder gets ``lora_te_encoder_layers_0_...`` where A1111, ComfyUI and diffusers look for
``lora_te_text_model_encoder_layers_0_...``. So every module is renamed with the kohya LoRA's naming
(:mod:`engine.networks.lora_names`); lycoris' own names for this model are accepted when loading.

Settings: network_dim/alpha, conv_dim/conv_alpha and the three dropouts come from the config; ``network_args`` holds
the LyCORIS options (:data:`LYCORIS_ARGS`). An option that lycoris would silently ignore (unknown, or not read by the
chosen algorithm) is an error that names ``network.network_args.<key>``. conv_dim = 0 means what the config says,
no 3x3 convolutions (lycoris alone would give them network_dim).

Worked around in lycoris 4.1.3:

* Presets list ``TimestepEmbedding`` (meant for another architecture). In a diffusers UNet that class is the time
  embedding, which "full" also targets by name, so lycoris builds ``lora_unet_time_embedding_linear_1`` twice and
  fails; it is dropped from the presets' class lists, which leaves the time embedding to the names that mean it.
* Presets are class attributes that a build only partly overwrites; every key is set for every build.
* Flags given as text are true unless they read "false", and ``decompose_both`` is not parsed at all; values are
  parsed here and handed to lycoris as Python values.
* Modules compute their scale from alpha once, when built, so a file with another alpha is refused, not loaded.

FLUX.1 / Chroma (the "bfl" naming): the presets' module classes are narrowed to the blocks kohya's LoRA wraps
(``DoubleStreamBlock``, ``SingleStreamBlock``), so the modules and their ``lora_unet_double_blocks_0_img_attn_qkv``
names are the LoRA's; T5 gets modules only with ``network_args`` ``train_t5xxl = true``, as with LoRA. The other
FLUX LoRA options (per-type dims, block indices, split_qkv, ...) are LoRA-only and refused here.

SD3 / SD3.5 (the "mmdit" naming) likewise: presets name sd-scripts' block class ``SingleDiTBlock``, which is this
MMDiT's ``DismantledBlock``; only those blocks are kept (``lora_unet_joint_blocks_0_x_block_attn_qkv``), T5 with
``train_t5xxl``, and the SD3 LoRA options are refused.

Not used: lycoris' DyLoRA. lycoris 4.1.3's DyLoRA scales its update by alpha / (blocks used) while training but saves
plain ``lora_up``/``lora_down``/``alpha`` entries, which every loader (lycoris' own, A1111, diffusers) applies with
alpha / rank; it also picks a random rank in eval mode, and saves convolution ``lora_up`` weights without their 1x1
kernel dimensions. ``network_type = "dylora"`` is sd-scripts' DyLoRA instead (:mod:`engine.networks.dylora`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.config.choices import LYCORIS
from engine.networks.lora import LoRANetwork, LoRAOptions, text_encoder_flags
from engine.networks.lora_names import (
    UNET_LORA_PREFIX,
    UnetNaming,
    is_t5_encoder,
    text_encoder_path,
    unet_naming,
    unet_naming_kind,
)

# The settings (network_args, presets) are parsed without torch, for the config rules too; re-exported here.
from engine.networks.lycoris_args import (
    ALGORITHMS,
    LYCORIS_ARGS,
    LycorisSettings,
    resolve_lycoris_settings,
)

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.loaded_model import LoadedModel

__all__ = ["ALGORITHMS", "LYCORIS_ARGS", "LycorisKohyaNetwork", "LycorisSettings",
           "create_lycoris_network", "lycoris_network", "resolve_lycoris_settings"]

# In presets for other architectures; in SD UNets it is the time (and SDXL's add) embedding (module docstring).
_NOT_FOR_SD_UNETS = frozenset({"TimestepEmbedding"})
# State-dict entries that come from settings rather than training: a file must agree with the network on them.
_SETTING_PARTS = frozenset({"alpha", "on_input"})
_ALPHA_RTOL = 4e-3  # an alpha saved in bf16 or fp16 is the same setting


# --- presets -----------------------------------------------------------------------------------------------------

def _preset_config(name: str, conv: bool, naming: UnetNaming | None = None) -> dict[str, Any]:
    """Every preset key lycoris reads, from the named preset over lycoris' defaults, fitted to the model's naming
    (SD UNets when ``naming`` is None or an SD naming)."""
    from lycoris.config import PRESET
    from lycoris.utils.preset import read_preset

    chosen = PRESET[name] if name in PRESET else read_preset(name)
    if chosen is None:
        raise ValueError(f"network.network_args.preset: {name!r} could not be read as a LyCORIS preset file")
    defaults = {**PRESET["full"], "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False,
                "exclude_name": []}
    preset = {**defaults, **chosen}
    preset["unet_target_module"] = [cls for cls in preset["unet_target_module"] if cls not in _NOT_FOR_SD_UNETS]
    if naming is not None and naming.lycoris_preset_classes:
        renamed = [naming.lycoris_preset_classes.get(cls, cls) for cls in preset["unet_target_module"]]
        preset["unet_target_module"] = list(dict.fromkeys(renamed))
    if naming is not None and naming.lycoris_classes is not None:
        preset["unet_target_module"] = [cls for cls in preset["unet_target_module"] if cls in naming.lycoris_classes]
    if naming is not None and naming.lycoris_text_classes:
        preset["text_encoder_target_module"] = [*preset["text_encoder_target_module"],
                                                *sorted(naming.lycoris_text_classes)]
    if conv and not preset["enable_conv"]:
        raise ValueError(f"network.conv_dim has no effect with the LyCORIS preset {name!r}, which trains no 3x3 "
                         "convolutions; set conv_dim = 0 or use the preset 'full'")
    preset["enable_conv"] = conv
    return preset


def _lycoris_kohya_class() -> type:
    try:
        from lycoris.kohya import LycorisNetworkKohya
    except ImportError as error:
        raise ImportError(f"LyCORIS network types need the '{LYCORIS.module}' package, which could not be imported "
                          f"({error}); {LYCORIS.install_hint()}") from error
    return LycorisNetworkKohya


# --- the network -------------------------------------------------------------------------------------------------

class LycorisKohyaNetwork(LoRANetwork):
    """lycoris modules under kohya's names: a :class:`LoRANetwork` whose modules are LoHa, LoKr, ... modules.

    Applying, restoring, multipliers, optimizer groups and module counts are the LoRA network's; saving keeps
    integer entries (IA3's ``on_input``) as they are, and loading checks each module's entries against the file.

    Attributes:
        settings: the LyCORIS settings it was built with.
    """

    def __init__(self, unet_loras: Sequence[nn.Module], text_encoder_loras: Sequence[Sequence[nn.Module]],
                 text_encoder_prefixes: Sequence[str], options: LoRAOptions, settings: LycorisSettings,
                 aliases: Mapping[str, str] | None = None) -> None:
        super().__init__(unet_loras, text_encoder_loras, text_encoder_prefixes, options, aliases)  # type: ignore[arg-type]
        self.settings = settings

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors to save, on the CPU and copied; ``dtype`` applies to floating-point entries only."""
        return {key: value.detach().to("cpu", dtype=dtype if dtype and value.is_floating_point() else value.dtype,
                                       copy=True)
                for key, value in self.state_dict().items()}

    # load_kohya_state_dict (inherited) reads kohya names or lycoris' names for this model and changes nothing if
    # a module's entries, shapes or alpha differ from this network's (the file was trained with other settings).
    _UNEXPECTED = "modules"
    _UNEXPECTED_HINT = "another model family, network type, preset or target layers?"
    _MODULES = "modules"
    _MISSING_HINT = "was it trained with another preset, conv_dim or text encoders?"

    @staticmethod
    def _check_module(name: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        _check_module_tensors(name, module, tensors)

    @staticmethod
    def _load_module(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        _load_module_tensors(module, tensors)

    @staticmethod
    def _accepts_part(part: str) -> bool:
        return True  # every entry of a module here is this network's; _check_module names any it does not expect


def _check_module_tensors(name: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    hint = ("set network_dim, conv_dim and network_args (factor, decompose_both, use_tucker, ...) to what the file "
            "was trained with")
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing:
        raise ValueError(f"{name}.{missing[0]} is missing from the network weights; {hint}")
    if extra:
        raise ValueError(f"{name}.{extra[0]} is in the network weights, but this network's module has "
                         f"{', '.join(sorted(expected))}; {hint}")
    for part, tensor in tensors.items():
        ours = expected[part]
        if tuple(tensor.shape) != tuple(ours.shape):
            raise ValueError(f"{name}.{part} has shape {tuple(tensor.shape)} in the network weights but "
                             f"{tuple(ours.shape)} here; {hint}")
        if part in _SETTING_PARTS and not torch.allclose(tensor.double(), ours.double(), rtol=_ALPHA_RTOL):
            raise ValueError(f"{name}.{part} is {tensor.item():g} in the network weights but {ours.item():g} here; "
                             "set network_alpha (conv_alpha for convolutions) to the file's value")


def _load_module_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    # The setting entries were checked to agree; the module keeps its own values, which its scale was built from.
    # lycoris' load hooks run (they turn full's saved difference into a weight, reset use_scalar's scalar, ...).
    own = {**tensors, **{part: value for part, value in module.state_dict().items() if part in _SETTING_PARTS}}
    with torch.no_grad():
        module.load_state_dict(own, strict=True)


def _some(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# --- building ----------------------------------------------------------------------------------------------------

def _module_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def _rename(loras: Sequence[nn.Module], root: nn.Module, prefix: str, rename: Callable[[str], str]
            ) -> tuple[list[nn.Module], dict[str, str]]:
    """The modules that wrap a layer of ``root``, renamed to kohya's names, and {lycoris' name: kohya name}."""
    paths = {id(module): path for path, module in root.named_modules()}
    mine: list[nn.Module] = []
    aliases: dict[str, str] = {}
    for lora in loras:
        path = paths.get(id(lora.org_module[0]))
        if path is None:
            continue
        lora.lora_name = _module_name(prefix, rename(path))
        if _module_name(prefix, path) != lora.lora_name:
            aliases[_module_name(prefix, path)] = lora.lora_name
        mine.append(lora)
    return mine, aliases


def create_lycoris_network(unet: nn.Module, text_encoders: Sequence[nn.Module], family: str, *, algo: str, dim: int,
                           alpha: float, conv_dim: int = 0, conv_alpha: float = 1.0, dropout: float = 0.0,
                           rank_dropout: float = 0.0, module_dropout: float = 0.0, train_unet: bool = True,
                           train_text_encoder: bool | Sequence[bool] = True,
                           network_args: Mapping[str, Any] | None = None,
                           multiplier: float = 1.0) -> LycorisKohyaNetwork:
    """Build a LyCORIS network with lycoris' kohya path and kohya's module names; not yet applied.

    Args:
        unet: diffusers ``UNet2DConditionModel``.
        text_encoders: the family's text encoders in order (see ``create_lora_network``).
        family: a family of ``FAMILY_INFO``; its ``unet_naming`` decides the names.
        algo: the lycoris algorithm (:data:`ALGORITHMS`).
        dim, alpha: rank and alpha of Linear and 1x1 conv layers (LoKr: a huge dim means full matrices).
        conv_dim, conv_alpha: rank and alpha of 3x3 convs (0 = not trained).
        dropout, rank_dropout, module_dropout: lycoris' dropouts (dropout acts on each module's output).
        train_unet: add modules to the UNet.
        train_text_encoder: add modules to the text encoders (a bool for all, or one per encoder); T5 also needs
            network_args train_t5xxl.
        network_args: preset and LyCORIS options (see :func:`resolve_lycoris_settings`).
        multiplier: the initial strength of every module.

    Raises:
        ValueError: bad settings (the message names the setting), or the preset matches no layer.
        ImportError: lycoris is not installed (the message says how to install it).
    """
    _lycoris_kohya_class()  # a missing package is reported before any option that needs it
    naming = unet_naming(family)
    options, settings = resolve_lycoris_settings(
        algo, {"dim": dim, "alpha": alpha, "conv_dim": conv_dim, "conv_alpha": conv_alpha, "dropout": dropout,
               "rank_dropout": rank_dropout, "module_dropout": module_dropout}, network_args,
        unet_naming_kind(family))
    prefixes, train_each = text_encoder_flags(family, text_encoders, train_text_encoder)
    train_each = [train and (settings.train_t5xxl or not is_t5_encoder(encoder))
                  for encoder, train in zip(text_encoders, train_each, strict=True)]

    built = _build_lycoris(unet if train_unet else nn.Module(),
                           [encoder if train else nn.Module() for encoder, train in zip(text_encoders, train_each,
                                                                                        strict=True)],
                           options, settings, multiplier, naming)
    unet_loras, aliases = _rename(built.unet_loras, unet, UNET_LORA_PREFIX, naming.names(unet)[0])
    text_loras = []
    for encoder, prefix in zip(text_encoders, prefixes, strict=True):
        loras, encoder_aliases = _rename(built.text_encoder_loras, encoder, prefix, text_encoder_path(encoder))
        text_loras.append(loras)
        aliases.update(encoder_aliases)
    if not unet_loras and not any(text_loras):
        raise ValueError(f"the LyCORIS preset {settings.preset!r} matches no layer of this {family} model "
                         "(network.network_args.preset)")
    return LycorisKohyaNetwork(unet_loras, text_loras, prefixes, options, settings, aliases)


def _build_lycoris(unet: nn.Module, text_encoders: list[nn.Module], options: LoRAOptions, settings: LycorisSettings,
                   multiplier: float, naming: UnetNaming | None = None) -> Any:
    """lycoris' kohya network for the given models (untrained parts are empty modules), built but not applied."""
    kohya_class = _lycoris_kohya_class()
    kohya_class.apply_preset(_preset_config(settings.preset, conv=options.conv_dim > 0, naming=naming))
    try:
        return kohya_class(
            text_encoders, unet, multiplier=multiplier, lora_dim=options.dim, conv_lora_dim=options.conv_dim,
            alpha=options.alpha, conv_alpha=options.conv_alpha, dropout=options.dropout,
            rank_dropout=options.rank_dropout, module_dropout=options.module_dropout, network_module=settings.algo,
            warn_on_unmatched=False, **settings.keywords,
        )
    except ValueError as error:  # e.g. BOFT on a layer width it cannot factor
        raise ValueError(f"lycoris could not build a {settings.algo} network with these settings: {error}; "
                         "check network.network_dim and network.network_args") from error


def lycoris_network(config: RunConfig, model: LoadedModel, train_unet: bool, train_text: list[bool]
                    ) -> LycorisKohyaNetwork:
    """The trainer's builder for network types with the "lycoris" backend (engine.train.method_lora)."""
    section = config.network
    return create_lycoris_network(
        model.unet, model.text.encoders, model.family, algo=section.network_type, dim=section.network_dim,
        alpha=section.network_alpha, conv_dim=section.conv_dim, conv_alpha=section.conv_alpha,
        dropout=section.network_dropout, rank_dropout=section.rank_dropout, module_dropout=section.module_dropout,
        train_unet=train_unet, train_text_encoder=train_text, network_args=section.network_args,
    )
