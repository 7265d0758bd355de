"""Full fine-tuning of SD3 / SD3.5 (medium, 5-medium, 5-large): the MMDiT learns, CLIP-L and CLIP-G when asked.

As sd-scripts' sd3_train.py (spec §8.7):

* the MMDiT trains when its rate (`optimizer.unet_lr`, or `learning_rate`) is above 0, in one parameter group;
* CLIP-L and CLIP-G train at `optimizer.text_encoder_lr` (empty: `learning_rate`, 0: frozen), the convention of
  every family here and of the config rules; sd-scripts trains them only with --train_text_encoder, which the
  importer maps to text_encoder_lr. T5-XXL stays frozen: no setting of full fine-tuning asks for it (sd-scripts'
  --train_t5xxl);
* text encoders that would learn from cached outputs (which never change) are refused, as the config rules refuse
  them, naming training.cache_text_encoder_outputs;
* fp8 storage is for frozen weights and is refused when the MMDiT trains; `training.blocks_to_swap` (up to
  depth - 2: 22 for SD3/SD3.5 medium, 36 for SD3.5 large) needs `optimizer.fused_backward_pass`, which updates each
  swapped weight in the backward pass while it is on the GPU (:func:`refuse_memory_options`); the trainer places
  the MMDiT with `place_transformer(..., trainable=True)` (engine.models.block_swap).

`saving.save_model_as` picks the format:

* "safetensors": one SAI-layout file, `model.diffusion_model.*` (the MMDiT) and `first_stage_model.*` (the run's
  VAE, LDM names), as ComfyUI's checkpoint loader and our own loader read it, with Stability ModelSpec metadata whose
  architecture is the loaded variant's and without `modelspec.prediction_type` (sd-scripts writes "epsilon" for a
  flow model, appendix A.5). Each trained text encoder goes to a sibling file `<name>_clip_l.safetensors`,
  `<name>_clip_g.safetensors` (`<name>_t5xxl.safetensors` for T5) with its bare Hugging Face keys, as sd-scripts
  writes them and ComfyUI's CLIP loaders read them;
* "diffusers" / "diffusers_safetensors": a StableDiffusion3Pipeline folder (transformer converted by
  engine.models.sd3.convert, VAE, the three text encoders and tokenizers, the flow-match scheduler with the
  variant's shift), safetensors shards in both cases as for FLUX.

Weights are cast to `saving.save_precision` on CPU copies; training continues on the untouched weights.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.files import atomic_output, replace_folder
from engine.models.ldm_checkpoint import cpu_cast
from engine.models.sd3.params import SAI_PREFIX
from engine.train.learning_rates import learning_rates
from engine.train.method_full import FullModelMethod, cpu_copy
from engine.train.method_full_flux import checkpoint_metadata, flow_scheduler
from engine.train.setup import RunInputError

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.loaded_model import LoadedModel

TRANSFORMER_PART = "transformer"
# Per text encoder, in LoadedTextEncoders order (CLIP-L, CLIP-G, T5-XXL): the diffusers pipeline's (tokenizer,
# encoder) names, which also name the part in logs and resume state, and the suffix of its sibling file.
TEXT_PARTS: tuple[tuple[str, str, str], ...] = (("tokenizer", "text_encoder", "clip_l"),
                                                ("tokenizer_2", "text_encoder_2", "clip_g"),
                                                ("tokenizer_3", "text_encoder_3", "t5xxl"))
# modelspec keys the metadata builder writes for SD-style models that mean nothing for SD3's flow model.
_NOT_FOR_SD3 = ("modelspec.prediction_type", "modelspec.encoder_layer")


class SD3FullModelMethod(FullModelMethod):
    """Full-weight training of an SD3 / SD3.5 MMDiT (and CLIP-L / CLIP-G when asked); SAI file or diffusers folder."""

    def __init__(self, config: RunConfig, model: LoadedModel, base_dir: Path):
        self.config = config
        self.name = config.method
        self.model = model
        unet_rate = learning_rates(config, 0).unet
        text_rates = text_encoder_rates(config)
        if unet_rate <= 0 and not any(rate > 0 for rate in text_rates):
            raise RunInputError("SD3 full fine-tuning has nothing to train: optimizer.unet_lr = 0 freezes the MMDiT "
                                "and no text encoder has a rate", "set optimizer.unet_lr above 0 (or leave it empty "
                                "to use learning_rate)", "optimizer.unet_lr")
        if any(rate > 0 for rate in text_rates) and config.training.cache_text_encoder_outputs:
            raise RunInputError("CLIP-L and CLIP-G would learn (optimizer.text_encoder_lr, empty = learning_rate), but "
                                "their outputs are cached and never change", "set optimizer.text_encoder_lr = 0 to "
                                "keep them frozen, or turn training.cache_text_encoder_outputs off",
                                "training.cache_text_encoder_outputs")
        if unet_rate > 0:
            refuse_memory_options(config)
        if config.saving.save_model_as not in SD3_MODEL_WRITERS:  # refused now, not after the training
            raise RunInputError(f"saving.save_model_as = {config.saving.save_model_as!r} cannot hold an SD3 model",
                                f"use one of {', '.join(SD3_MODEL_WRITERS)}", "saving.save_model_as")
        self.trains_unet = unet_rate > 0
        self.trains_text_encoders = [rate > 0 for rate in text_rates]
        self.parts: list[tuple[str, torch.nn.Module, float]] = \
            [(TRANSFORMER_PART, model.unet, unet_rate)] if self.trains_unet else []
        self.parts += [(encoder_name, encoder, rate) for (_, encoder_name, _), encoder, rate
                       in zip(TEXT_PARTS, model.text.encoders, text_rates, strict=True) if rate > 0]
        self.stop_step: int | None = None
        self.global_step = 0

    def components(self) -> dict[str, Any]:
        """The modules a save writes (the free-space check sizes them)."""
        model = self.model
        # A single file holds only the trained encoders (as siblings); a folder holds all three.
        written = self.trained_text_encoders() if self.config.saving.save_model_as == "safetensors" else \
            [name for _, name, _ in TEXT_PARTS]
        parts: dict[str, Any] = {TRANSFORMER_PART: model.unet, "vae": model.vae.vae}
        parts.update((name, encoder) for (_, name, _), encoder in zip(TEXT_PARTS, model.text.encoders, strict=True)
                     if name in written)
        return parts

    def trained_text_encoders(self) -> list[str]:
        """The encoder names (text_encoder, text_encoder_2, ...) this run trains, fixed for the run (a stop part-way
        through still saves them: they differ from the base)."""
        return [name for name, _, _ in self.parts if name != TRANSFORMER_PART]

    def companion_files(self, saved: Path) -> list[Path]:
        """The files a save that returned `saved` wrote beside it (the trained text encoders of a single file), so
        that retention (save_last_n_*) can remove them with it."""
        if self.config.saving.save_model_as != "safetensors":
            return []
        return [text_encoder_file(saved, name) for name in self.trained_text_encoders()]

    def save(self, path_without_suffix: Path, metadata: dict[str, str]) -> Path:
        from engine.networks.network_file import save_dtype

        saving = self.config.saving
        write = SD3_MODEL_WRITERS[saving.save_model_as]  # checked when the method was made
        return write(self.model, path_without_suffix, sd3_checkpoint_metadata(metadata, self.model),
                     save_dtype(saving.save_precision), self.trained_text_encoders())


def text_encoder_rates(config: RunConfig) -> tuple[float, float, float]:
    """(CLIP-L, CLIP-G, T5) learning rates: text_encoder_lr (empty: learning_rate) for both CLIPs; T5 0 (frozen)."""
    clip_l, clip_g = learning_rates(config, 2).text_encoders
    return clip_l, clip_g, 0.0


def refuse_memory_options(config: RunConfig) -> None:
    """What the memory options need when the MMDiT's own weights learn.

    fp8 weights take no gradient (engine.models.flux.fp8; sd-scripts' sd3_train.py ignores --fp8_base). Swapped
    trained blocks are updated on the device inside the backward pass (engine.models.block_swap, trainable),
    so block swapping needs the fused Adafactor pass, as sd-scripts' full fine-tuning uses it.
    """
    model, training = config.model, config.training
    for key in ("fp8_base", "fp8_base_unet"):
        if getattr(model, key, False):
            raise RunInputError(f"model.{key}: fp8 storage is for LoRA training of a frozen model, and SD3 full "
                                "fine-tuning trains the MMDiT's own weights", f"turn model.{key} off, or use method "
                                "'lora'", f"model.{key}")
    if training.blocks_to_swap and not config.optimizer.fused_backward_pass:
        raise RunInputError("training.blocks_to_swap in full fine-tuning keeps trained weights on the CPU between "
                            "uses, so each must be updated in the backward pass while it is on the GPU",
                            "turn on optimizer.fused_backward_pass (optimizer_type Adafactor), or set "
                            "training.blocks_to_swap to 0", "training.blocks_to_swap")


def model_variant(model: LoadedModel) -> str:
    """"medium", "5-medium" or "5-large": the loaded file's variant (engine.models.sd3.loading)."""
    return str(model.scheduler_config.get("variant", ""))


def sd3_checkpoint_metadata(metadata: Mapping[str, str], model: LoadedModel) -> dict[str, str]:
    """FLUX's whole-model metadata rule (no LoRA keys, the variant's architecture), less the SD-only keys."""
    kept = checkpoint_metadata(metadata, model)
    for key in _NOT_FOR_SD3:
        kept.pop(key, None)
    return kept


# --- the SAI single file and the text-encoder siblings -------------------------------------------------------------

def sai_state(model: LoadedModel, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The MMDiT under `model.diffusion_model.` and the VAE under `first_stage_model.` (LDM names), CPU tensors."""
    from engine.models.ldm_keys import vae_to_ldm

    state = {SAI_PREFIX + key: cpu_cast(tensor, dtype).contiguous()
             for key, tensor in model.unet.state_dict().items()}
    vae = {key: cpu_cast(tensor, dtype).contiguous() for key, tensor in model.vae.vae.state_dict().items()}
    state.update(vae_to_ldm(vae))
    return state


def untied_state(module: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A module's state dict as CPU tensors that share no storage (safetensors refuses shared tensors: T5's
    `shared.weight` is tied to `encoder.embed_tokens.weight`, so the second one is cloned)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in module.state_dict().items():
        copy = cpu_cast(tensor, dtype).contiguous()
        pointer = copy.untyped_storage().data_ptr()
        state[key] = copy.clone() if pointer in seen else copy
        seen.add(pointer)
    return state


def text_encoder_file(target: Path, encoder_name: str) -> Path:
    """`<name>_clip_l.safetensors` beside `<name>.safetensors` (sd-scripts' sd3_train naming)."""
    suffix = {name: file_suffix for _, name, file_suffix in TEXT_PARTS}[encoder_name]
    return target.with_name(f"{target.stem}_{suffix}.safetensors")


def save_sai_file(model: LoadedModel, path_without_suffix: Path, metadata: dict[str, str],
                  dtype: torch.dtype | None, trained_text_encoders: list[str]) -> Path:
    """The SAI single file, and each trained text encoder as a sibling file, each written under a temporary name."""
    from safetensors.torch import save_file

    target = path_without_suffix.with_name(path_without_suffix.name + ".safetensors")
    encoders = {name: encoder for (_, name, _), encoder in zip(TEXT_PARTS, model.text.encoders, strict=True)}
    for encoder_name in trained_text_encoders:
        with atomic_output(text_encoder_file(target, encoder_name)) as temporary:
            save_file(untied_state(encoders[encoder_name], dtype), str(temporary), metadata={"format": "pt"})
    with atomic_output(target) as temporary:
        save_file(sai_state(model, dtype), str(temporary), metadata=metadata)
    return target


# --- the diffusers folder ----------------------------------------------------------------------------------------


def diffusers_transformer(model: LoadedModel, dtype: torch.dtype | None) -> torch.nn.Module:
    """A CPU copy of the MMDiT as diffusers' SD3Transformer2DModel, weights in `dtype` (engine.models.sd3.convert)."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from engine.models.sd3.convert import diffusers_config, sai_to_diffusers

    mmdit = model.unet
    state = {key: cpu_cast(tensor, dtype) for key, tensor in mmdit.state_dict().items()}
    converted, unused = sai_to_diffusers(state)
    if unused:  # every SAI weight has a diffusers place; a leftover means the conversion lost part of the model
        raise RunInputError(f"{len(unused)} MMDiT weights have no place in diffusers' SD3Transformer2DModel, e.g. "
                            f"{sorted(unused)[:3]}", "save with saving.save_model_as = 'safetensors'",
                            "saving.save_model_as")
    with init_empty_weights():  # no second allocation: the converted tensors become the weights
        transformer = SD3Transformer2DModel(**diffusers_config(mmdit.params))
    transformer.load_state_dict({key: tensor.contiguous() for key, tensor in converted.items()}, strict=True,
                                assign=True)
    return transformer.eval()


def pipeline_components(model: LoadedModel, dtype: torch.dtype | None) -> dict[str, Any]:
    """StableDiffusion3Pipeline's components as CPU copies in `dtype`."""
    parts: dict[str, Any] = {"transformer": diffusers_transformer(model, dtype),
                             "vae": cpu_copy(model.vae.vae, dtype),
                             "scheduler": flow_scheduler(model.scheduler_config)}
    for (tokenizer_name, encoder_name, _), tokenizer, encoder in zip(
            TEXT_PARTS, model.text.tokenizers, model.text.encoders, strict=True):
        parts[tokenizer_name], parts[encoder_name] = tokenizer, cpu_copy(encoder, dtype)
    return parts


def save_sd3_diffusers_folder(model: LoadedModel, path_without_suffix: Path, metadata: dict[str, str],
                              dtype: torch.dtype | None, trained_text_encoders: list[str]) -> Path:
    """A StableDiffusion3Pipeline folder (every text encoder in it, trained or not), moved into place once complete."""
    from diffusers import StableDiffusion3Pipeline

    parts = pipeline_components(model, dtype)
    target = path_without_suffix
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        StableDiffusion3Pipeline(**parts).save_pretrained(str(temporary), safe_serialization=True)
        replace_folder(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


SD3Writer = Callable[["LoadedModel", Path, dict[str, str], "torch.dtype | None", list[str]], Path]
SD3_MODEL_WRITERS: dict[str, SD3Writer] = {
    "safetensors": save_sai_file,
    "diffusers": save_sd3_diffusers_folder,
    "diffusers_safetensors": save_sd3_diffusers_folder,
}
