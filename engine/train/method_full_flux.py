"""Full fine-tuning of FLUX.1 (dev, schnell) and Chroma: the transformer learns, the text encoders and AE do not.

As sd-scripts' flux_train.py (spec §6.1): every transformer weight trains, in one parameter group at
`optimizer.unet_lr` (or `learning_rate`); CLIP-L, T5 and the AE stay frozen. The config rules refuse text-encoder
learning rates for these families; the method refuses them again for a config that skipped validation.
sd-scripts' script has no Chroma; nothing here depends on the vector input or guidance layers Chroma lacks, so
Chroma fine-tunes the same way (its diffusers folder is a ChromaPipeline).

`saving.save_model_as` picks the format, unlike sd-scripts, which always writes a BFL file (appendix A.15):

* "safetensors": a BFL single file, the bare transformer state dict (no prefix), as ComfyUI loads a diffusion
  model, with ModelSpec metadata whose architecture comes from the loaded file's variant (flux-1-dev,
  flux-1-schnell, chroma), not always "dev" as sd-scripts writes;
* "diffusers" / "diffusers_safetensors": a pipeline folder (FluxPipeline or ChromaPipeline) holding the transformer
  converted by diffusers' own BFL converter, the frozen AE, text encoders and tokenizers of the run, and the
  scheduler config, so `FluxPipeline.from_pretrained` loads it offline. Both names write .safetensors (unlike SD's
  "diffusers", which writes .bin): FLUX loaders, ours and sd-scripts', read only safetensors shards, and a 24 GB
  pickle is no format to hand around. Folders carry no metadata.

Weights are cast to `saving.save_precision` on CPU copies; training continues on the untouched weights.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.files import atomic_output, replace_folder
from engine.models.families import family_info
from engine.models.ldm_checkpoint import cpu_cast
from engine.train.learning_rates import learning_rates
from engine.train.method_full import NETWORK_KEY_PREFIX, FullModelMethod, cpu_copy
from engine.train.setup import RunInputError

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.flux.params import FluxParams
    from engine.models.flux.transformer import Flux
    from engine.models.loaded_model import LoadedModel

# The name of the transformer's part: its parameter group (lr/transformer in logs) and its keys in a saved state.
TRANSFORMER_PART = "transformer"


class FluxFullModelMethod(FullModelMethod):
    """Full-weight training of a FLUX.1 / Chroma transformer; saving as a BFL file or a diffusers folder."""

    def __init__(self, config: RunConfig, model: LoadedModel, base_dir: Path):
        refuse_text_encoder_training(config)
        self.config = config
        self.name = config.method
        self.model = model
        rate = learning_rates(config, 0).unet
        if rate <= 0:
            raise RunInputError("FLUX.1/Chroma full fine-tuning trains only the transformer, and optimizer.unet_lr "
                                "= 0 freezes it, so nothing would learn", "set optimizer.unet_lr above 0 or leave "
                                "it empty (learning_rate is used)", "optimizer.unet_lr")
        if config.saving.save_model_as not in FLUX_MODEL_WRITERS:  # refused now, not after the training
            raise RunInputError(f"saving.save_model_as = {config.saving.save_model_as!r} cannot hold a FLUX.1/Chroma "
                                "model", f"use one of {', '.join(FLUX_MODEL_WRITERS)}", "saving.save_model_as")
        self.trains_unet = True
        self.trains_text_encoders = [False] * len(model.text.encoders)
        self.parts: list[tuple[str, torch.nn.Module, float]] = [(TRANSFORMER_PART, model.unet, rate)]
        self.stop_step: int | None = None
        self.global_step = 0

    def components(self) -> dict[str, Any]:
        """The modules a save writes (the free-space check sizes them): the transformer, and for a diffusers
        folder also the frozen AE and text encoders."""
        model = self.model
        parts: dict[str, Any] = {TRANSFORMER_PART: model.unet}
        if self.config.saving.save_model_as != "safetensors":
            layout = FOLDER_LAYOUTS[model.unet.params.chroma]
            parts["vae"] = model.vae.vae
            parts.update((encoder_name, encoder) for (_, encoder_name), encoder
                         in zip(layout.text_components, model.text.encoders, strict=True))
        return parts

    def save(self, path_without_suffix: Path, metadata: dict[str, str]) -> Path:
        from engine.networks.network_file import save_dtype

        saving = self.config.saving
        write = FLUX_MODEL_WRITERS[saving.save_model_as]  # checked when the method was made
        return write(self.model, path_without_suffix, checkpoint_metadata(metadata, self.model),
                     save_dtype(saving.save_precision))


def refuse_text_encoder_training(config: RunConfig) -> None:
    """FLUX's text encoders stay frozen in full fine-tuning (sd-scripts' flux_train.py trains none of them)."""
    if config.optimizer.text_encoder_lr:
        raise RunInputError("FLUX.1/Chroma full fine-tuning trains only the transformer, not the text encoders",
                            "leave optimizer.text_encoder_lr empty (or 0), or train a LoRA to adapt the text "
                            "encoders", "optimizer.text_encoder_lr")
    if config.training.stop_text_encoder_training:
        raise RunInputError("FLUX.1/Chroma full fine-tuning does not train the text encoders, so there is nothing "
                            "to stop", "set training.stop_text_encoder_training to 0",
                            "training.stop_text_encoder_training")


def model_variant(model: LoadedModel) -> str:
    """"dev", "schnell" or "chroma": the loaded file's variant (engine.models.flux.loading)."""
    return str(model.scheduler_config.get("variant", ""))


