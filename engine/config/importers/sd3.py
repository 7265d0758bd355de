"""SD3 / SD3.5 keys of sd-scripts' argument TOML (sd3_train_network.py / sd3_train.py) and of the kohya_ss GUI's
JSON (spec §8, §9.3), shared by both importers.

The family is read first (`family`): sd-scripts' files do not name their script, so SD3 is recognised by its own
keys (clip_g, networks.lora_sd3, training_shift, ...); the GUI saves `sd3_checkbox`. An SD3 file then maps its keys
onto [model], [training] and [flow] before the FLUX handler runs, so the keys both families share (clip_l, t5xxl,
weighting_scheme, blocks_to_swap, ...) are SD3's there; in any other file the SD3-only keys are unset at the tool's
default or skipped, since the tool did not use them there.

kohya_ss saves the text encoders under other names per tab (spec A.27): the LoRA tab as sd3_clip_l / clip_g /
sd3_t5xxl (its clip_l / t5xxl are FLUX's fields), the DreamBooth and Finetuning tabs as clip_l / clip_g / t5xxl. Its
weighting_scheme defaults to logit_normal where sd-scripts' (and Atelier's) is uniform: the value the file states is
kept (trap A.27).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.config.choices import SD3_FAMILIES
from engine.config.importers.common import put_table
from engine.config.importers.source import Source
from engine.config.paths import get_path, set_path
from engine.config.rules_sd3 import unsupported_network_arg

# sd-scripts argument -> config path (sd3_train_network.py / sd3_train.py and the train_network.py options they use).
SD3_ARG_PATHS: Mapping[str, str] = {
    "clip_l": "model.clip_l",
    "clip_g": "model.clip_g",
    "t5xxl": "model.t5xxl",
    "tokenizer_cache_dir": "model.tokenizer_cache_dir",
    "t5xxl_max_token_length": "model.t5xxl_max_token_length",
    "apply_lg_attn_mask": "model.apply_lg_attn_mask",
    "apply_t5_attn_mask": "model.apply_t5_attn_mask",
    "fp8_base": "model.fp8_base",
    "fp8_base_unet": "model.fp8_base_unet",
    "blocks_to_swap": "training.blocks_to_swap",
    "clip_l_dropout_rate": "training.clip_l_dropout_rate",
    "clip_g_dropout_rate": "training.clip_g_dropout_rate",
    "t5_dropout_rate": "training.t5_dropout_rate",
    "weighting_scheme": "flow.weighting_scheme",
    "logit_mean": "flow.logit_mean",
    "logit_std": "flow.logit_std",
    "mode_scale": "flow.mode_scale",
    "training_shift": "flow.training_shift",
    "pos_emb_random_crop_rate": "flow.pos_emb_random_crop_rate",
    "enable_scaled_pos_embed": "flow.enable_scaled_pos_embed",
    "fused_backward_pass": "optimizer.fused_backward_pass",  # sd3_train.py (full fine-tuning)
}
# Keys only SD3's scripts read: one of them given marks an sd-scripts file as SD3 (spec §8).
SD3_ONLY_ARGS = ("clip_g", "apply_lg_attn_mask", "clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate",
                 "training_shift", "pos_emb_random_crop_rate", "enable_scaled_pos_embed", "learning_rate_te3",
                 "train_t5xxl", "use_t5xxl_cache_only", "num_last_block_to_freeze")
SD3_NETWORK_MODULES = ("networks.lora_sd3",)
# lora_sd3's network_args that Atelier's SD3 LoRA takes (spec §8.6).
SD3_NETWORK_ARGS = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim",
                    "emb_dims", "train_block_indices", "split_qkv", "train_t5xxl", "loraplus_lr_ratio",
                    "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
# Declared by sd-scripts' SD3 scripts as "[DOES NOT WORK]" (spec §8.7): accepted there and never used.
_DOES_NOT_WORK = {"save_clip": False, "save_t5xxl": False, "t5xxl_device": "", "t5xxl_dtype": "bf16"}
_DOES_NOT_WORK_REASON = "sd-scripts declares it '[DOES NOT WORK]' for SD3 and never uses it"

# --- kohya_ss GUI (class_sd3.py; spec §9.3) -----------------------------------------------------------------------

# LoRA tab: its own names of the SD3 fields; the GUI passes them only with sd3_checkbox.
_KOHYA_LORA_PATHS: Mapping[str, str] = {
    "sd3_clip_l": "model.clip_l",
    "clip_g": "model.clip_g",
    "sd3_t5xxl": "model.t5xxl",
    "sd3_clip_l_dropout_rate": "training.clip_l_dropout_rate",
    "clip_g_dropout_rate": "training.clip_g_dropout_rate",
    "sd3_t5_dropout_rate": "training.t5_dropout_rate",
    "pos_emb_random_crop_rate": "flow.pos_emb_random_crop_rate",
    "sd3_enable_scaled_pos_embed": "flow.enable_scaled_pos_embed",
}
# DreamBooth / Finetuning tabs: the text encoders under sd-scripts' names; the dropouts and positional-embedding
# options are not passed there.
_KOHYA_FULL_PATHS: Mapping[str, str] = {"clip_l": "model.clip_l", "clip_g": "model.clip_g", "t5xxl": "model.t5xxl"}
# Every tab.
_KOHYA_COMMON_PATHS: Mapping[str, str] = {
    "weighting_scheme": "flow.weighting_scheme",
    "logit_mean": "flow.logit_mean",
    "logit_std": "flow.logit_std",
    "mode_scale": "flow.mode_scale",
    "fp8_base": "model.fp8_base",
    "blocks_to_swap": "training.blocks_to_swap",
    "sd3_cache_text_encoder_outputs": "training.cache_text_encoder_outputs",
    "sd3_cache_text_encoder_outputs_to_disk": "training.cache_text_encoder_outputs",
}
# The GUI's defaults of its SD3 fields (class_sd3.py): a field at its default was never touched.
KOHYA_SD3_DEFAULTS: Mapping[str, Any] = {
    "sd3_checkbox": False, "sd3_clip_l": "", "clip_g": "", "sd3_t5xxl": "", "sd3_clip_l_dropout_rate": 0.0,
    "clip_g_dropout_rate": 0.0, "sd3_t5_dropout_rate": 0.0, "pos_emb_random_crop_rate": 0.0,
    "sd3_enable_scaled_pos_embed": False, "sd3_cache_text_encoder_outputs": False,
    "sd3_cache_text_encoder_outputs_to_disk": False, "sd3_fused_backward_pass": False,
    "sd3_disable_mmap_load_safetensors": False, "sd3_text_encoder_batch_size": 1, **_DOES_NOT_WORK,
}
_KOHYA_WEIGHTING_DEFAULT = "logit_normal"  # class_sd3.py's default; sd-scripts' is uniform (spec A.27)
_NOT_SD3 = "only SD3 uses it, and this file is not for SD3 (sd-scripts' SD3 scripts read it)"
_KOHYA_NOT_SD3 = "kohya_ss passes it only for SD3 (sd3_checkbox is off)"
_KOHYA_FLUX_ONLY = "kohya_ss passes it only for FLUX.1 (flux1_checkbox), so sd-scripts used its SD3 default"
_SWAP_ONLY_FOR_LORA = "Atelier swaps blocks only in LoRA training (a frozen model); full training keeps them on the GPU"
_FP8_ONLY_FOR_LORA = "Atelier keeps the base model in fp8 only for LoRA training (a frozen model)"


# --- the family --------------------------------------------------------------------------------------------------


def family(source: Source) -> str | None:
    """"sd3" when the file is for SD3, else None; marks the key that said so."""
    if source.result.format == "kohya_gui":
        if source.get("sd3_checkbox") is not True:
            return None
        source.used("sd3_checkbox", ["model.model_family"])
        return "sd3"
    module = str(source.get("network_module") or "").strip()
    if module in SD3_NETWORK_MODULES or any(source.given(key) and source.get(key) is not False
                                            for key in SD3_ONLY_ARGS):
        return "sd3"
    return None


def is_sd3(source: Source) -> bool:
    return get_path(source.result.overlay, "model.model_family") in SD3_FAMILIES


# --- the SD3 keys --------------------------------------------------------------------------------------------------


def settings(source: Source) -> None:
    """Map the SD3 keys of an SD3 file; account for the SD3-only ones (unset or skipped) in any other."""
    kohya = source.result.format == "kohya_gui"
    if not is_sd3(source):
        _not_for_this_family(source, kohya)
        return
    full = source.result.overlay.get("method", "lora") != "lora"
    if full:
        _frozen_model_only(source)
    if kohya:
        _kohya_settings(source, full)
    else:
        _sd_scripts_settings(source)


def _not_for_this_family(source: Source, kohya: bool) -> None:
    if kohya:
        for key, default in KOHYA_SD3_DEFAULTS.items():
            source.inert(key, default, _KOHYA_NOT_SD3)
        return
    for key in (*SD3_ONLY_ARGS, *_DOES_NOT_WORK):
        if key in source.data and key not in source.done:
            if source.given(key) and source.get(key) is not False:
                source.skip(key, _NOT_SD3)
            else:
                source.unset(key)


def _map(source: Source, table: Mapping[str, str]) -> None:
    for key, path in table.items():
        if key not in source.data or key in source.done:
            continue
        if source.blank(source.get(key)):
            source.unset(key)
        else:
            source.put(key, path)


def _frozen_model_only(source: Source) -> None:
    """Full training (DreamBooth, fine-tuning): fp8 storage and block swapping are for a frozen model in Atelier."""
    for key in ("fp8_base", "fp8_base_unet"):
        source.inert(key, False, _FP8_ONLY_FOR_LORA)
    if "blocks_to_swap" in source.data and "blocks_to_swap" not in source.done:
        if _positive(source.get("blocks_to_swap")):
            source.skip("blocks_to_swap", _SWAP_ONLY_FOR_LORA)
        else:
            source.unset("blocks_to_swap")


def _sd_scripts_settings(source: Source) -> None:
    source.inert("cpu_offload_checkpointing", False, "sd-scripts does not implement it for SD3 (with "
                 "gradient_checkpointing it fails, otherwise it is ignored); use blocks_to_swap")
    for key, default in _DOES_NOT_WORK.items():
        source.inert(key, default, _DOES_NOT_WORK_REASON)
    _map(source, SD3_ARG_PATHS)
    if source.given("cache_text_encoder_outputs_to_disk"):
        source.put("cache_text_encoder_outputs_to_disk", "training.cache_text_encoder_outputs", True)
    if source.result.overlay.get("method", "lora") != "lora":
        _full_fine_tuning_rates(source)


def _full_fine_tuning_rates(source: Source) -> None:
    """sd3_train.py trains the MMDiT, and CLIP-L and CLIP-G only with --train_text_encoder, at learning_rate_te1 /
    learning_rate_te2 (empty: learning_rate); T5 only with --train_t5xxl (spec §8.7)."""
    trained = _train_text_encoder(source)
    rates = {key: source.get(key) for key in ("learning_rate_te1", "learning_rate_te2") if source.given(key)}
    if not trained:
        _text_encoders_frozen(source, rates)
    else:
        _text_encoder_rate(source, rates)
    for key in ("learning_rate_te1", "learning_rate_te2"):
        if key in source.data and key not in source.done:
            source.unset(key)
    _t5_and_freezing(source)


def _train_text_encoder(source: Source) -> bool:
    """train_text_encoder: whether sd3_train.py trains CLIP-L and CLIP-G."""
    trained = source.get("train_text_encoder") is True
    if trained:
        source.used("train_text_encoder", ["optimizer.text_encoder_lr"])
    elif "train_text_encoder" in source.data:
        source.unset("train_text_encoder")
    return trained


def _text_encoders_frozen(source: Source, rates: dict[str, Any]) -> None:
    """Without train_text_encoder, sd3_train.py trains neither CLIP, whatever their rates say."""
    set_path(source.result.overlay, "optimizer.text_encoder_lr", 0.0)
    source.note("optimizer.text_encoder_lr = 0: sd3_train.py trains the text encoders only with "
                "train_text_encoder, which the file does not set")
    for key in rates:
        source.skip(key, "train_text_encoder is off, so sd3_train.py does not train the text encoders")


def _text_encoder_rate(source: Source, rates: dict[str, Any]) -> None:
    """Atelier trains both CLIPs at one rate: learning_rate_te1's; learning_rate_te2 only if it is the same."""
    if "learning_rate_te1" in rates:
        source.put("learning_rate_te1", "optimizer.text_encoder_lr")
        if "learning_rate_te2" in rates and rates["learning_rate_te2"] != rates["learning_rate_te1"]:
            source.skip("learning_rate_te2", "CLIP-G's own rate: Atelier trains SD3's text encoders at one rate, "
                        "optimizer.text_encoder_lr")
        elif "learning_rate_te2" in rates:
            source.used("learning_rate_te2", ["optimizer.text_encoder_lr"])
    elif "learning_rate_te2" in rates:
        source.skip("learning_rate_te2", "CLIP-G's own rate: Atelier trains SD3's text encoders at one rate, "
                    "optimizer.text_encoder_lr (learning_rate_te1 is empty, so CLIP-L trains at learning_rate)")


