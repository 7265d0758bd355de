"""DreamBooth and fine-tuning: the whole UNet and text encoders learn, and each save is a complete model.

As sd-scripts' train_db.py, fine_tune.py and sdxl_train.py: every weight of the UNet (when its learning rate is above
0) and of each text encoder whose rate is above 0 is trained, embeddings included. The text encoders can stop
learning part-way (`training.stop_text_encoder_training`, a step count or a fraction of the run); from then on
they get no gradients, so the optimizer leaves them as they are. DreamBooth and fine-tuning differ only in their
data (folders with class tokens and regularization images, or metadata files), which the scan already tells apart.

A save writes the UNet, the text encoders and the VAE the run used (a separate `model.vae` included) either as one
file in the original LDM key layout, which A1111, ComfyUI and diffusers' `from_single_file` load, with the
diffusers configs embedded so that `load_model` needs no guess; or as a diffusers folder. Weights are cast to
`saving.save_precision` on copies: training continues on the untouched float32 weights.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.files import atomic_output, replace_folder
from engine.models.families import family_info
from engine.models.ldm_checkpoint import cpu_cast
from engine.models.text_encoders import TEXT_COMPONENTS
from engine.train.learning_rates import full_trains_text_encoders, learning_rates
from engine.train.setup import RunInputError

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.loaded_model import LoadedModel

# ss_* keys that describe a LoRA network; a full checkpoint has none (sd-scripts writes none into one).
NETWORK_KEY_PREFIX = "ss_network_"


def text_encoder_stop_step(value: int | float, total_steps: int) -> int | None:
    """The optimizer step after which the text encoders stop learning; None = they learn to the end.

    An integer is a step count, as sd-scripts' --stop_text_encoder_training (the encoders take part in exactly that
    many updates); a float below 1 is a fraction of the run, rounded up as kohya_ss rounds its percentage.
    """
    if not value:
        return None
    return math.ceil(total_steps * value) if isinstance(value, float) else int(value)


class FullModelMethod:
    """Full-weight training of the UNet and text encoders (sd-scripts' DreamBooth and fine-tuning)."""

    metadata_kind = ""  # modelspec describes a whole checkpoint, not a LoRA

    def __init__(self, config: RunConfig, model: LoadedModel, base_dir: Path):
        self.config = config
        self.name = config.method
        self.model = model
        rates = learning_rates(config, len(model.text.encoders))
        self.trains_unet = rates.unet > 0
        self.trains_text_encoders = full_trains_text_encoders(config, len(model.text.encoders))
        names = [encoder for _, encoder in TEXT_COMPONENTS[model.family]]
        # The trained parts as (component name, module, learning rate); fixed for the run, even after the stop.
        self.parts: list[tuple[str, torch.nn.Module, float]] = [("unet", model.unet, rates.unet)] \
            if self.trains_unet else []
        self.parts += [(name, encoder, rate) for name, encoder, rate, trains
                       in zip(names, model.text.encoders, rates.text_encoders, self.trains_text_encoders, strict=True)
                       if trains]
        self.stop_step: int | None = None
        self.global_step = 0

    # --- what learns -------------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        return [{"params": list(module.parameters()), "lr": rate, "name": name} for name, module, rate in self.parts]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for module in self.trainable_modules() for parameter in module.parameters()
                if parameter.requires_grad]

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [module for _, module, _ in self.parts]

    def before_training(self, global_step: int, total_steps: int) -> None:
        """Where the run starts (0, or the resumed step) and how long it is: fixes the text encoders' stop step."""
        self.stop_step = text_encoder_stop_step(self.config.training.stop_text_encoder_training, total_steps)
        self.global_step = global_step
        self._stop_text_encoders_if_due()

    def after_update(self) -> None:
        self.global_step += 1
        self._stop_text_encoders_if_due()

    def _stop_text_encoders_if_due(self) -> None:
        if self.stop_step is None or self.global_step < self.stop_step or not any(self.trains_text_encoders):
            return
        for encoder in self.model.text.encoders:
            encoder.requires_grad_(False)
        self.trains_text_encoders = [False] * len(self.trains_text_encoders)

    # --- resumable state ---------------------------------------------------------------------------------------

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": tensor for name, module, _ in self.parts
                for key, tensor in module.state_dict().items()}

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, module, _ in self.parts:
            prefix = f"{name}."
            own = {key.removeprefix(prefix): tensor for key, tensor in tensors.items() if key.startswith(prefix)}
            try:
                module.load_state_dict(own)
            except RuntimeError as error:
                raise RunInputError(f"the saved state does not fit this run's {name} ({str(error)[:200]})",
                                    "resume with the same base model, method and learning rates that are above 0",
                                    "saving.resume") from error

    # --- saving ------------------------------------------------------------------------------------------------

    def components(self) -> dict[str, Any]:
        """The pipeline's parts as diffusers names them: modules, tokenizers, and the scheduler the model predicts
        with (v-prediction when the run trains it)."""
        model = self.model
        parts: dict[str, Any] = {"unet": model.unet, "vae": model.vae.vae,
                                 "scheduler": scheduler_for(model.scheduler_config,
                                                            self.config.model.v_parameterization)}
        for (tokenizer_name, encoder_name), tokenizer, encoder in zip(
                TEXT_COMPONENTS[model.family], model.text.tokenizers, model.text.encoders, strict=True):
            parts[tokenizer_name], parts[encoder_name] = tokenizer, encoder
        return parts

    def save(self, path_without_suffix: Path, metadata: dict[str, str]) -> Path:
        from engine.networks.network_file import save_dtype

        saving = self.config.saving
        kept = {key: value for key, value in metadata.items() if not key.startswith(NETWORK_KEY_PREFIX)}
        write = MODEL_WRITERS[saving.save_model_as]
        return write(self.components(), self.model.family, path_without_suffix, kept, save_dtype(saving.save_precision))

    def describe(self) -> str:
        counts = [f"{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters"
                  for name, module, _ in self.parts]
        stop = self.config.training.stop_text_encoder_training
        until = f"; text encoders stop after {stop:g} {'of the run' if isinstance(stop, float) else 'steps'}" \
            if stop and any(self.trains_text_encoders) else ""
        return ", ".join(counts) + until


