"""Which model family a LoRA file belongs to, from its module names and metadata (no base model needed).

The metadata says it when present: ``ss_base_model_version`` (``sd_v1``, ``flux1``, ``chroma``, SD3's variants
``medium``, ``5-medium``, ``5-large``, ...) or ``modelspec.architecture`` (``flux-1-dev/lora``,
``stable-diffusion-3-5-large/lora``), matched against every family's entry in ``FAMILY_INFO``. The module names tell
the naming (``FamilyInfo.unet_naming``): ``lora_unet_double_blocks_0_...`` and ``lora_unet_single_blocks_0_...`` are
the BFL transformer's (FLUX.1 and Chroma), which the metadata then tells apart; without metadata such a file is
reported as "flux" (either). ``lora_unet_joint_blocks_0_...`` are the SD3 MMDiT's ("sd3"); an ``attn2`` module there
exists only in SD3.5 medium.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from engine.models.families import FAMILY_INFO, family_info
from engine.networks.lora_flux import block_of
from engine.networks.lora_sd3 import joint_block_of

__all__ = ["NAMING_LABELS", "families_named", "family_from_metadata", "lora_family", "naming_of", "network_module",
           "variant_of"]

# How to recognise a naming from one module name (only namings with names of their own are listed: the SD namings
# share lora_unet_down_blocks_... forms and are told apart by widths, see inspect_file).
NAMING_TESTS: dict[str, Callable[[str], bool]] = {
    "bfl": lambda name: block_of(name) is not None,
    "mmdit": lambda name: joint_block_of(name) is not None,
}
# What a file of a naming is called when the metadata does not say which of its families it is.
NAMING_LABELS = {"bfl": "flux", "mmdit": "sd3"}
_UNSET = (None, "", "None")
_SD35_MEDIUM_ONLY = "_x_block_attn2_"  # SD3.5 medium's second image attention (spec §8.1)


def naming_of(names: Iterable[str]) -> str | None:
    """The :data:`NAMING_TESTS` naming some module name has, or None."""
    names = list(names)
    return next((naming for naming, test in NAMING_TESTS.items() if any(test(name) for name in names)), None)


def families_named(naming: str) -> list[str]:
    """The families whose ``unet_naming`` is ``naming``."""
    return [name for name, info in FAMILY_INFO.items() if info.unet_naming == naming]


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family ``ss_base_model_version`` or ``modelspec.architecture`` names, or None."""
    version = metadata.get("ss_base_model_version")
    architecture = metadata.get("modelspec.architecture")
    for name, info in FAMILY_INFO.items():
        variants = dict(info.variant_architectures) if info.base_version_is_variant else {}
        if version not in _UNSET and version in (info.base_version, info.base_version_v, *variants):
            return name
    if architecture in _UNSET:
        return None
    base = architecture.split("/")[0]
    for name, info in FAMILY_INFO.items():
        if base in (info.architecture, info.architecture_v, *(arch for _, arch in info.variant_architectures)):
            return name
    return None


def variant_of(family: str, names: Iterable[str], metadata: Mapping[str, str]) -> str:
    """The base model's variant where the family has several ("dev", "schnell"; SD3 "medium", "5-medium",
    "5-large"), from the metadata, else from the module names (attn2 modules: SD3.5 medium); "" when unknown."""
    info = family_info(family)
    version = metadata.get("ss_base_model_version")
    if info.base_version_is_variant and version in dict(info.variant_architectures):
        return str(version)
    base = (metadata.get("modelspec.architecture") or "").split("/")[0]
    found = next((variant for variant, architecture in info.variant_architectures if architecture == base), "")
    if found or info.unet_naming != "mmdit":
        return found
    return "5-medium" if any(_SD35_MEDIUM_ONLY in name for name in names) else ""


def lora_family(names: Iterable[str], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(family, how it was found): a ``FAMILY_INFO`` name, a :data:`NAMING_LABELS` label, or "" when unknown.

    ``how`` is "metadata", "module names", or "metadata, but the module names are <naming>'s" when they disagree.
    """
    naming = naming_of(names)
    family = family_from_metadata(metadata)
    if family is not None:
        if naming is not None and family_info(family).unet_naming != naming:
            return family, f"metadata, but the module names are {NAMING_LABELS[naming]}'s"
        return family, "metadata"
    if naming is not None:
        return NAMING_LABELS[naming], "module names"
    return "", ""


def network_module(names: Iterable[str], metadata: Mapping[str, str], default: str = "networks.lora") -> str:
    """The sd-scripts network module a kohya LoRA of these names is loaded with (``networks.lora_flux`` for the
    BFL naming, ``networks.lora_sd3`` for SD3's): the family's ``kohya_network_module``, or the one all families of
    the naming share."""
    family = family_from_metadata(metadata)
    if family is not None:
        return family_info(family).kohya_network_module
    naming = naming_of(names)
    modules = {family_info(name).kohya_network_module for name in families_named(naming)} if naming else set()
    return modules.pop() if len(modules) == 1 else default
