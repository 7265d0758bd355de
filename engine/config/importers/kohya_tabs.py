"""What differs between the kohya_ss GUI's training tabs: which tab saved a JSON, and each tab's own fields.

The JSON does not name its tab, so the tab's characteristic fields decide the method. Learning rates for the text
encoder mean different things per tab (kohya_ss-gui.md §2; the tabs' train_model functions).
"""

from __future__ import annotations

from collections.abc import Callable

from engine.config.importers import flux, sd3
from engine.config.importers.handlers import finetune_dataset
from engine.config.importers.kohya_network import lora_type
from engine.config.importers.source import Source
from engine.config.paths import set_path

# (field that only this tab saves, method, tab name), checked in this order.
_TABS = (
    ("LoRA_type", "lora", "LoRA"),
    ("token_string", "textual_inversion", "Textual Inversion"),
    ("image_folder", "finetune", "Finetuning"),
)
_CAPTION_DROPOUT = ("caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate")
# Finetuning tab: preparation steps the GUI runs before training, with their GUI defaults.
_PREPARATION = {"create_caption": True, "create_buckets": True, "full_path": True, "batch_size": 1,
                "use_latent_files": "Yes", "caption_metadata_filename": "meta_cap.json",
                "latent_metadata_filename": "meta_lat.json"}


def method(source: Source) -> None:
    """lora / textual_inversion / finetune from the tab's own field; DreamBooth's tab has none of them."""
    found = next(((key, name, tab) for key, name, tab in _TABS if key in source.data), None)
    key, name, tab = found or ("", "dreambooth", "Dreambooth")
    why = f"it has {key} ({tab} tab)" if key else "it has no LoRA_type, token_string or image_folder (Dreambooth tab)"
    set_path(source.result.overlay, "method", name)
    source.note(f"method = {name!r}: {why}")


def is_method(source: Source, name: str) -> bool:
    return bool(source.result.overlay["method"] == name)


def rate(source: Source, key: str) -> float:
    try:
        return float(source.get(key) or 0)
    except (TypeError, ValueError):
        return 0.0


def tab_specific(source: Source) -> None:
    if source.given("learning_rate"):
        source.put("learning_rate", "optimizer.learning_rate")
    _BY_METHOD[source.result.overlay["method"]](source)


def _lora(source: Source) -> None:
    """0 is not passed on, so that part uses learning_rate; but a 0 beside a non-zero rate freezes that part."""
    lora_type(source)
    source.inert("stop_text_encoder_training", 0, "kohya_ss's LoRA tab ignores it")
    unet, text = rate(source, "unet_lr"), rate(source, "text_encoder_lr")
    for key, path, value, other in (("unet_lr", "optimizer.unet_lr", unet, text),
                                    ("text_encoder_lr", "optimizer.text_encoder_lr", text, unet)):
        if value:
            source.put(key, path)
        elif other and key in source.data:
            only = "network.train_unet_only" if key == "text_encoder_lr" else "network.train_text_encoder_only"
            source.put(key, only, True)
            source.note(f"{key} is 0 while the other rate is not: kohya_ss then trains only that part, so {only} = "
                        "true")
        elif key in source.data:
            source.unset(key)


def _dreambooth(source: Source) -> None:
    if flux.is_flux(source):
        _flux_full_fine_tuning(source)
        return
    if sd3.is_sd3(source):
        _sd3_full_fine_tuning(source, trained=False)
        return
    sdxl = _text_encoder_rates(source, trained=True)
    if not sdxl and not source.is_set("optimizer.text_encoder_lr") and source.given("learning_rate"):
        # train_db.py trains the text encoder at learning_rate when no separate rate is given; ours needs one.
        source.put("learning_rate", "optimizer.text_encoder_lr")
        source.note("optimizer.text_encoder_lr = learning_rate: sd-scripts' DreamBooth trains the text encoder at "
                    "learning_rate when learning_rate_te is not given")
    _stop_text_encoder_percent(source)


def _stop_text_encoder_percent(source: Source) -> None:
    """kohya_ss's DreamBooth tab gives a percentage of the run; ours takes a fraction below 1 (0 = never stop)."""
    if not source.given("stop_text_encoder_training"):
        return
    percent = rate(source, "stop_text_encoder_training")
    fraction = percent / 100 if 0 < percent < 100 else 0
    source.put("stop_text_encoder_training", "training.stop_text_encoder_training", fraction)
    source.note(f"stop_text_encoder_training {percent:g}% of the run -> training.stop_text_encoder_training = "
                f"{fraction:g}")


def _flux_full_fine_tuning(source: Source) -> None:
    """flux_train.py trains the transformer only: the text-encoder rates of the tab do not reach it (spec §6.1)."""
    for key in ("learning_rate_te", "learning_rate_te1", "learning_rate_te2", "train_text_encoder",
                "stop_text_encoder_training"):
        if source.given(key) and source.get(key) is not False:
            source.skip(key, "sd-scripts' FLUX fine-tuning trains only the transformer")
        else:
            source.unset(key)


