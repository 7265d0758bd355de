"""FLUX.1 and Chroma keys of sd-scripts' argument TOML (flux_train_network.py / flux_train.py) and of the kohya_ss
GUI's JSON (spec §9.2), shared by both importers.

The family is read first (`family`): sd-scripts' files do not name their script, so FLUX is recognised by its own
keys; the GUI saves `flux1_checkbox`. A FLUX file then maps its keys onto [model], [training] and [flow]; in any
other file those keys are unset at the tool's default or skipped, since the tool did not use them there. Settings
the file carries that FLUX ignores (SD noise options and the like) are skipped last (`drop_inapplicable`), because
Atelier refuses them instead of ignoring them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.config.choices import FLOW_FAMILIES, FLUX_FAMILIES, family_label
from engine.config.importers.common import MISSING, field_specs, literal, put_table, same_value
from engine.config.importers.source import Source
from engine.config.paths import get_path, set_path
from engine.models.families import FAMILY_INFO

# sd-scripts argument -> config path (the same names in the GUI's JSON, LoRA tab).
FLUX_ARG_PATHS: Mapping[str, str] = {
    "clip_l": "model.clip_l",
    "t5xxl": "model.t5xxl",
    "ae": "model.ae",
    "tokenizer_cache_dir": "model.tokenizer_cache_dir",
    "t5xxl_max_token_length": "model.t5xxl_max_token_length",
    "apply_t5_attn_mask": "model.apply_t5_attn_mask",
    "fp8_base": "model.fp8_base",
    "fp8_base_unet": "model.fp8_base_unet",
    "blocks_to_swap": "training.blocks_to_swap",
    "cpu_offload_checkpointing": "training.cpu_offload_checkpointing",
    "timestep_sampling": "flow.timestep_sampling",
    "sigmoid_scale": "flow.sigmoid_scale",
    "discrete_flow_shift": "flow.discrete_flow_shift",
    "model_prediction_type": "flow.model_prediction_type",
    "weighting_scheme": "flow.weighting_scheme",
    "logit_mean": "flow.logit_mean",
    "logit_std": "flow.logit_std",
    "mode_scale": "flow.mode_scale",
    "guidance_scale": "flow.guidance_scale",
}
# The GUI's own names: DreamBooth/Finetune tabs save the text encoders under these, every tab the caches.
KOHYA_FLUX_PATHS: Mapping[str, str] = {
    "flux1_clip_l": "model.clip_l",
    "flux1_t5xxl": "model.t5xxl",
    "flux1_cache_text_encoder_outputs": "training.cache_text_encoder_outputs",
    "flux1_cache_text_encoder_outputs_to_disk": "training.cache_text_encoder_outputs",
}
# The GUI passes these only for SD3, so sd-scripts ran FLUX with its own defaults, which Atelier's match.
KOHYA_SD3_ONLY = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")
# The GUI's defaults of its FLUX fields (class_flux1.py): in a file for another family they were never used.
KOHYA_FLUX_DEFAULTS: Mapping[str, Any] = {
    "ae": "", "clip_l": "", "t5xxl": "", "flux1_clip_l": "", "flux1_t5xxl": "", "model_type": "flux",
    "discrete_flow_shift": 3.0, "model_prediction_type": "sigma_scaled", "timestep_sampling": "sigma",
    "guidance_scale": 3.5, "t5xxl_max_token_length": 512, "apply_t5_attn_mask": False, "split_mode": False,
    "train_blocks": "all", "split_qkv": False, "train_t5xxl": False, "fp8_base": False, "fp8_base_unet": False,
    "cpu_offload_checkpointing": False, "blocks_to_swap": 0, "single_blocks_to_swap": 0,
    "double_blocks_to_swap": 0, "mem_eff_save": False, "t5xxl_lr": 0, "flux1_cache_text_encoder_outputs": False,
    "flux1_cache_text_encoder_outputs_to_disk": False, "train_double_block_indices": "all",
    "train_single_block_indices": "all", "enable_all_linear": False, "train_lora_ggpo": False,
    "sigmoid_scale": 1.0, "weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
    "mode_scale": 1.29, "in_dims": "", "tokenizer_cache_dir": "",
}
# lora_flux's network_args that Atelier's FLUX LoRA takes (spec §5.2); the GUI saves each as its own field.
FLUX_NETWORK_ARGS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                     "single_dim", "single_mod_dim", "in_dims", "train_double_block_indices",
                     "train_single_block_indices", "train_blocks", "split_qkv", "train_t5xxl", "loraplus_lr_ratio",
                     "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
FLUX_NETWORK_MODULES = ("networks.lora_flux",)
# sd-scripts' --split_mode (deprecated) becomes this many swapped blocks when blocks_to_swap is not given (§6.4).
SPLIT_MODE_BLOCKS = 18
# sd-scripts' model_type (FamilyInfo.model_type) -> the FLUX family it trains; a file without one is FLUX.1's
_FAMILY_BY_MODEL_TYPE = {FAMILY_INFO[name].model_type: name for name in FLUX_FAMILIES if FAMILY_INFO[name].model_type}
_FLUX_MODEL_TYPE = FAMILY_INFO["flux1"].model_type
_TEXT_ENCODERS = {"clip_l": "CLIP-L", "t5xxl": "T5-XXL"}  # the FLUX text-encoder fields, as messages name them
_NOT_FLUX = "only FLUX.1 and Chroma use it, and this file is not for FLUX (sd-scripts' FLUX scripts read it)"
_KOHYA_NOT_FLUX = "kohya_ss passes it only for FLUX.1 (flux1_checkbox is off)"


# --- the family --------------------------------------------------------------------------------------------------


def family(source: Source) -> str | None:
    """"flux1" or "chroma" when the file is for FLUX, else None; marks the keys that said so."""
    if source.result.format == "kohya_gui":
        if source.get("flux1_checkbox") is not True:
            return None
        source.used("flux1_checkbox", ["model.model_family"])
    else:
        module = str(source.get("network_module") or "").strip()
        sd3 = source.given("clip_g") or module.endswith("_sd3")
        flux_keys = module in FLUX_NETWORK_MODULES or source.given("ae") or source.given("model_type")
        if sd3 or not flux_keys:
            return None
    model_type = str(source.get("model_type") or _FLUX_MODEL_TYPE).strip().lower()
    if model_type not in _FAMILY_BY_MODEL_TYPE:
        source.skip("model_type", f"expected {' or '.join(_FAMILY_BY_MODEL_TYPE)}")
        model_type = _FLUX_MODEL_TYPE
    elif "model_type" in source.data:
        source.used("model_type", ["model.model_family"])
    return _FAMILY_BY_MODEL_TYPE[model_type]


def is_flux(source: Source) -> bool:
    return get_path(source.result.overlay, "model.model_family") in FLUX_FAMILIES


# --- the FLUX keys -------------------------------------------------------------------------------------------------


def settings(source: Source) -> None:
    """Map the FLUX keys of a FLUX file; account for them (unset or skipped) in any other."""
    kohya = source.result.format == "kohya_gui"
    table = {**FLUX_ARG_PATHS, **(KOHYA_FLUX_PATHS if kohya else {})}
    if not is_flux(source):
        for key in (*table, "model_type", "split_mode", *((*FLUX_NETWORK_ARGS, *_KOHYA_FLUX_ONLY) if kohya else ())):
            _not_for_this_family(source, key, kohya)
        return
    family = str(get_path(source.result.overlay, "model.model_family"))
    _split_mode(source, kohya)
    _frozen_model_only(source)
    _old_block_swap(source)
    for key, path in table.items():
        if key not in source.data or key in source.done:
            continue
        _flux_key(source, key, path, family=family, kohya=kohya)
    if FAMILY_INFO[family].t5_attn_mask_required:
        _t5_mask(source, kohya, family_label(family))
    _remaining_fields(source, kohya)
    _note_memory(source)


def _flux_key(source: Source, key: str, path: str, *, family: str, kohya: bool) -> None:
    """One key of the FLUX argument table, in a FLUX (or Chroma) file."""
    info, label, field = FAMILY_INFO[family], family_label(family), path.removeprefix("model.")
    if field in _TEXT_ENCODERS and field not in info.text_encoder_files:
        source.inert(key, "", f"{label} has no {_TEXT_ENCODERS[field]} text encoder; sd-scripts does not load it "
                     f"for {label}")
    elif kohya and key in KOHYA_SD3_ONLY:
        source.inert(key, KOHYA_FLUX_DEFAULTS[key], "kohya_ss passes it only for SD3; sd-scripts used its "
                     "default for FLUX, as Atelier does")
    elif kohya and key == "guidance_scale" and _is_zero(source.get(key)):
        # The GUI drops a 0 before writing sd-scripts' TOML (it re-adds it only for Chroma); the JSON says 0.
        source.put(key, path, 0.0)
        if info.trained_guidance_scale is None:  # a model trained at one guidance (Chroma: 0) is given it anyway
            source.note("flow.guidance_scale = 0: the file says 0 (kohya_ss itself dropped the 0, so "
                        "sd-scripts trained with its default 3.5)")
    elif source.blank(source.get(key)):
        source.unset(key)
    else:
        source.put(key, path)


def _remaining_fields(source: Source, kohya: bool) -> None:
    """The kohya_ss GUI's network fields and GUI-only fields, or sd-scripts' cache-to-disk flag."""
    if kohya:
        _kohya_network_fields(source)
        for key in _KOHYA_FLUX_ONLY:
            _kohya_flux_extra(source, key)
    elif source.given("cache_text_encoder_outputs_to_disk"):
        source.put("cache_text_encoder_outputs_to_disk", "training.cache_text_encoder_outputs", True)


def _not_for_this_family(source: Source, key: str, kohya: bool) -> None:
    if key not in source.data or key in source.done:
        return
    if key in ("fp8_base", "fp8_base_unet") and source.given(key):
        source.skip(key, "Atelier keeps the base model in fp8 only for FLUX.1 and Chroma (and SD3)")
    elif kohya:
        source.inert(key, KOHYA_FLUX_DEFAULTS.get(key, ""), _KOHYA_NOT_FLUX)
    elif source.given(key):
        source.skip(key, _NOT_FLUX)
    else:
        source.unset(key)


def _is_zero(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and float(value) == 0
    except (TypeError, ValueError):
        return False


def _t5_mask(source: Source, kohya: bool, label: str) -> None:
    """sd-scripts refuses a family trained with T5's mask (Chroma) without it; the GUI switches it on by itself."""
    if source.get("apply_t5_attn_mask") is True:
        return
    set_path(source.result.overlay, "model.apply_t5_attn_mask", True)
    if "apply_t5_attn_mask" in source.data and "apply_t5_attn_mask" not in source.done:
        source.unset("apply_t5_attn_mask")
    who = f"kohya_ss switches it on for {label}" if kohya else f"sd-scripts requires it for {label}"
    source.note(f"model.apply_t5_attn_mask = true: {who}")


