"""Config section for flow-matching training (FLUX.1, Chroma, SD3): how noise levels are drawn, what the model's
output is compared with, the guidance value fed to FLUX.1 dev, and SD3's shift and positional-embedding options.
Names and meanings are sd-scripts' (spec §4, §8.4, §8.5). The section applies to every flow family; each field says
which of them uses it."""

from __future__ import annotations

from engine.config.base import StrictModel, setting
from engine.config.choices import FLUX_FAMILIES, SD3_FAMILIES, ModelPredictionType, TimestepSampling, WeightingScheme


class FlowSection(StrictModel):
    """Flow matching: noise levels, target and guidance for FLUX.1, Chroma and SD3."""

    timestep_sampling: TimestepSampling = setting(
        "sigma", "How noise levels are picked each step: sigma (shifted schedule, sd-scripts' default), uniform, "
        "sigmoid (more mid-level noise; Chroma's choice), shift, or flux_shift (shift that follows the image size).",
        families=FLUX_FAMILIES,
    )
    sigmoid_scale: float = setting(
        1.0, "Spread of the sigmoid, shift and flux_shift samplings: larger reaches very low and very high noise more "
        "often.", gt=0.0, le=100.0, advanced=True, families=FLUX_FAMILIES,
    )
    discrete_flow_shift: float = setting(
        3.0, "Moves training towards noisier steps (for sigma and shift sampling); 3.1582 matches flux_shift at "
        "1024 px.", gt=0.0, le=100.0, families=FLUX_FAMILIES,
    )
    model_prediction_type: ModelPredictionType = setting(
        "raw", "How the model's output is compared with the target: raw (recommended) is how FLUX was trained; "
        "sigma_scaled is sd-scripts' default, kept for matching old runs.", advanced=True, families=FLUX_FAMILIES,
    )
    weighting_scheme: WeightingScheme = setting(
        "uniform", "Which noise levels count most: logit_normal and mode draw mid-level noise more often, sigma_sqrt "
        "and cosmap weight the loss by noise level; uniform = all equally (sd-scripts' default). For FLUX they act "
        "with timestep_sampling 'sigma' and model_prediction_type 'sigma_scaled' respectively.", advanced=True,
    )
    logit_mean: float = setting(
        0.0, "Centre of the logit_normal weighting; 0 centres it on mid-level noise.", ge=-10.0, le=10.0, advanced=True,
    )
    logit_std: float = setting(1.0, "Spread of the logit_normal weighting.", gt=0.0, le=10.0, advanced=True)
    mode_scale: float = setting(1.29, "Strength of the mode weighting.", ge=-10.0, le=10.0, advanced=True)
    guidance_scale: float = setting(
        3.5, "Guidance value FLUX.1 dev is trained with: 1.0 is recommended for dev LoRAs; Chroma needs 0; "
        "schnell ignores it.", ge=0.0, le=100.0, families=FLUX_FAMILIES,
    )
    training_shift: float = setting(
        1.0, "SD3: moves training towards noisier steps (above 1) or cleaner ones (below 1); 1.0 = no shift, "
        "sd-scripts' default.", gt=0.0, le=100.0, families=SD3_FAMILIES,
    )
    pos_emb_random_crop_rate: float = setting(
        0.0, "SD3.5 medium: chance per step of taking a random window of the position table instead of the centre "
        "one (0 = off, recommended for LoRA).", ge=0.0, le=1.0, advanced=True, families=SD3_FAMILIES,
    )
    enable_scaled_pos_embed: bool = setting(
        False, "SD3.5 (experimental): position tables rescaled for each training resolution; only training uses "
        "them, the saved model works as usual.", advanced=True, families=SD3_FAMILIES,
    )
