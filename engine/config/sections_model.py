"""Config sections for what is trained: the base model, the network (LoRA family) and the embedding (TI)."""

from __future__ import annotations

from typing import Any

from engine.config.base import StrictModel, setting
from engine.config.choices import (
    FLOW_FAMILIES,
    FLUX_FAMILIES,
    SD3_FAMILIES,
    SD_FAMILIES,
    MaxTokenLength,
    ModelFamily,
    NetworkType,
)


class ModelSection(StrictModel):
    """The base model being trained on."""

    pretrained_model_name_or_path: str = setting(
        "", "Base model: a .safetensors/.ckpt file, a diffusers folder, or a Hugging Face id.", widget="path",
    )
    model_family: ModelFamily = setting(
        "auto", "Model architecture: SD1.x, SD2.x, SDXL, FLUX.1 (dev or schnell), Chroma or SD3 (SD3 medium, SD3.5 "
        "medium or large); 'auto' detects it from the checkpoint.",
    )
    clip_l: str = setting(
        "", "The CLIP-L text encoder file (clip_l.safetensors) of FLUX.1 and SD3; not needed when the base model is a "
        "diffusers folder, or an SD3 file that includes its text encoders.", widget="path",
        families=("flux1", *SD3_FAMILIES),
    )
    clip_g: str = setting(
        "", "SD3's CLIP-G text encoder file (clip_g.safetensors); not needed when the base model is a diffusers "
        "folder or a file that includes its text encoders.", widget="path", families=SD3_FAMILIES,
    )
    t5xxl: str = setting(
        "", "The T5-XXL text encoder file (e.g. t5xxl_fp16.safetensors); not needed when the base model is a "
        "diffusers folder, or an SD3 file that includes its text encoders.", widget="path", families=FLOW_FAMILIES,
    )
    ae: str = setting(
        "", "FLUX's autoencoder file (ae.safetensors), its VAE; not needed when the base model is a diffusers folder.",
        widget="path", families=FLUX_FAMILIES,
    )
    v_parameterization: bool = setting(
        False, "The model predicts v instead of noise (SD2.x 768-v and v-prediction SDXL models).",
        families=SD_FAMILIES,
    )
    vae: str = setting(
        "", "A separate VAE file or folder to use instead of the model's own; for SD3 its 16-channel VAE, needed only "
        "when the model file has none.", widget="path", advanced=True, families=(*SD_FAMILIES, *SD3_FAMILIES),
    )
    no_half_vae: bool = setting(
        False, "Keep the VAE in 32-bit floats; SDXL's VAE produces NaNs in fp16.", advanced=True,
        families=SD_FAMILIES,
    )
    clip_skip: int = setting(
        1, "Use the text encoder's output this many layers from the end (2 for many anime SD1.5 models).",
        ge=1, le=12, families=SD_FAMILIES,
    )
    max_token_length: MaxTokenLength = setting(
        75, "Longest caption in tokens; 150 or 225 encodes long captions in 75-token chunks.", advanced=True,
        families=SD_FAMILIES,
    )
    weighted_captions: bool = setting(
        False, "Read prompt weights in captions as sd-scripts does: (word:1.5) or (word) strengthens a word, [word] "
        "weakens it, \\( and \\) are plain brackets.", advanced=True, families=SD_FAMILIES,
    )
    t5xxl_max_token_length: int | None = setting(
        None, "Longest caption T5 reads, in tokens; empty uses 512 (256 for FLUX.1 schnell and SD3). Shorter trains "
        "faster but cuts long captions.", ge=1, le=512, advanced=True, families=FLOW_FAMILIES,
    )
    apply_t5_attn_mask: bool = setting(
        False, "Hide the padding after each caption from T5's attention. Chroma needs it on; for FLUX.1 and SD3 leave "
        "it off, as most image generators do not use it.", advanced=True, families=FLOW_FAMILIES,
    )
    apply_lg_attn_mask: bool = setting(
        False, "SD3: hide the padding after each caption from CLIP-L's and CLIP-G's attention (their outputs are not "
        "zeroed); off, as SD3 was trained.", advanced=True, families=SD3_FAMILIES,
    )
    tokenizer_cache_dir: str = setting(
        "", "Folder with the CLIP and T5 tokenizers, for a machine without internet; empty uses the model cache "
        "(downloaded once).", widget="folder", advanced=True, families=FLOW_FAMILIES,
    )
    fp8_base: bool = setting(
        False, "Keep the frozen base model in 8-bit floats (fp8): about half the memory, slightly less exact; for "
        "FLUX and SD3.5 large on 24 GB cards and smaller. Needs fp16 or bf16 mixed precision.",
        families=FLOW_FAMILIES,
    )
    fp8_base_unet: bool = setting(
        False, "Like fp8_base, but only the transformer goes to fp8; the text encoders keep full precision.",
        advanced=True, families=FLOW_FAMILIES,
    )


