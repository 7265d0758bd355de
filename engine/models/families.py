"""What differs between the model families we train: names in saved files, default sizes, text encoders, and the
limits the config rules check (bucket sides, blocks to swap).

One registry, so LoRA naming, metadata, sampling, the trainer and the config rules never branch on family names
themselves.
Pure data: importing this module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    """Facts about one model family (spec §5.1, §5.3)."""

    name: str  # "sd1", "sd2", "sdxl", "flux1", "chroma" or "sd3"
    # kohya LoRA prefixes of the text encoders, in the order of LoadedTextEncoders.encoders
    text_encoder_lora_prefixes: tuple[str, ...]
    default_resolution: int
    base_version: str  # ss_base_model_version for an epsilon model
    base_version_v: str  # ... and for a v-prediction model
    architecture: str  # modelspec.architecture without the "/lora" suffix, epsilon model
    architecture_v: str
    modelspec_implementation: str  # for LoRA files
    latent_scaling_factor: float
    uses_size_conditioning: bool = False  # SDXL's added time ids (original size, crop, target size)
    # Keys into the registries of the modules that differ per family; those modules look these up and never test a
    # family name. Adding a family means an entry here plus, where it is new, an entry in the registry it names.
    objective: str = "ddpm"  # engine.train.objectives: "ddpm" (noise/v prediction), "flow" (FLUX) or "sd3" (x0 flow)
    unet_naming: str = "diffusers"  # engine.networks.lora_names: "diffusers", "sai" (SDXL), "bfl" (FLUX), "mmdit" (SD3)
    text_encoding: str = "sd"  # engine.models.text_encoding and the trainer's conditioning: "sd", "sdxl", "flux", "sd3"
    sampler: str = "sd"  # engine.train.sampling: "sd", "sdxl", "flux" or "sd3"
    loader: str = "ldm"  # engine.models.loading: "ldm" (SD checkpoints and pipelines), "flux" or "sd3"
    latent_channels: int = 4
    latent_shift: float = 0.0  # latents are (z - shift) * scaling_factor before the denoiser sees them
    # Image sides (bucket_reso_steps) must be multiples of this, in pixels. SD1/SD2: three 2x downsamplings of a 1/8
    # latent -> 64 px; SDXL's UNet has one fewer -> 32 px; FLUX packs 2x2 patches of a 1/8 latent (spec §2.2) and
    # SD3's MMDiT patchifies 2x2 itself (spec §10) -> 16 px.
    bucket_multiple: int = 64
    model_type: str = ""  # sd-scripts' ss_model_type ("flux", "chroma"); "" writes none
    kohya_network_module: str = "networks.lora"  # ss_network_module of our kohya-format LoRA files
    kohya_v2: bool = False  # sd-scripts' ss_v2 flag (the SD2 text encoder and its defaults)
    diffusers_pipeline: str = "StableDiffusionPipeline"  # the diffusers class a saved pipeline folder is
    # modelspec architecture per variant of the base file (FLUX.1 dev vs schnell), overriding `architecture`
    variant_architectures: tuple[tuple[str, str], ...] = ()
    # ss_base_model_version is the base file's variant itself (SD3: "medium", "5-medium", "5-large"; spec §8.6)
    base_version_is_variant: bool = False
    # The model.* fields that name the text encoders' own files, for a base file holding only the denoiser
    # (FLUX.1: CLIP-L and T5-XXL; Chroma has no CLIP-L). Empty: the base file or folder holds them.
    text_encoder_files: tuple[str, ...] = ()
    t5_attn_mask_required: bool = False  # trained with T5's padding masked (Chroma): sd-scripts refuses it unmasked
    trained_guidance_scale: float | None = None  # the guidance input the model learned, when only one (Chroma: 0)
    noise_prediction_only: bool = False  # no v-prediction checkpoints exist (SD1.x); SD2.x 768-v and SDXL v-pred do
    # The UNet's heads per block whatever its width (SD1: 8, diffusers' attention_head_dim); 0: heads of 64 channels
    unet_attention_heads: int = 0
    latent_cache_suffix: str = "sd"  # the latent cache files' suffix: families sharing an AE share the files
    label: str = ""  # how messages and the GUI name the family ("SD1.x", "FLUX.1")
    # The most blocks training.blocks_to_swap may name (0: no swapping for the family). SD1/SD2/SDXL swap resnets and
    # transformer blocks (engine.models.swap_layouts), all but two: SD1/SD2 have 22 resnets and 16 transformer blocks,
    # SDXL 17 and 70; a UNet of another shape is checked once it is loaded. FLUX's 19 double + 38 single blocks swap
    # at most 17 double and 36 single: 35 (spec §6.2). SD3 swaps at most depth - 2 joint blocks (spec §8.6): 36 for
    # SD3.5 large (38 blocks); the medium models' 22 is checked once the file is loaded, since the variant is known
    # only then.
    max_blocks_to_swap: int = 0
    # whether full fine-tuning may swap blocks too (the trained weights step inside backward: fused_backward_pass)
    swaps_trained_blocks: bool = False

    def base_model_version(self, v_prediction: bool, variant: str = "") -> str:
        if self.base_version_is_variant and variant:
            return variant
        return self.base_version_v if v_prediction else self.base_version

    def modelspec_architecture(self, v_prediction: bool, kind: str = "lora", variant: str = "") -> str:
        """e.g. "stable-diffusion-v1/lora"; kind "" gives the bare architecture (full checkpoints)."""
        base = self.architecture_v if v_prediction else self.architecture
        base = dict(self.variant_architectures).get(variant, base)
        return f"{base}/{kind}" if kind else base

    def resolution_for(self, v_prediction: bool) -> int:
        # sd-scripts' modelspec default: 768 for SD2 v-prediction, else the family's native size
        return 768 if (v_prediction and self.name == "sd2") else self.default_resolution


_SGM = "https://github.com/Stability-AI/generative-models"

FAMILY_INFO: dict[str, FamilyInfo] = {
    "sd1": FamilyInfo("sd1", ("lora_te",), 512, "sd_v1", "sd_v1_v", "stable-diffusion-v1", "stable-diffusion-v1",
                      "diffusers", 0.18215, noise_prediction_only=True, unet_attention_heads=8, label="SD1.x",
                      max_blocks_to_swap=36, swaps_trained_blocks=True),
    "sd2": FamilyInfo("sd2", ("lora_te",), 512, "sd_v2", "sd_v2_v", "stable-diffusion-v2-512",
                      "stable-diffusion-v2-768-v", "diffusers", 0.18215, kohya_v2=True, label="SD2.x",
                      max_blocks_to_swap=36, swaps_trained_blocks=True),
    "sdxl": FamilyInfo("sdxl", ("lora_te1", "lora_te2"), 1024, "sdxl_base_v1-0", "sdxl_base_v1-0",
                       "stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base", _SGM, 0.13025,
                       uses_size_conditioning=True, unet_naming="sai", text_encoding="sdxl", sampler="sdxl",
                       diffusers_pipeline="StableDiffusionXLPipeline", latent_cache_suffix="sdxl", bucket_multiple=32,
                       label="SDXL", max_blocks_to_swap=85, swaps_trained_blocks=True),
    # FLUX.1 dev and schnell share an entry: the file tells them apart (guidance_in), spec §1.3 and §5.4.
    "flux1": FamilyInfo("flux1", ("lora_te1", "lora_te3"), 1024, "flux1", "flux1", "flux-1", "flux-1",
                        "https://github.com/black-forest-labs/flux", 0.3611, objective="flow", unet_naming="bfl",
                        text_encoding="flux", sampler="flux", loader="flux", latent_channels=16, latent_shift=0.1159,
                        bucket_multiple=16, model_type="flux", kohya_network_module="networks.lora_flux",
                        diffusers_pipeline="FluxPipeline",
                        variant_architectures=(("dev", "flux-1-dev"), ("schnell", "flux-1-schnell")),
                        text_encoder_files=("clip_l", "t5xxl"), latent_cache_suffix="flux", label="FLUX.1",
                        max_blocks_to_swap=35),
    "chroma": FamilyInfo("chroma", ("lora_te3",), 1024, "chroma", "chroma", "chroma", "chroma",
                         "https://huggingface.co/lodestones/Chroma", 0.3611, objective="flow", unet_naming="bfl",
                         text_encoding="flux", sampler="flux", loader="flux", latent_channels=16, latent_shift=0.1159,
                         bucket_multiple=16, model_type="chroma", kohya_network_module="networks.lora_flux",
                         diffusers_pipeline="ChromaPipeline", text_encoder_files=("t5xxl",),
                         t5_attn_mask_required=True, trained_guidance_scale=0.0, latent_cache_suffix="flux",
                         label="Chroma", max_blocks_to_swap=35),
    # SD3 medium, SD3.5 medium and SD3.5 large share an entry: the file tells them apart (qk-norm, attn2; spec §8.1)
    # and the variant names them in the metadata, as sd-scripts' model_type does (spec §8.6).
    "sd3": FamilyInfo("sd3", ("lora_te1", "lora_te2", "lora_te3"), 1024, "medium", "medium",
                      "stable-diffusion-3-medium", "stable-diffusion-3-medium", "https://github.com/Stability-AI/sd3.5",
                      1.5305, objective="sd3", unet_naming="mmdit", text_encoding="sd3", sampler="sd3", loader="sd3",
                      latent_channels=16, latent_shift=0.0609, bucket_multiple=16,
                      kohya_network_module="networks.lora_sd3", diffusers_pipeline="StableDiffusion3Pipeline",
                      variant_architectures=(("medium", "stable-diffusion-3-medium"),
                                             ("5-medium", "stable-diffusion-3-5-medium"),
                                             ("5-large", "stable-diffusion-3-5-large")),
                      base_version_is_variant=True, text_encoder_files=("clip_l", "clip_g", "t5xxl"),
                      latent_cache_suffix="sd3", label="SD3 / SD3.5", max_blocks_to_swap=36,
                      swaps_trained_blocks=True),
}


def family_info(name: str) -> FamilyInfo:
    try:
        return FAMILY_INFO[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILY_INFO)}") from None