def _t5_and_freezing(source: Source) -> None:
    """sd3_train.py's T5 training and parameter freezing are not carried over."""
    for key in ("train_t5xxl", "learning_rate_te3", "use_t5xxl_cache_only", "num_last_block_to_freeze"):
        if key in source.data and key not in source.done:
            if source.given(key) and source.get(key) is not False:
                source.skip(key, "Atelier's SD3 fine-tuning does not train T5 or freeze single parameters; this "
                            "option of sd3_train.py is not carried over")
            else:
                source.unset(key)


def _kohya_settings(source: Source, full: bool) -> None:
    for key in ("fp8_base_unet", "cpu_offload_checkpointing", "apply_t5_attn_mask"):
        source.inert(key, False, _KOHYA_FLUX_ONLY)
    source.inert("t5xxl_max_token_length", 512, _KOHYA_FLUX_ONLY)
    for key, default in _DOES_NOT_WORK.items():
        source.inert(key, default, _DOES_NOT_WORK_REASON)
    source.inert("sd3_disable_mmap_load_safetensors", False, "an sd-scripts loading option; Atelier reads "
                 "safetensors its own way")
    source.inert("sd3_text_encoder_batch_size", 1, "sd-scripts' batch size for caching captions; Atelier encodes "
                 "them a dataset batch at a time")
    if full:
        _map(source, _KOHYA_FULL_PATHS)
        for key in ("sd3_clip_l", "sd3_t5xxl", "sd3_clip_l_dropout_rate", "clip_g_dropout_rate", "sd3_t5_dropout_rate",
                    "pos_emb_random_crop_rate", "sd3_enable_scaled_pos_embed", "sd3_fused_backward_pass"):
            source.inert(key, KOHYA_SD3_DEFAULTS[key], "kohya_ss's DreamBooth and Finetuning tabs do not pass it")
        if source.given("fused_backward_pass"):
            source.put("fused_backward_pass", "optimizer.fused_backward_pass")
    else:
        _map(source, _KOHYA_LORA_PATHS)
        source.inert("sd3_fused_backward_pass", False, "sd-scripts' SD3 LoRA script has no fused backward pass "
                     "(an option of sd3_train.py)")
        _kohya_t5xxl_lr(source)
    _map(source, _KOHYA_COMMON_PATHS)
    if "weighting_scheme" not in source.data:
        set_path(source.result.overlay, "flow.weighting_scheme", _KOHYA_WEIGHTING_DEFAULT)
        source.note(f"flow.weighting_scheme = '{_KOHYA_WEIGHTING_DEFAULT}': the file leaves it out, and kohya_ss "
                    "uses its own default for SD3 then (sd-scripts' and Atelier's is 'uniform')")
    elif get_path(source.result.overlay, "flow.weighting_scheme") == _KOHYA_WEIGHTING_DEFAULT:
        source.note("flow.weighting_scheme = 'logit_normal' as the file says (kohya_ss's default for SD3; "
                    "sd-scripts' and Atelier's default is 'uniform')")