# Variants whose T5 reads 256 tokens when t5xxl_max_token_length is empty, as in sd-scripts: FLUX.1 schnell (spec
# §3.3) and every SD3 variant (sd-scripts' model_type names; spec §8.3).
_SHORT_T5_VARIANTS = ("schnell", "medium", "5-medium", "5-large")


def t5xxl_token_length(configured: int | None, variant: str) -> int:
    """The T5 caption length a run uses: the configured one, else 256 for FLUX.1 schnell and SD3 and 512 otherwise
    (dev, Chroma). `variant` is read from the file: "dev", "schnell" or "chroma", or SD3's "medium", "5-medium" or
    "5-large"."""
    if configured is not None:
        return configured
    return 256 if variant in _SHORT_T5_VARIANTS else 512


class NetworkSection(StrictModel):
    """The trained network for method = "lora": LoRA, LoCon and the LyCORIS family."""

    network_type: NetworkType = setting(
        "lora", "Kind of network: kohya LoRA/LoCon, DyLoRA (sd-scripts' networks.dylora, SD1.x/2.x/SDXL), or a "
        "LyCORIS algorithm (needs the lycoris extra).",
    )
    network_dim: int = setting(
        8, "Rank of the network: larger learns more detail and makes bigger files (4-128 is usual).",
        ge=1, le=100000,
    )
    network_alpha: float = setting(
        1.0, "Scales the network's output by alpha/dim; commonly dim or dim/2, and 1 for a gentle start.",
        gt=0.0, le=100000.0,
    )
    conv_dim: int = setting(
        0, "Rank for 3x3 convolution layers (LoCon); 0 leaves convolutions untrained.", ge=0, le=100000,
    )
    conv_alpha: float = setting(1.0, "Alpha for the convolution layers.", gt=0.0, le=100000.0)
    network_dropout: float = setting(
        0.0, "Dropout on the network's hidden activations (0 = off, 0.1 is typical).", ge=0.0, lt=1.0,
        advanced=True, group="dropout",
    )
    rank_dropout: float = setting(
        0.0, "Chance of dropping each rank per step.", ge=0.0, lt=1.0, advanced=True, group="dropout",
    )
    module_dropout: float = setting(
        0.0, "Chance of skipping a whole module per step.", ge=0.0, lt=1.0, advanced=True, group="dropout",
    )
    network_weights: str = setting(
        "", "Start from the weights of an existing network file instead of from scratch.", widget="file",
        advanced=True,
    )
    train_unet_only: bool = setting(False, "Train only the UNet; the text encoder stays as it is.")
    train_text_encoder_only: bool = setting(False, "Train only the text encoder.", advanced=True)
    network_args: dict[str, Any] = setting(
        default_factory=dict, description="Extra algorithm options, e.g. {preset = 'attn-mlp', use_tucker = true}.",
        advanced=True,
    )


class EmbeddingSection(StrictModel):
    """The new token for method = "textual_inversion"."""

    token_string: str = setting(
        "", "The new word you will type in prompts; it must not already be a word the tokenizer knows.",
    )
    init_word: str = setting(
        "", "An existing word the new embedding starts from, e.g. 'dog' (empty = start from '*').",
    )
    num_vectors_per_token: int = setting(
        1, "How many token vectors the embedding uses; more captures more, costs prompt length.", ge=1, le=75,
    )