def checkpoint_metadata(metadata: Mapping[str, str], model: LoadedModel) -> dict[str, str]:
    """The run's metadata for a whole-transformer file: no LoRA keys, and ModelSpec naming the loaded variant.

    The architecture is set here from the model itself, so a schnell fine-tune never says flux-1-dev (sd-scripts'
    appendix A.15 bug), whatever the metadata builder was told.
    """
    info = family_info(model.family)
    kept = {key: value for key, value in metadata.items() if not key.startswith(NETWORK_KEY_PREFIX)}
    kept["modelspec.architecture"] = info.modelspec_architecture(False, "", variant=model_variant(model))
    kept["modelspec.implementation"] = info.modelspec_implementation
    return kept


# --- the BFL single file ---------------------------------------------------------------------------------------


def save_bfl_file(model: LoadedModel, path_without_suffix: Path, metadata: dict[str, str],
                  dtype: torch.dtype | None) -> Path:
    """The transformer's BFL state dict (no prefix) as one .safetensors, written under a temporary name."""
    from safetensors.torch import save_file

    target = path_without_suffix.with_name(path_without_suffix.name + ".safetensors")
    state = {key: cpu_cast(tensor, dtype).contiguous() for key, tensor in model.unet.state_dict().items()}
    with atomic_output(target) as temporary:
        save_file(state, str(temporary), metadata=metadata)
    return target


# --- the diffusers folder --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderLayout:
    """How one kind of transformer is written as a diffusers pipeline.

    `text_components` are the (tokenizer, encoder) names of the pipeline, in the order of LoadedTextEncoders.
    """

    pipeline: str  # diffusers pipeline class name
    transformer: str  # diffusers transformer class name
    converter: str  # name in diffusers.loaders.single_file_utils
    text_components: tuple[tuple[str, str], ...]
    config: Callable[[FluxParams], dict[str, Any]]


def _flux_config(params: FluxParams) -> dict[str, Any]:
    return {**_shared_config(params), "pooled_projection_dim": params.vec_in_dim,
            "guidance_embeds": params.guidance_embed}


def _chroma_config(params: FluxParams) -> dict[str, Any]:
    return {**_shared_config(params), "approximator_num_channels": params.approximator_in_dim,
            "approximator_hidden_dim": params.approximator_hidden, "approximator_layers": params.approximator_depth}


def _shared_config(params: FluxParams) -> dict[str, Any]:
    if params.mlp_ratio != 4.0:  # diffusers' FLUX transformers have no MLP-ratio setting
        raise RunInputError(f"this transformer's MLP ratio is {params.mlp_ratio:g}; a diffusers folder can only hold "
                            "ratio 4 (FLUX's own)", "save with saving.save_model_as = 'safetensors'",
                            "saving.save_model_as")
    return {"patch_size": 1, "in_channels": params.in_channels, "out_channels": None, "num_layers": params.depth,
            "num_single_layers": params.depth_single_blocks, "attention_head_dim": params.head_dim,
            "num_attention_heads": params.num_heads, "joint_attention_dim": params.context_in_dim,
            "axes_dims_rope": tuple(params.axes_dim)}


