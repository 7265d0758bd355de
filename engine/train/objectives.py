"""Training objectives: from clean latents and conditioning to the loss of one micro-batch, per family kind.

A family names its objective (``FamilyInfo.objective``); the step runner asks this registry for it and never
tests a family name. Two objectives exist:

* ``"ddpm"`` (SD1/SD2/SDXL): sd-scripts' DDPM noising, ε or v target, SNR-based weights (spec §6).
* ``"flow"`` (FLUX.1, Chroma): flow matching, x_σ = (1 − σ)·x0 + σ·ε, velocity target ε − x0, latents packed
  into 2×2 patches for the transformer (FLUX spec §2.2, §4).

Both draw each sample's noise and timestep from that sample's own seed (``batch["noise_seed"]``), so a sample
gets the same draws whatever its batch, its position in it, or the number of processes, and a resumed run draws
what the uninterrupted one would have. ``loss(..., timesteps=t)`` replaces the drawn timesteps with given ones
(t in 0…1000; flow matching's σ = t/1000): the validation loss evaluates every image at fixed timesteps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from engine.models.families import family_info

if TYPE_CHECKING:
    from engine.train.setup import Session

__all__ = ["OBJECTIVES", "DiffusionObjective", "FlowObjective", "make_objective"]


class DiffusionObjective:
    """DDPM noise prediction (or v-prediction) on a diffusers UNet."""

    def __init__(self, session: Session):
        from engine.train.losses import LossSettings, snr_table
        from engine.train.noise import NoiseSettings, make_noise_scheduler

        config = session.config
        self.session = session
        self.scheduler = make_noise_scheduler(v_prediction=config.model.v_parameterization,
                                              zero_terminal_snr=config.training.zero_terminal_snr)
        self.noise_settings = NoiseSettings.from_config(config.training)
        self.loss_settings = LossSettings.from_config(config.training, config.model.v_parameterization)
        self.snr = snr_table(self.scheduler).to(session.device)
        # diffusers' add_noise / get_velocity move this table to the latents' device on first use: a blocking copy
        # inside the first step (seen on CUDA by tests/test_step_sync.py); it goes there once, here.
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(session.device)

    def loss(self, latents: torch.Tensor, conditioning: dict[str, Any], batch: dict[str, Any],
             timesteps: torch.Tensor | None = None) -> torch.Tensor:
        from engine.train.losses import batch_loss, batch_mask, batch_weights
        from engine.train.network_scaling import preserved_target
        from engine.train.noise import training_target

        session = self.session
        noise, timesteps, noisy = self._noised(latents, batch["noise_seed"], timesteps)

        def predict() -> torch.Tensor:
            with session.precision.autocast():
                return session.model.unet(noisy.to(session.weight_dtype), timesteps, **conditioning).sample

        prediction = predict()
        target = training_target(self.scheduler, latents, noise, timesteps, session.config.model.v_parameterization)
        target = preserved_target(session, batch, target, predict)
        weights = batch_weights(batch, latents.device)
        return batch_loss(prediction.float(), target.float(), timesteps, weights, self.loss_settings, self.snr,
                          mask=batch_mask(batch, latents.device))

    def _noised(self, latents: torch.Tensor, seeds: list[int],
                timesteps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from engine.train.noise import NoiseDraws

        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        draws = NoiseDraws.per_sample((1, *latents.shape[1:]), self.noise_settings, generators).to(latents.device)
        if timesteps is not None:  # drawn all the same, so the draws after the timestep stay what they were
            draws.timesteps = timesteps.to(draws.timesteps)
        noise = draws.noise(latents, self.noise_settings)
        noisy = self.scheduler.add_noise(latents, draws.perturbed(noise), draws.timesteps)
        return noise, draws.timesteps, noisy


class FlowObjective:
    """Flow matching on a FLUX-layout transformer (engine.models.flux.transformer.Flux)."""

    def __init__(self, session: Session):
        from engine.train.flow import FlowSettings
        from engine.train.losses import LossSettings

        config = session.config
        self.session = session
        self.settings = FlowSettings.from_config(config)
        self.loss_settings = LossSettings.from_config(config.training, False)
        transformer = session.model.unet
        self.guidance_embed = bool(getattr(transformer.params, "guidance_embed", False) or
                                   getattr(transformer.params, "chroma", False))

    def loss(self, latents: torch.Tensor, conditioning: dict[str, Any], batch: dict[str, Any],
             timesteps: torch.Tensor | None = None) -> torch.Tensor:
        from engine.train import flow
        from engine.train.losses import batch_loss, batch_mask, batch_weights
        from engine.train.network_scaling import preserved_target

        session = self.session
        noise, sigmas, noisy = self._noised(latents, batch["noise_seed"], timesteps)
        batch_size, _, height, width = latents.shape
        dtype = session.weight_dtype
        guidance = torch.full((batch_size,), self.settings.guidance_scale, device=latents.device, dtype=dtype) \
            if self.guidance_embed else None
        txt = conditioning["txt"]

        def predict() -> torch.Tensor:
            with session.precision.autocast():
                packed = session.model.unet(
                    img=flow.pack_latents(noisy).to(dtype),
                    img_ids=flow.image_ids(batch_size, (height, width), device=latents.device, dtype=dtype),
                    txt=txt, txt_ids=flow.text_ids(batch_size, txt.shape[1], device=latents.device, dtype=dtype),
                    timesteps=sigmas.to(dtype), y=conditioning.get("y"), guidance=guidance,
                    txt_mask=conditioning.get("txt_mask"))
            unpacked = flow.unpack_latents(packed.float(), (height, width))
            return flow.apply_prediction_type(unpacked, noisy, sigmas, self.settings.model_prediction_type)

        prediction = predict()
        target = preserved_target(session, batch, flow.velocity_target(latents, noise), predict)
        weights = batch_weights(batch, latents.device)
        weighting = flow.loss_weights(self.settings, sigmas)
        if weighting is not None:
            weighting = weighting.to(latents.device, torch.float32)
            weights = weighting if weights is None else weights * weighting
        return batch_loss(prediction, target.float(), sigmas * 1000.0, weights, self.loss_settings, None,
                          mask=batch_mask(batch, latents.device))

    def _noised(self, latents: torch.Tensor, seeds: list[int],
                timesteps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from engine.train import flow

        settings = self.settings
        sample_shape = (1, *latents.shape[1:])
        hw = tuple(latents.shape[-2:])

        def draw(generator: torch.Generator) -> tuple[torch.Tensor, ...]:
            drawn = (flow.flow_noise(torch.empty(sample_shape), generator),
                     flow.sample_sigmas(1, settings, hw, generator, "cpu"))
            if not settings.ip_noise_gamma:
                return drawn
            return (*drawn, flow.draw_perturbation(sample_shape, settings.ip_noise_gamma,
                                                   settings.ip_noise_gamma_random_strength, generator))

        noise, sigmas, *perturbation = flow.per_sample_draws(seeds, draw, latents.device)
        if timesteps is not None:  # σ = t/1000, as sd-scripts' validation sets it for SD3 (spec §4.10)
            sigmas = timesteps.to(sigmas.device, torch.float32) / 1000.0
        noise = noise.to(latents.dtype)
        noisy = flow.noisy_input(latents, noise, sigmas, perturbation=perturbation[0] if perturbation else None)
        return noise, sigmas, noisy


def _sd3_objective(session: Session) -> Any:
    from engine.train.sd3_objective import SD3Objective

    return SD3Objective(session)


ObjectiveFactory = Callable[["Session"], Any]
# "sd3" (SD3 / SD3.5): flow matching with an x0 target on the MMDiT (engine.train.sd3_objective, spec §8.4).
OBJECTIVES: dict[str, ObjectiveFactory] = {"ddpm": DiffusionObjective, "flow": FlowObjective, "sd3": _sd3_objective}


def make_objective(session: Session) -> Any:
    """The objective of the session's model family."""
    return OBJECTIVES[family_info(session.model.family).objective](session)