def _split_mode(source: Source, kohya: bool) -> None:
    """--split_mode (deprecated) swaps 18 blocks unless blocks_to_swap is given; the GUI also trains single
    blocks only with it (network arg train_blocks=single)."""
    if source.get("split_mode") is not True:
        source.unset("split_mode")
        return
    if _positive(source.get("blocks_to_swap")):
        source.skip("split_mode", "blocks_to_swap is also given, and sd-scripts ignores split_mode then")
    else:
        source.put("split_mode", "training.blocks_to_swap", SPLIT_MODE_BLOCKS)
        source.done.add("blocks_to_swap")
        if "blocks_to_swap" in source.data:
            source.unset("blocks_to_swap")
        source.note(f"split_mode (deprecated in sd-scripts) -> training.blocks_to_swap = {SPLIT_MODE_BLOCKS}, as "
                    "sd-scripts does")
    if kohya:
        put_table(source.result, "network.network_args", {"train_blocks": "single"}, "split_mode")
        source.note("split_mode: kohya_ss trains the single blocks only with it (network_args train_blocks = "
                    "'single')")


_SWAP_ONLY_FOR_LORA = "Atelier swaps blocks only in LoRA training (a frozen model); full training keeps them on the GPU"


def _frozen_model_only(source: Source) -> None:
    """Full training (DreamBooth, fine-tuning) of a FLUX file: fp8 storage and block swapping are for a frozen
    model in Atelier. sd-scripts' full-training script ignores fp8_base; its block swapping is not carried over."""
    if source.result.overlay.get("method", "lora") == "lora":
        return
    for key in ("fp8_base", "fp8_base_unet"):
        source.inert(key, False, "sd-scripts' full fine-tuning ignores it (fp8 storage is for LoRA training)")
    for key in ("blocks_to_swap", "double_blocks_to_swap", "single_blocks_to_swap"):
        if key in source.data and key not in source.done:
            if _positive(source.get(key)):
                source.skip(key, _SWAP_ONLY_FOR_LORA)
            else:
                source.unset(key)


