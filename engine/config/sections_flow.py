"""Config section for flow-matching training (FLUX.1, Chroma): how noise levels are drawn, what the model's output
is compared with, and the guidance value fed to FLUX.1 dev. Names and meanings are sd-scripts' (spec §4)."""

from __future__ import annotations

from engine.config.base import StrictModel, setting
from engine.config.choices import ModelPredictionType, TimestepSampling, WeightingScheme


class FlowSection(StrictModel):
    """Flow matching: noise levels, target and guidance for FLUX.1 and Chroma."""

    timestep_sampling: TimestepSampling = setting(
        "sigma", "How noise levels are picked each step: sigma (shifted schedule, sd-scripts' default), uniform, "
        "sigmoid (more mid-level noise; Chroma's choice), shift, or flux_shift (shift that follows the image size).",
    )
    sigmoid_scale: float = setting(
        1.0, "Spread of the sigmoid, shift and flux_shift samplings: larger reaches very low and very high noise more "
        "often.", gt=0.0, le=100.0, advanced=True,
    )
    discrete_flow_shift: float = setting(
        3.0, "Moves training towards noisier steps (for sigma and shift sampling); 3.1582 matches flux_shift at "
        "1024 px.", gt=0.0, le=100.0,
    )
    model_prediction_type: ModelPredictionType = setting(
        "raw", "How the model's output is compared with the target: raw (recommended) is how FLUX was trained; "
        "sigma_scaled is sd-scripts' default, kept for matching old runs.", advanced=True,
    )
    weighting_scheme: WeightingScheme = setting(
        "uniform", "Which noise levels count most: shapes the sigma sampling (logit_normal, mode) or weights the "
        "loss with sigma_scaled (sigma_sqrt, cosmap); uniform = all equally.", advanced=True,
    )
    logit_mean: float = setting(
        0.0, "Centre of the logit_normal weighting; 0 centres it on mid-level noise.", ge=-10.0, le=10.0, advanced=True,
    )
    logit_std: float = setting(1.0, "Spread of the logit_normal weighting.", gt=0.0, le=10.0, advanced=True)
    mode_scale: float = setting(1.29, "Strength of the mode weighting.", ge=-10.0, le=10.0, advanced=True)
    guidance_scale: float = setting(
        3.5, "Guidance value FLUX.1 dev is trained with: 1.0 is recommended for dev LoRAs; Chroma needs 0; "
        "schnell ignores it.", ge=0.0, le=100.0,
    )
