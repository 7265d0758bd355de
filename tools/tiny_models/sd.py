"""Tiny SD1.x / SD2.x / SDXL pipelines (diffusers folders) and their original-layout single-file checkpoints.

Shapes are chosen so that the three families can be told apart the way real ones are: SD1 conditions on a
32-wide CLIP (stand-in for 768), SD2 on a 64-wide OpenCLIP-style encoder (stand-in for 1024), SDXL on the
concatenation of a 32-wide and a 64-wide encoder (stand-in for 768 + 1280 = 2048). The two SDXL encoders must
differ in width: diffusers' single-file loader picks the encoder for each slot by comparing widths.

The tokenizers are the real ones (CLIP's 49408-token vocabulary with each family's shipped tokenizer config, from
``engine.models.tokenizers``), so single-file checkpoints load with the package's own tokenizers, exactly as real
models do. The single files carry their diffusers configs in their metadata (``save_ldm_checkpoint(configs=)``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from engine.models import pipeline_to_ldm, save_ldm_checkpoint
from engine.models.ldm_checkpoint import pipeline_configs
from engine.models.tokenizers import load_tokenizer, tokenizer_folder

FAMILY_SEEDS = {"sd1": 100, "sd2": 200, "sdxl": 300}

# SD's noise schedule; every family shares it.
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

_SDXL_TIME_EMBED_DIM = 8  # SDXL: 256 per micro-conditioning value, 6 values (sizes, crop, target size).
_SDXL_TEXT2_PROJECTION = 48  # Deliberately ≠ the encoder width, so a transposed text_projection cannot load.


def _text_encoder(tokenizer, seed: int, hidden: int, act: str, projection_dim: int | None = None):
    """A 2-layer CLIP text model; ``projection_dim`` set → ``CLIPTextModelWithProjection`` (SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 5,  # an odd width catches any code that assumes MLP == 4 × hidden
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        vocab_size=len(tokenizer),
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        # Pooling looks for the eos id; the real configs' legacy ids (0/2/1) make transformers guess it instead.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return model_class(config).eval()


def _vae(seed: int, scaling_factor: float):
    """4 blocks, as in SD, so that vae_scale_factor is 8: a 64 px image → an 8×8 latent."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
    ).eval()


def _unet(seed: int, family: str, cross_attention_dim: int, text2_projection: int = 0):
    from diffusers import UNet2DConditionModel

    common = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_attention_dim,
    }
    if family == "sd1":
        # Attention only in the high-resolution block, as SD1's last down / first up blocks have none.
        extra = {
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 4,
        }
    elif family == "sd2":
        extra = {
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": (2, 4),  # SD2 gives per-block head dims (5, 10, 20, 20)
            "use_linear_projection": True,
            "upcast_attention": True,  # as SD2.1, whose attention overflows in fp16 otherwise
        }
    else:
        # SDXL: no attention at the highest resolution, several transformer layers deeper down.
        extra = {
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "transformer_layers_per_block": (1, 2),
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
            # The text_time MLP sees the pooled text embedding plus 6 sinusoidally embedded size/crop values.
            "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_EMBED_DIM + text2_projection,
        }
    torch.manual_seed(seed)
    return UNet2DConditionModel(**common, **extra).eval()


def _scheduler(family: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    if family == "sd1":
        return PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    if family == "sd2":
        # SD2-768 ("v") models predict velocity, not noise; the scheduler config is where pipelines read that.
        return DDIMScheduler(
            **_SD_BETAS,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
    return EulerDiscreteScheduler(
        **_SD_BETAS, steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon"
    )


def make_pipeline(family: str):
    """Build the tiny diffusers pipeline of one family in memory (deterministic for a given family)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    seed = FAMILY_SEEDS[family]
    tokenizer = load_tokenizer(family)
    if family == "sd1":
        text_encoder = _text_encoder(tokenizer, seed + 1, hidden=32, act="quick_gelu")
        unet = _unet(seed + 2, family, cross_attention_dim=32)
    elif family == "sd2":
        text_encoder = _text_encoder(tokenizer, seed + 1, hidden=64, act="gelu")
        unet = _unet(seed + 2, family, cross_attention_dim=64)
    else:
        text_encoder = _text_encoder(tokenizer, seed + 1, hidden=32, act="quick_gelu")
        tokenizer_2 = load_tokenizer(family, "tokenizer_2")  # SDXL's OpenCLIP tokenizer pads with "!"
        text_encoder_2 = _text_encoder(tokenizer_2, seed + 3, 64, "gelu", projection_dim=_SDXL_TEXT2_PROJECTION)
        unet = _unet(seed + 2, family, cross_attention_dim=32 + 64, text2_projection=_SDXL_TEXT2_PROJECTION)
        vae = _vae(seed + 4, scaling_factor=0.13025)
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=_scheduler(family),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=_vae(seed + 4, scaling_factor=0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(family),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_sd(family: str, folder: Path, single_file: Path) -> None:
    """Save ``family``'s pipeline as a diffusers folder and as an LDM single-file checkpoint."""
    pipe = make_pipeline(family)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # transformers 5 writes only tokenizer.json; older (4.x) CLIPTokenizer needs the BPE files themselves.
    for subfolder in ("tokenizer", "tokenizer_2"):
        if (folder / subfolder).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(tokenizer_folder(family, subfolder) / name, folder / subfolder / name)
    save_ldm_checkpoint(pipeline_to_ldm(pipe, family), single_file, configs=pipeline_configs(pipe))