# The full-training method per FamilyInfo.loader, as (module, class): the FLUX and SD3 modules import this one, so
# each is imported only when its family is trained.
FULL_MODEL_METHODS: dict[str, tuple[str, str]] = {
    "ldm": ("engine.train.method_full", "FullModelMethod"),
    "flux": ("engine.train.method_full_flux", "FluxFullModelMethod"),
    "sd3": ("engine.train.method_full_sd3", "SD3FullModelMethod"),
}


def full_model_method(config: RunConfig, model: LoadedModel, base_dir: Path) -> FullModelMethod:
    """DreamBooth / fine-tuning for the loaded model: the method of its family's loader (never its name)."""
    import importlib

    module, name = FULL_MODEL_METHODS[family_info(model.family).loader]
    return getattr(importlib.import_module(module), name)(config, model, base_dir)


def scheduler_for(config: Mapping[str, Any], v_prediction: bool) -> Any:
    """The model's noise scheduler, with the prediction type the run trained (a single file's config says epsilon)."""
    import diffusers

    settings = {**config, "prediction_type": "v_prediction" if v_prediction else "epsilon"}
    # The class name comes from the model's scheduler_config.json: only a diffusers scheduler class is built from it.
    scheduler_class = getattr(diffusers, str(settings.get("_class_name")), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise RunInputError(f"the model's scheduler_config.json names {settings.get('_class_name')!r}, which is not "
                            "a diffusers scheduler class", "use a model folder with an intact scheduler config",
                            "model.pretrained_model_name_or_path")
    return scheduler_class.from_config(settings)


# --- writers -------------------------------------------------------------------------------------------------------


def save_single_file(components: dict[str, Any], family: str, path_without_suffix: Path, metadata: dict[str, str],
                     dtype: torch.dtype | None, *, suffix: str) -> Path:
    """One LDM-layout file (.safetensors with metadata and the embedded configs, or a .ckpt as sd-scripts writes it),
    written under a temporary name and renamed."""
    from engine.models.ldm_checkpoint import ldm_state, write_pipeline_checkpoint

    target = path_without_suffix.with_name(path_without_suffix.name + suffix)
    if suffix == ".safetensors":
        return write_pipeline_checkpoint(components, family, target, metadata, dtype=dtype)
    with atomic_output(target) as temporary:  # sd-scripts' ckpt: the state dict plus the progress, no metadata
        torch.save({"state_dict": ldm_state(components, family, dtype), "epoch": int(metadata.get("ss_epoch", 0)),
                    "global_step": int(metadata.get("ss_steps", 0))}, temporary)
    return target


def cpu_copy(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """The module rebuilt on the CPU with its weights in `dtype`, without a second copy on the training device."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: nothing is allocated until the weights are assigned
        builder = getattr(type(module), "from_config", None) or type(module)._from_config
        copy = builder(module.config)
    copy.load_state_dict({key: cpu_cast(tensor, dtype) for key, tensor in module.state_dict().items()}, assign=True)
    return copy.eval()


# Pipeline options that keep optional parts out of a saved folder (no safety checker, no watermarker).
_PIPELINE_OPTIONS: dict[str, dict[str, Any]] = {
    "StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    "StableDiffusionXLPipeline": {"add_watermarker": False},
}


def save_diffusers_folder(components: dict[str, Any], family: str, path_without_suffix: Path,
                          metadata: dict[str, str], dtype: torch.dtype | None, *, safetensors: bool) -> Path:
    """A diffusers pipeline folder, written beside the target and moved into place once complete.

    diffusers folders carry no metadata. transformers 5 writes text encoders as safetensors whatever is asked, so
    the "diffusers" format has .bin files for the UNet and VAE only.
    """
    import diffusers

    name = family_info(family).diffusers_pipeline
    pipeline_class, options = getattr(diffusers, name), _PIPELINE_OPTIONS.get(name, {})
    copies = {name: cpu_copy(part, dtype) if isinstance(part, torch.nn.Module) else part
              for name, part in components.items()}
    target = path_without_suffix
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        pipeline_class(**copies, **options).save_pretrained(str(temporary), safe_serialization=safetensors)
        replace_folder(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


ModelWriter = Callable[[dict[str, Any], str, Path, dict[str, str], "torch.dtype | None"], Path]
MODEL_WRITERS: dict[str, ModelWriter] = {
    "safetensors": lambda *args: save_single_file(*args, suffix=".safetensors"),
    "ckpt": lambda *args: save_single_file(*args, suffix=".ckpt"),
    "diffusers": lambda *args: save_diffusers_folder(*args, safetensors=False),
    "diffusers_safetensors": lambda *args: save_diffusers_folder(*args, safetensors=True),
}