def _old_block_swap(source: Source) -> None:
    """flux_train.py's deprecated double/single counts become blocks_to_swap = double + single // 2; the LoRA
    script ignores them."""
    keys = ("double_blocks_to_swap", "single_blocks_to_swap")
    if all(key in source.done or key not in source.data for key in keys):
        return  # accounted for already (full training: _frozen_model_only)
    double, single = (int(_positive(source.get(key))) for key in keys)
    if source.result.overlay.get("method") == "lora" or not (double or single):
        for key in keys:
            source.inert(key, 0, "sd-scripts' FLUX LoRA script ignores it; use blocks_to_swap")
        return
    if _positive(source.get("blocks_to_swap")):
        for key in keys:
            source.inert(key, 0, "blocks_to_swap is also given, and sd-scripts ignores the old counts then")
        return
    count = double + single // 2
    for key in keys:
        if key in source.data:
            source.used(key, ["training.blocks_to_swap"])
    set_path(source.result.overlay, "training.blocks_to_swap", count)
    source.note(f"double_blocks_to_swap/single_blocks_to_swap (deprecated) -> training.blocks_to_swap = {count}, "
                "as sd-scripts converts them")


def _positive(value: Any) -> float:
    try:
        return max(0.0, float(value or 0))
    except (TypeError, ValueError):
        return 0.0


