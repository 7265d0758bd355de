"""Settings of other families: a field declared (`setting(families=...)`) for some model families only does nothing
for the others, so a changed value there is refused rather than ignored, saying what that family uses instead.

Registered with the same `@rule` as the rules in :mod:`engine.config.rules`, which imports this module so that
`check()` runs them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from engine.config.base import field_families
from engine.config.choices import FLOW_FAMILIES, FLUX_FAMILIES, SD3_FAMILIES, family_label, family_names
from engine.config.rule_registry import Problem, RuleContext, rule

if TYPE_CHECKING:
    from engine.config.schema import RunConfig

# What to do instead, for settings that a family does not use (the default message says to set it back).
_INSTEAD: dict[tuple[str, str], str] = {
    ("model.vae", "flux"): "FLUX's autoencoder file goes in model.ae",
    ("model.max_token_length", "flux"): "FLUX's caption length is model.t5xxl_max_token_length",
    ("model.v_parameterization", "flux"): "FLUX predicts a velocity (see flow.model_prediction_type)",
    ("model.clip_skip", "flux"): "FLUX uses its text encoders' final outputs",
    ("model.clip_l", "chroma"): "Chroma has no CLIP-L text encoder",
    ("optimizer.text_encoder2_lr", "flux"): "FLUX trains its text encoders at optimizer.text_encoder_lr",
    ("training.min_timestep", "flux"): "FLUX picks noise levels with flow.timestep_sampling",
    ("training.max_timestep", "flux"): "FLUX picks noise levels with flow.timestep_sampling",
    ("training.min_snr_gamma", "flux"): "flow matching weights the loss with flow.weighting_scheme",
    ("training.debiased_estimation_loss", "flux"): "flow matching weights the loss with flow.weighting_scheme",
    ("sampling.sample_sampler", "flux"): "FLUX samples with its own Euler sampler",
    ("model.ae", "sd3"): "an SD3 model file carries its own VAE; a separate one goes in model.vae",
    ("model.clip_skip", "sd3"): "SD3 uses its CLIP encoders' penultimate layers, as it was trained",
    ("model.max_token_length", "sd3"): "CLIP reads 77 tokens in SD3; T5's caption length is "
                                       "model.t5xxl_max_token_length",
    # sd-scripts weights captions only for the CLIP-only families; its FLUX/SD3 trainers never read the weights.
    ("model.weighted_captions", "flux"): "sd-scripts has no weighted captions for FLUX.1 or Chroma",
    ("model.weighted_captions", "sd3"): "sd-scripts has no weighted captions for SD3",
    ("model.v_parameterization", "sd3"): "SD3 is trained with flow matching towards the clean image",
    ("model.no_half_vae", "sd3"): "SD3's 16-channel VAE keeps its own precision",
    ("optimizer.text_encoder2_lr", "sd3"): "SD3 trains its text encoders at optimizer.text_encoder_lr",
    ("training.ip_noise_gamma", "sd3"): "SD3's objective adds no input perturbation (sd-scripts ignores it for SD3)",
    ("training.ip_noise_gamma_random_strength", "sd3"): "SD3's objective adds no input perturbation",
    ("training.min_snr_gamma", "sd3"): "flow matching weights the loss with flow.weighting_scheme",
    ("training.debiased_estimation_loss", "sd3"): "flow matching weights the loss with flow.weighting_scheme",
    ("flow.timestep_sampling", "sd3"): "SD3 draws noise levels with flow.weighting_scheme and flow.training_shift",
    ("flow.sigmoid_scale", "sd3"): "SD3 draws noise levels with flow.weighting_scheme and flow.training_shift",
    ("flow.discrete_flow_shift", "sd3"): "SD3's shift is flow.training_shift",
    ("flow.model_prediction_type", "sd3"): "SD3's output always becomes an estimate of the clean image",
    ("flow.guidance_scale", "sd3"): "SD3 has no guidance input (sample images use a CFG scale)",
    ("sampling.sample_sampler", "sd3"): "SD3 samples with its own Euler sampler",
}
_FLOW_NOISE = "flow matching draws plain Gaussian noise, so this would do nothing"


def _applicability(model: BaseModel, prefix: str = "", families: tuple[str, ...] | None = None,
                   ) -> Iterator[tuple[str, Any, Any, tuple[str, ...] | None]]:
    """(path, value, default, families) of every leaf field, a section's families applying to its fields."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        own = field_families(info)
        applies = own if own is not None else families
        if isinstance(value, BaseModel):
            yield from _applicability(value, f"{prefix}{name}.", applies)
        else:
            yield f"{prefix}{name}", value, info.get_default(call_default_factory=True), applies


def _undo(default: Any) -> str:
    """How to bring a field back to its default, in the words of a config file."""
    if default is None:
        return "remove it"
    if default == "":
        return "clear it"
    if isinstance(default, bool):
        return f"set it to {str(default).lower()}"
    return f"set it back to {default!r}"


@rule
def settings_suit_the_family(config: RunConfig, context: RuleContext) -> Iterator[Problem]:
    """A setting declared for other families does nothing here: refuse a changed value rather than ignore it."""
    family = config.model.model_family
    if family == "auto":
        return  # nothing is known yet: the loader detects the family
    kind = "flux" if family in FLUX_FAMILIES else "sd3" if family in SD3_FAMILIES else "sd"
    for path, value, default, families in _applicability(config):
        if families is None or family in families or value == default:
            continue
        names = family_names(families)
        why = (_INSTEAD.get((path, family)) or _INSTEAD.get((path, kind))
               or (_FLOW_NOISE if family in FLOW_FAMILIES and path.startswith("training.") else None))
        hint = f"{why}; " if why else ""
        yield Problem(path, f"only {names} models use this, not {family_label(family)} (model.model_family = "
                      f"'{family}'); {hint}{_undo(default)}")