def _sd3_full_fine_tuning(source: Source, trained: bool) -> None:
    """sd3_train.py trains CLIP-L and CLIP-G only with train_text_encoder, at learning_rate when learning_rate_te1/te2
    are not given (spec §8.7). The GUI passes train_text_encoder for SD3 only from the Finetuning tab, and never its
    text-encoder rates (learning_rate_te is not an option of sd3_train.py; te1/te2 go to SDXL only)."""
    if trained:
        source.used("train_text_encoder", ["optimizer.text_encoder_lr"])
        if source.given("learning_rate"):
            source.put("learning_rate", "optimizer.text_encoder_lr")
        source.note("optimizer.text_encoder_lr = learning_rate: train_text_encoder is on, and sd3_train.py trains "
                    "CLIP-L and CLIP-G at learning_rate (kohya_ss passes no separate rate for SD3)")
    else:
        if "train_text_encoder" in source.data:
            source.inert("train_text_encoder", False, "kohya_ss's DreamBooth tab passes it only for SDXL")
        set_path(source.result.overlay, "optimizer.text_encoder_lr", 0.0)
        source.note("optimizer.text_encoder_lr = 0: sd3_train.py trains only the MMDiT without train_text_encoder")
    why = "kohya_ss does not pass it for SD3 (sd3_train.py has no learning_rate_te; te1/te2 are passed for SDXL only)"
    for key in ("learning_rate_te", "learning_rate_te1", "learning_rate_te2"):
        if source.given(key) and key not in source.done:
            source.skip(key, why)
        elif key in source.data:
            source.unset(key)
    source.inert("stop_text_encoder_training", 0, "sd3_train.py has no such option")


def _finetune(source: Source) -> None:
    """image_folder holds the images; the metadata the GUI prepares lands in train_dir."""
    _finetune_text_encoders(source)
    _finetune_folders(source)
    _finetune_preparation(source)


def _finetune_text_encoders(source: Source) -> None:
    """The family's full fine-tuning rates (FLUX, SD3), or SD1/SD2/SDXL's text encoder rates."""
    if flux.is_flux(source):
        _flux_full_fine_tuning(source)
    elif sd3.is_sd3(source):
        _sd3_full_fine_tuning(source, trained=source.get("train_text_encoder") is True)
    else:
        trained = source.get("train_text_encoder") is True
        if trained:
            source.used("train_text_encoder", ["optimizer.text_encoder_lr"])
        else:
            source.unset("train_text_encoder")
        _text_encoder_rates(source, trained)


def _finetune_folders(source: Source) -> None:
    """dataset_config wins over the folders; otherwise the metadata in train_dir, or the images of image_folder."""
    if source.given("dataset_config"):
        for key in ("image_folder", "train_dir"):
            if source.given(key):
                source.skip(key, "dataset_config is set, and sd-scripts ignores the folders then")
    elif source.given("train_dir"):
        _metadata_dataset(source)
    elif source.given("image_folder"):
        source.put("image_folder", "dataset.train_data_dir")
    for key in ("image_folder", "train_dir"):
        if key not in source.done:
            source.unset(key)


def _finetune_preparation(source: Source) -> None:
    """The fields of the metadata preparation kohya_ss runs before training; Atelier reads its result."""
    for key, default in _PREPARATION.items():
        if key not in source.done:
            source.inert(key, default, "only used by the metadata preparation kohya_ss runs before training")
    for key in ("create_caption", "create_buckets"):
        if source.get(key) is True:
            source.note(f"{key} was on: kohya_ss prepared the metadata before training; run that preparation once "
                        "yourself (Atelier reads the finished metadata file)")


def _metadata_dataset(source: Source) -> None:
    """The GUI points sd-scripts' in_json at the metadata it prepares in train_dir."""
    latent = source.get("use_latent_files", "Yes") == "Yes"
    name_key = "latent_metadata_filename" if latent else "caption_metadata_filename"
    name = source.get(name_key) or _PREPARATION[name_key]
    metadata = f"{str(source.get('train_dir')).rstrip('/')}/{name}"
    images = ("image_folder", source.get("image_folder")) if source.given("image_folder") else None
    finetune_dataset(source, ("train_dir", metadata), images)
    source.used(name_key, ["dataset.datasets"])
    source.used("use_latent_files", ["dataset.datasets"])


def _text_encoder_rates(source: Source, trained: bool) -> bool:
    """learning_rate_te (SD1/SD2) or learning_rate_te1/te2 (SDXL); kohya_ss passes only the family's ones."""
    sdxl = source.get("sdxl") is True or source.get("sdxl_checkbox") is True
    rates = {"learning_rate_te": (not sdxl, "optimizer.text_encoder_lr", "not used for SDXL"),
             "learning_rate_te1": (sdxl, "optimizer.text_encoder_lr", "used only for SDXL"),
             "learning_rate_te2": (sdxl, "optimizer.text_encoder2_lr", "used only for SDXL")}
    for key, (used, path, why) in rates.items():
        if not source.given(key):
            source.unset(key)
        elif used and trained:
            source.put(key, path)
        else:
            source.skip(key, f"kohya_ss does not pass it here: {why if trained else 'train_text_encoder is off'}")
    return sdxl


def _textual_inversion(source: Source) -> None:
    for key in _CAPTION_DROPOUT:
        if source.given(key):
            source.skip(key, "sd-scripts' Textual Inversion does not support caption dropout")


_BY_METHOD: dict[str, Callable[[Source], None]] = {
    "lora": _lora,
    "dreambooth": _dreambooth,
    "finetune": _finetune,
    "textual_inversion": _textual_inversion,
}