# Keyed by the transformer's own layout (FluxParams.chroma), not by a family name.
FOLDER_LAYOUTS: dict[bool, FolderLayout] = {
    False: FolderLayout("FluxPipeline", "FluxTransformer2DModel", "convert_flux_transformer_checkpoint_to_diffusers",
                        (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")), _flux_config),
    True: FolderLayout("ChromaPipeline", "ChromaTransformer2DModel",
                       "convert_chroma_transformer_checkpoint_to_diffusers", (("tokenizer", "text_encoder"),),
                       _chroma_config),
}


def diffusers_transformer(flux: Flux, dtype: torch.dtype | None) -> torch.nn.Module:
    """A CPU copy of `flux` as diffusers' FluxTransformer2DModel / ChromaTransformer2DModel, weights in `dtype`."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers.loaders import single_file_utils

    layout = FOLDER_LAYOUTS[flux.params.chroma]
    checkpoint = {key: cpu_cast(tensor, dtype) for key, tensor in flux.state_dict().items()}
    converted = _converted(checkpoint, flux.params, getattr(single_file_utils, layout.converter))
    with init_empty_weights():  # no second allocation: the converted tensors become the weights
        transformer = getattr(diffusers, layout.transformer)(**layout.config(flux.params))
    transformer.load_state_dict(converted, strict=True, assign=True)
    return transformer.eval()


def _converted(checkpoint: dict[str, torch.Tensor], params: FluxParams,
               converter: Callable[..., dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers' conversion of a BFL state dict, with `single_blocks.N.linear1` split here.

    The converter hard-codes FLUX's widths (3072 hidden, 12288 MLP) for one split only, linear1 into Q, K, V and
    the MLP input; it gets an empty stand-in for that tensor and the real one is split by the model's own widths
    (rows hidden, hidden, hidden, mlp: spec §1.6), which for FLUX's sizes is the converter's own split. Everything
    else, the final layer's (shift, scale) swap included, is diffusers' code.
    """
    linear1: dict[str, torch.Tensor] = {}
    for index in range(params.depth_single_blocks):
        for suffix, stand_in in (("weight", (21504, 0)), ("bias", (21504,))):
            key = f"single_blocks.{index}.linear1.{suffix}"
            linear1[key] = checkpoint[key]
            checkpoint[key] = torch.empty(stand_in)
    converted = converter(checkpoint)
    sizes = [params.hidden_size] * 3 + [params.mlp_hidden]
    for index in range(params.depth_single_blocks):
        for suffix in ("weight", "bias"):
            parts = linear1[f"single_blocks.{index}.linear1.{suffix}"].split(sizes)
            for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts, strict=True):
                converted[f"single_transformer_blocks.{index}.{name}.{suffix}"] = part.contiguous()
    return converted


def flow_scheduler(scheduler_config: Mapping[str, Any]) -> Any:
    """The model's FlowMatchEulerDiscreteScheduler (its `variant` entry is ours, not a scheduler setting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    settings = {key: value for key, value in scheduler_config.items() if key != "variant"}
    return FlowMatchEulerDiscreteScheduler.from_config(settings)


def pipeline_components(model: LoadedModel, dtype: torch.dtype | None) -> tuple[str, dict[str, Any]]:
    """(pipeline class name, its components as CPU copies in `dtype`): what the folder is built from."""
    layout = FOLDER_LAYOUTS[model.unet.params.chroma]
    parts: dict[str, Any] = {"transformer": diffusers_transformer(model.unet, dtype),
                             "vae": cpu_copy(model.vae.vae, dtype),
                             "scheduler": flow_scheduler(model.scheduler_config)}
    for (tokenizer_name, encoder_name), tokenizer, encoder in zip(
            layout.text_components, model.text.tokenizers, model.text.encoders, strict=True):
        parts[tokenizer_name], parts[encoder_name] = tokenizer, cpu_copy(encoder, dtype)
    return layout.pipeline, parts


def save_flux_diffusers_folder(model: LoadedModel, path_without_suffix: Path, metadata: dict[str, str],
                               dtype: torch.dtype | None) -> Path:
    """A FluxPipeline / ChromaPipeline folder, written beside the target and moved into place once complete."""
    import diffusers

    pipeline_name, parts = pipeline_components(model, dtype)
    target = path_without_suffix
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        getattr(diffusers, pipeline_name)(**parts).save_pretrained(str(temporary), safe_serialization=True)
        replace_folder(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


FluxWriter = Callable[["LoadedModel", Path, dict[str, str], "torch.dtype | None"], Path]
FLUX_MODEL_WRITERS: dict[str, FluxWriter] = {
    "safetensors": save_bfl_file,
    "diffusers": save_flux_diffusers_folder,
    "diffusers_safetensors": save_flux_diffusers_folder,
}
