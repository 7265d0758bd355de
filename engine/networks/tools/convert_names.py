"""Which kohya LoRA module is which diffusers (PEFT) module, for ``lora convert`` (spec §1.6, §8.9, appendix A.4).

A kohya module is named ``lora_unet_`` + the model's own (BFL / SAI) layer path with ``.`` → ``_``; diffusers
names it ``transformer.`` + the layer's path in ``FluxTransformer2DModel`` / ``SD3Transformer2DModel``. The layer
correspondence is the model converters' own table (``engine.models.flux.convert.conversion_plan``,
``engine.models.sd3.convert.conversion_plan``), read here for the layers' ``.weight`` rules, so LoRA names and
checkpoint conversion cannot disagree. Three kinds of correspondence:

* rename: one layer, one module;
* concat: a fused layer (qkv, FLUX's single-block ``linear1``) is several diffusers layers, its rows in order;
* swap: the two halves of the output rows are exchanged (BFL/SAI store (shift, scale), diffusers (scale, shift)).
  SD3's ``context_block.adaLN_modulation.1`` is swapped only in the last joint block (``pre_only``: 2·hidden rows
  instead of 6·hidden); a LoRA does not say how deep its model is, so that kind is decided per module by its shape
  (:data:`SWAP_IF_PRE_ONLY`).

Text encoders: kohya's ``lora_te1_`` / ``lora_te2_`` CLIP modules are diffusers' ``text_encoder.`` /
``text_encoder_2.`` + the transformers path. No diffusers pipeline of these families loads a LoRA into T5
(``lora_te3_``): FluxLoraLoaderMixin's kohya path drops them (spec §5.6) and loads only ``text_encoder.`` (FLUX.1's
CLIP-L; Chroma's T5, whose layers its text-encoder loader, which looks for CLIP's layer names, finds no rank for),
and SD3LoraLoaderMixin has no T5 component. Those modules are reported, not written. Pure name logic: no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CONCAT",
    "NAMING_PAIRS",
    "RENAME",
    "SWAP",
    "SWAP_IF_PRE_ONLY",
    "TEXT_COMPONENTS",
    "TRANSFORMER",
    "LayerPair",
    "flux_pairs",
    "kohya_text_pair",
    "peft_text_pair",
    "sd3_pairs",
]

TRANSFORMER = "transformer"  # diffusers' component prefix of the transformer's LoRA keys
UNET_PREFIX = "lora_unet"
RENAME, CONCAT, SWAP = "rename", "concat", "swap"  # engine.models.flux.convert's kinds
SWAP_IF_PRE_ONLY = "swap_if_pre_only"  # SD3 context adaLN: swapped where it has 2 x its input rows (last block)
_TEXT_MODEL = "text_model."  # kohya's CLIP paths keep transformers 4's wrapper (engine.networks.lora_names)

# LoRA prefix -> the diffusers pipeline component that loads it, or None: diffusers loads no LoRA there (T5).
TEXT_COMPONENTS: dict[str, dict[str, str | None]] = {
    "flux1": {"lora_te1": "text_encoder", "lora_te3": None},
    "chroma": {"lora_te3": None},
    "sd3": {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": None},
}
TEXT_COMPONENTS["flux"] = TEXT_COMPONENTS["flux1"]  # FLUX.1 or Chroma, not told apart: FLUX.1's is the superset

_CLIP_LAYER = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn|mlp)_([a-z]+(?:_proj|\d))$")


@dataclass(frozen=True)
class LayerPair:
    """One kohya module and the diffusers module(s) of the same layer.

    Attributes:
        kohya: the kohya module name, e.g. ``lora_unet_double_blocks_0_img_attn_qkv``.
        diffusers: full PEFT module names (component prefix included), in row order for a concat.
        kind: :data:`RENAME`, :data:`CONCAT`, :data:`SWAP` or :data:`SWAP_IF_PRE_ONLY`.
    """

    kohya: str
    diffusers: tuple[str, ...]
    kind: str


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _pairs_of_plan(plan: Iterable[object]) -> list[LayerPair]:
    """The layers (``.weight`` rules) of a model converter's plan; ``Conversion.bfl`` holds the BFL or SAI key."""
    pairs = []
    for rule in plan:
        source: str = rule.bfl  # type: ignore[attr-defined]
        if not source.endswith(".weight"):
            continue
        targets = tuple(f"{TRANSFORMER}.{name.removesuffix('.weight')}" for name in rule.diffusers)  # type: ignore[attr-defined]
        pairs.append(LayerPair(kohya_name(UNET_PREFIX, source.removesuffix(".weight")), targets, rule.kind))  # type: ignore[attr-defined]
    return pairs


