"""What a model file is, from its safetensors header's key names alone (no torch: the GUI process asks).

The doctor and the GUI use these to detect the family of an "auto" model, and to say what a file given in the wrong
field really is ("this is a FLUX.1 transformer, not CLIP-G's file") instead of only what it is not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.config.choices import FLUX_FAMILIES, family_label
from engine.models.flux.convert import BFL_CHROMA_KEY, transformer_layout
from engine.models.flux.files import TRANSFORMER_PREFIX
from engine.models.ldm_checkpoint import detect_family
from engine.models.sd3.files import sd3_file  # header only, no torch
from engine.models.sd3.params import sd3_variant_of  # plain Python: no qk-norm, qk-norm + attn2, qk-norm alone
from engine.models.single_file import FileHeader

_SD3_BLOCK = re.compile(r"joint_blocks\.(\d+)\.")
_DIFFUSERS_SD3_KEY = "pos_embed.proj.weight"  # diffusers' SD3Transformer2DModel (FLUX's is x_embedder.weight)
SD3_VARIANT_LABELS = {"medium": "SD3 medium", "5-medium": "SD3.5 medium", "5-large": "SD3.5 large"}


def flux_family_of(header: FileHeader) -> str | None:
    """"flux1" or "chroma" for a file holding a FLUX.1/Chroma transformer, else None."""
    keys = {key.removeprefix(TRANSFORMER_PREFIX) for key in header.shapes}
    if _DIFFUSERS_SD3_KEY in keys or transformer_layout(keys) is None:
        return None  # diffusers' SD3 transformer shares FLUX's block names, not its patch embedder
    return "chroma" if BFL_CHROMA_KEY in keys else "flux1"


@dataclass(frozen=True)
class SD3Model:
    """What an SD3 / SD3.5 file's header says: its MMDiT and which other parts it holds."""

    variant: str  # "medium", "5-medium" or "5-large"
    depth: int  # joint blocks
    mmdit: dict[str, tuple[int, ...]]  # the MMDiT's shapes, prefix-free
    embedded: frozenset[str]  # the parts inside, as the loader finds them: "clip_l", "clip_g", "t5xxl", "vae"
    header: FileHeader

    @property
    def label(self) -> str:
        return SD3_VARIANT_LABELS[self.variant]


def read_sd3_file(header: FileHeader) -> SD3Model | None:
    """The SD3 model in a file (`model.diffusion_model.joint_blocks.0.*` or bare `joint_blocks.0.*` keys; the
    loader's own reading of the header), else None."""
    parts = sd3_file(header)
    if parts is None:
        return None
    mmdit = {name: header.shapes[key] for name, key in parts.transformer.items()}
    depth = 1 + max(int(match.group(1)) for name in mmdit if (match := _SD3_BLOCK.match(name)))
    return SD3Model(sd3_variant_of(mmdit), depth, mmdit, parts.embedded, header)


def model_family_of(header: FileHeader) -> str | None:
    """The FAMILY_INFO family of a base model file: "sd3", "flux1", "chroma", or an SD one; None for anything else
    (a component, a LoRA, an unknown layout)."""
    if read_sd3_file(header) is not None:
        return "sd3"
    flux = flux_family_of(header)
    if flux is not None:
        return flux
    if not any(key.startswith("model.diffusion_model.") for key in header.shapes):
        return None  # detect_family also answers for UNet-only and text-encoder files; a component is not a model
    try:
        return detect_family(header.shapes)
    except ValueError:
        return None


def model_kind(header: FileHeader) -> str | None:
    """What a base model file is, in words ("an SD3.5 large model", "a FLUX.1 transformer"), None if not one."""
    sd3 = read_sd3_file(header)
    if sd3 is not None:
        return f"an {sd3.label} model"
    family = model_family_of(header)
    if family is None:
        return None
    label = family_label(family)
    article = "an" if label.startswith("SD") else "a"  # "an SDXL checkpoint", "a FLUX.1 transformer"
    return f"{article} {label} " + ("transformer" if family in FLUX_FAMILIES else "checkpoint")