def _kohya_t5xxl_lr(source: Source) -> None:
    """The LoRA tab passes text_encoder_lr as [text_encoder_lr, t5xxl_lr]; sd-scripts' SD3 gives the second value
    to CLIP-G and T5 (spec §8.6)."""
    if "t5xxl_lr" not in source.data:
        return
    value, first = _positive(source.get("t5xxl_lr")), _positive(source.get("text_encoder_lr"))
    if not value or value == first:
        source.unset("t5xxl_lr")
    else:
        source.skip("t5xxl_lr", "kohya_ss passes it as the second text_encoder_lr, which sd-scripts' SD3 gives to "
                    "CLIP-G and T5; Atelier trains SD3's text encoders at one rate, optimizer.text_encoder_lr")


def _positive(value: Any) -> float:
    try:
        return max(0.0, float(value or 0))
    except (TypeError, ValueError):
        return 0.0


# --- network_args of an SD3 LoRA -----------------------------------------------------------------------------------


def network_arg(source: Source, name: str, key: str, value: Any) -> bool:
    """Put one of lora_sd3's network_args into network.network_args, or list one SD3's LoRA cannot take with why
    (True); leave any other to the caller (False)."""
    if not is_sd3(source):
        return False
    why = unsupported_network_arg(name)
    if why is not None:
        source.skip(key, why, value)
        return True
    if name not in SD3_NETWORK_ARGS:
        return False
    source.mark(key)
    put_table(source.result, "network.network_args", {name: value}, key)
    return True
