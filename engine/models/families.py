"""What differs between the model families we train: names in saved files, default sizes, text encoders.

One registry, so LoRA naming, metadata, sampling and the trainer never branch on family names themselves.
Pure data: importing this module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    """Facts about one model family (spec §5.1, §5.3)."""

    name: str  # "sd1", "sd2" or "sdxl"
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

    def base_model_version(self, v_prediction: bool) -> str:
        return self.base_version_v if v_prediction else self.base_version

    def modelspec_architecture(self, v_prediction: bool, kind: str = "lora") -> str:
        """e.g. "stable-diffusion-v1/lora"; kind "" gives the bare architecture (full checkpoints)."""
        base = self.architecture_v if v_prediction else self.architecture
        return f"{base}/{kind}" if kind else base

    def resolution_for(self, v_prediction: bool) -> int:
        # sd-scripts' modelspec default: 768 for SD2 v-prediction, else the family's native size
        return 768 if (v_prediction and self.name == "sd2") else self.default_resolution


_SGM = "https://github.com/Stability-AI/generative-models"

FAMILY_INFO: dict[str, FamilyInfo] = {
    "sd1": FamilyInfo("sd1", ("lora_te",), 512, "sd_v1", "sd_v1_v", "stable-diffusion-v1", "stable-diffusion-v1",
                      "diffusers", 0.18215),
    "sd2": FamilyInfo("sd2", ("lora_te",), 512, "sd_v2", "sd_v2_v", "stable-diffusion-v2-512",
                      "stable-diffusion-v2-768-v", "diffusers", 0.18215),
    "sdxl": FamilyInfo("sdxl", ("lora_te1", "lora_te2"), 1024, "sdxl_base_v1-0", "sdxl_base_v1-0",
                       "stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base", _SGM, 0.13025,
                       uses_size_conditioning=True),
}


def family_info(name: str) -> FamilyInfo:
    try:
        return FAMILY_INFO[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILY_INFO)}") from None