def _count(names: Iterable[str], *patterns: str) -> int:
    """One more than the largest index any pattern's group 1 finds in the names (0 when none matches)."""
    regexes = [re.compile(pattern) for pattern in patterns]
    found = [int(match[1]) for name in names for regex in regexes if (match := regex.match(name))]
    return max(found) + 1 if found else 0


def flux_pairs(names: Sequence[str]) -> list[LayerPair]:
    """The FLUX.1 / Chroma transformer's layers, for blocks up to the highest one the names (kohya or PEFT) use."""
    from engine.models.flux.convert import conversion_plan

    double = _count(names, r"^lora_unet_double_blocks_(\d+)_", r"^(?:transformer\.)?transformer_blocks\.(\d+)\.")
    single = _count(names, r"^lora_unet_single_blocks_(\d+)_",
                    r"^(?:transformer\.)?single_transformer_blocks\.(\d+)\.")
    layers = _count(names, r"^lora_unet_distilled_guidance_layer_layers_(\d+)_",
                    r"^(?:transformer\.)?distilled_guidance_layer\.layers\.(\d+)\.")
    keys = [*(f"double_blocks.{i}." for i in range(double)), *(f"single_blocks.{i}." for i in range(single)),
            *(f"distilled_guidance_layer.layers.{i}." for i in range(layers))]
    return _pairs_of_plan(conversion_plan(keys, "bfl"))


def sd3_pairs(names: Sequence[str]) -> list[LayerPair]:
    """The SD3 / SD3.5 MMDiT's layers, for joint blocks up to the highest one the names (kohya or PEFT) use.

    The plan is made for one block more than the names show, so none of the LoRA's blocks is taken for the last
    one; whether a context adaLN is the last block's is told by its shape (:data:`SWAP_IF_PRE_ONLY`).
    """
    from engine.models.sd3.convert import conversion_plan

    seen = _count(names, r"^lora_unet_joint_blocks_(\d+)_", r"^(?:transformer\.)?transformer_blocks\.(\d+)\.")
    pairs = _pairs_of_plan(conversion_plan([], depth=seen + 1))
    return [LayerPair(pair.kohya, pair.diffusers, SWAP_IF_PRE_ONLY)
            if pair.kohya.endswith("_context_block_adaLN_modulation_1") else pair for pair in pairs]


# unet naming (FamilyInfo.unet_naming) -> the transformer's layer pairs for the names in a file
NAMING_PAIRS: dict[str, Callable[[Sequence[str]], list[LayerPair]]] = {
    "bfl": flux_pairs,
    "mmdit": sd3_pairs,
}


# --- text encoders -----------------------------------------------------------------------------------------------


def _clip_path(rest: str) -> str | None:
    """``text_model_encoder_layers_3_self_attn_q_proj`` -> ``text_model.encoder.layers.3.self_attn.q_proj``."""
    match = _CLIP_LAYER.match(rest)
    if match is None:
        return None
    return f"{_TEXT_MODEL}encoder.layers.{match[1]}.{match[2]}.{match[3]}"


def kohya_text_pair(family: str, name: str) -> LayerPair | str | None:
    """The pair of a kohya text-encoder module; the prefix's text when diffusers loads no LoRA into that encoder
    (the module is dropped); None when the name is no text-encoder module of the family this code knows."""
    for prefix, component in TEXT_COMPONENTS.get(family, {}).items():
        if not name.startswith(f"{prefix}_"):
            continue
        if component is None:
            return prefix
        path = _clip_path(name.removeprefix(f"{prefix}_"))
        return LayerPair(name, (f"{component}.{path}",), RENAME) if path else None
    return None


def peft_text_pair(family: str, module: str) -> LayerPair | None:
    """The pair of a diffusers text-encoder module (``text_encoder.text_model.encoder.layers.0.mlp.fc1``; without
    ``text_model.`` as transformers >= 5.6 names CLIPTextModel's layers), or None."""
    component, _, path = module.partition(".")
    for prefix, known in TEXT_COMPONENTS.get(family, {}).items():
        if known is not None and known == component:
            full = path if path.startswith(_TEXT_MODEL) else _TEXT_MODEL + path
            name = kohya_name(prefix, full)
            return LayerPair(name, (module,), RENAME) if _clip_path(name.removeprefix(f"{prefix}_")) else None
    return None