# --- kohya_ss GUI: network fields and the rest ---------------------------------------------------------------------

# GUI fields with no sd-scripts argument of the same name.
_KOHYA_FLUX_ONLY = ("t5xxl_lr", "enable_all_linear", "train_lora_ggpo")


def _kohya_network_fields(source: Source) -> None:
    """The LoRA tab saves lora_flux's network_args as fields; it passes the non-empty ones (spec §9.2)."""
    lora = source.result.overlay.get("method") == "lora"
    for name in FLUX_NETWORK_ARGS:
        if name not in source.data or name in source.done:
            continue
        value = source.data[name]
        default = KOHYA_FLUX_DEFAULTS.get(name, "")
        if not lora:
            source.inert(name, default, "a LoRA option; this file is for full fine-tuning")
        elif name == "train_blocks":
            source.inert(name, default, "kohya_ss ignores it unless split_mode is on")
        elif source.blank(value) or same_value(value, default):
            source.unset(name)
        else:
            source.mark(name)
            put_table(source.result, "network.network_args", {name: literal(str(value)) if isinstance(value, str)
                                                              else value}, name)


def _kohya_flux_extra(source: Source, key: str) -> None:
    if key not in source.data or key in source.done:
        return
    reasons = {
        "t5xxl_lr": "Atelier trains CLIP-L and T5 at one rate, optimizer.text_encoder_lr",
        "enable_all_linear": "kohya_ss uses it only for LoRA_type Flux1 OFT",
        "train_lora_ggpo": "LoRA-GGPO is not supported by Atelier",
    }
    source.inert(key, KOHYA_FLUX_DEFAULTS[key], reasons[key])


def _note_memory(source: Source) -> None:
    if get_path(source.result.overlay, "model.fp8_base_unet") is True:
        source.note("fp8_base_unet: only the transformer is stored in fp8, the text encoders keep their precision")


# --- network_args of a FLUX LoRA -----------------------------------------------------------------------------------


def network_arg(source: Source, name: str, key: str, value: Any) -> bool:
    """Put one of lora_flux's network_args into network.network_args (True), or leave it to the caller (False)."""
    if not is_flux(source) or name not in FLUX_NETWORK_ARGS:
        return False
    source.mark(key)
    put_table(source.result, "network.network_args", {name: value}, key)
    return True


# --- what FLUX ignores ---------------------------------------------------------------------------------------------


def drop_inapplicable(source: Source) -> None:
    """Values mapped onto settings the declared family does not use are skipped: sd-scripts ignored them there,
    and Atelier refuses them rather than ignore them (so the imported config validates)."""
    name = get_path(source.result.overlay, "model.model_family")
    if name in (None, "auto"):
        return
    specs, mapped = field_specs(), source.result.mapped
    keys_of: dict[str, list[str]] = {}
    for key, paths in mapped.items():
        for path in paths:
            keys_of.setdefault(path, []).append(key)
    for path, keys in keys_of.items():
        spec = specs.get(path)
        value = get_path(source.result.overlay, path, MISSING)
        if spec is None or spec.applies_to(name) or value is MISSING or value == spec.default:
            continue
        set_path(source.result.overlay, path, None)
        # The key whose value it was (not a selector such as noise_offset_type that only chose it).
        owner = next((key for key in keys if key == path.rsplit(".", 1)[-1]), keys[0])
        why = (f"sd-scripts ignores it for {family_label(name)}" if name in FLOW_FAMILIES
               else f"only {', '.join(map(family_label, spec.families))} use it")
        source.skip(owner, f"{why}, and Atelier refuses it there ({path})", source.data.get(owner, value))
        for key in keys:
            mapped[key].remove(path)
            if not mapped[key]:
                del mapped[key]
                if key != owner:
                    source.unset(key)
