"""SD3 sampling during training (engine.train.sd3_sampling) against diffusers' StableDiffusion3Pipeline.

The schedule is compared with diffusers' FlowMatchEulerDiscreteScheduler(shift) and with spec §8.8's formula; the
Euler/CFG loop with one written out here; and whole samples with the pipeline itself (prompt embeddings passed as
tensors, no text encoders, output_type="latent": both sides stay in the normalized latent space training uses),
first on a tiny diffusers SD3Transformer2DModel, then on the tiny MMDiT of each variant converted to diffusers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.models.encoded_text import EncodedText
from engine.train.sd3_sampling import (
    DEFAULT_CFG_SCALE,
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    denoise,
    inference_sigmas,
    request_latents,
    sample_latents,
)

W, H = 96, 64  # → latent 8×12, 4×6 patches: inside a 16×16 pos_embed table
CONTEXT, POOLED, TOKENS = 32, 24, 10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompt(seed: int, context: int = CONTEXT, pooled: int = POOLED) -> EncodedText:
    generator = gen(seed)
    states = torch.randn(1, TOKENS, context, generator=generator)
    return EncodedText(states, torch.randn(1, pooled, generator=generator))


def scheduler(shift: float = DEFAULT_SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


class Recorder(torch.nn.Module):
    """A small real module with the MMDiT's call signature (x, t, y, context), recording each call."""

    def __init__(self, zero: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.zero, self.calls = zero, []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append({"x": x.clone(), "t": t.clone(), "y": y, "context": context})
        if self.zero:
            return torch.zeros_like(x)
        scale = (t / 1000).view(-1, 1, 1, 1) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + y.mean(1).view(-1, 1, 1, 1)
        return self.conv(x) * scale


# --- schedule -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 30])
def test_sigmas_are_diffusers_scheduler_sigmas(steps: int, shift: float) -> None:
    reference = scheduler(shift)
    reference.set_timesteps(steps)
    sigmas = inference_sigmas(steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas, reference.sigmas)


def test_sigmas_follow_spec_8_8() -> None:
    """σ(t) = 3·(t/1000)/(1 + 2·t/1000); linspace(1000·σ(1000), 1000·σ(1), steps) mapped through σ again, then 0."""
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return 3 * (t / 1000) / (1 + 2 * t / 1000)

    sigma_max, sigma_min = (sigma(torch.tensor(t, dtype=torch.float64)) for t in (1000.0, 1.0))
    expected = torch.cat([sigma(torch.linspace(1000 * sigma_max, 1000 * sigma_min, 30, dtype=torch.float64)),
                          torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(inference_sigmas(30), expected.float(), atol=1e-6, rtol=0)
    assert inference_sigmas(30)[0] == 1.0 and abs(inference_sigmas(30)[-2].item() - 0.00893) < 1e-5


def test_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        inference_sigmas(0)


# --- the Euler / CFG loop -----------------------------------------------------------------------------------------


def test_denoise_is_euler_with_cfg_negative_first() -> None:
    torch.manual_seed(0)
    model = Recorder()
    noise = torch.randn(1, 16, 4, 6, generator=gen(1))
    negative, positive = prompt(2), prompt(3)
    context = torch.cat([negative.hidden_states, positive.hidden_states])
    y = torch.cat([negative.pooled, positive.pooled])
    sigmas = inference_sigmas(4)
    out = denoise(model, noise, context, y, sigmas, cfg_scale=5.0, dtype=torch.float32)
    calls = list(model.calls)  # the replay below calls the model again
    assert len(calls) == 4
    x = noise.clone()
    for i, call in enumerate(calls):
        assert torch.equal(call["x"], torch.cat([x, x]))
        assert torch.equal(call["t"], torch.full((2,), sigmas[i].item()) * 1000)  # t on 0..1000
        assert call["context"] is context and call["y"] is y
        with torch.no_grad():
            pred = model(x=torch.cat([x, x]), t=call["t"], y=y, context=context)
        v = pred[0:1] + 5.0 * (pred[1:2] - pred[0:1])  # negative + scale·(positive − negative)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    torch.testing.assert_close(out, x)


def test_denoise_without_cfg_runs_the_positive_prompt_alone() -> None:
    model = Recorder()
    positive = prompt(3)
    denoise(model, torch.randn(1, 16, 4, 6, generator=gen(1)), positive.hidden_states, positive.pooled,
            inference_sigmas(3), cfg_scale=1.0, dtype=torch.float32)
    assert len(model.calls) == 3 and all(call["x"].shape[0] == 1 for call in model.calls)
    with pytest.raises(ValueError, match="negative prompt"):
        denoise(model, torch.randn(1, 16, 4, 6), positive.hidden_states, positive.pooled, inference_sigmas(3),
                cfg_scale=7.5, dtype=torch.float32)


def test_sample_latents_noise_size_and_dtype() -> None:
    """A model that predicts zero velocity leaves the initial noise: randn [1, 16, h/8, w/8] from the seed."""
    model = Recorder(zero=True)
    out = sample_latents(model, prompt(1), prompt(2), width=100, height=70, steps=3, seed=42, device="cpu",
                         dtype=torch.bfloat16)
    assert torch.equal(out, torch.randn(1, 16, 8, 12, generator=gen(42)))  # 100×70 → 96×64 pixels
    assert out.dtype == torch.float32 and model.calls[0]["x"].dtype == torch.bfloat16
    assert model.calls[0]["context"].dtype == torch.bfloat16 and model.calls[0]["x"].shape[0] == 2


def test_sample_latents_refuses_missing_inputs() -> None:
    model = Recorder()
    with pytest.raises(ValueError, match="negative prompt"):
        sample_latents(model, prompt(1), None, width=W, height=H, steps=2, seed=0, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="pooled"):
        sample_latents(model, EncodedText(prompt(1).hidden_states, None), prompt(2), width=W, height=H, steps=2,
                       seed=0, device="cpu", dtype=torch.float32)


def test_defaults_are_sd_scripts() -> None:
    assert (DEFAULT_STEPS, DEFAULT_CFG_SCALE, DEFAULT_SHIFT) == (30, 7.5, 3.0)


def test_request_latents_fits_the_sampling_registry() -> None:
    torch.manual_seed(0)
    model = Recorder()
    parts = SimpleNamespace(unet=model)
    request = SimpleNamespace(width=W, height=H, steps=3, scale=4.0)
    settings = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    out = request_latents(parts, request, prompt(1), prompt(2), 9, settings)
    expected = sample_latents(model, prompt(1), prompt(2), width=W, height=H, steps=3, cfg_scale=4.0, seed=9,
                              device="cpu", dtype=torch.float32)
    assert torch.equal(out, expected)


# --- against diffusers' StableDiffusion3Pipeline ------------------------------------------------------------------


class DiffusersAsMMDiT(torch.nn.Module):
    """Calls a diffusers SD3Transformer2DModel with the MMDiT's signature (x, t, y, context)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=y,
                                return_dict=False)[0]


def pipeline_latents(transformer: torch.nn.Module, positive: EncodedText, negative: EncodedText, *, steps: int,
                     cfg_scale: float, seed: int) -> torch.Tensor:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler(DEFAULT_SHIFT), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=positive.hidden_states, pooled_prompt_embeds=positive.pooled,
                negative_prompt_embeds=negative.hidden_states, negative_pooled_prompt_embeds=negative.pooled,
                width=W, height=H, num_inference_steps=steps, guidance_scale=cfg_scale,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images


@pytest.mark.parametrize(("steps", "cfg_scale"), [(5, 4.0), (3, DEFAULT_CFG_SCALE)])
def test_same_latents_as_diffusers_pipeline(steps: int, cfg_scale: float) -> None:
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=CONTEXT, caption_projection_dim=32, pooled_projection_dim=POOLED, out_channels=16,
            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
    positive, negative = prompt(1), prompt(2)
    expected = pipeline_latents(transformer, positive, negative, steps=steps, cfg_scale=cfg_scale, seed=7)
    ours = sample_latents(DiffusersAsMMDiT(transformer), positive, negative, width=W, height=H, steps=steps,
                          cfg_scale=cfg_scale, seed=7, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["medium", "5-medium", "5-large"])
def test_tiny_mmdit_samples_as_diffusers_pipeline(variant: str) -> None:
    """The tiny MMDiT of each variant, and the same weights converted to diffusers' SD3Transformer2DModel."""
    from diffusers import SD3Transformer2DModel

    from engine.models.sd3.convert import diffusers_config, sai_to_diffusers
    from engine.models.sd3.mmdit import MMDiT
    from engine.models.sd3.params import tiny_params

    params = tiny_params(variant)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mmdit = MMDiT(params).eval()
    converted, unused = sai_to_diffusers(mmdit.state_dict())
    assert not unused
    transformer = SD3Transformer2DModel(**diffusers_config(params)).eval()
    transformer.load_state_dict(converted)
    positive = prompt(1, params.context_in_dim, params.adm_in_channels)
    negative = prompt(2, params.context_in_dim, params.adm_in_channels)
    expected = pipeline_latents(transformer, positive, negative, steps=4, cfg_scale=DEFAULT_CFG_SCALE, seed=3)
    ours = sample_latents(mmdit, positive, negative, width=W, height=H, steps=4, cfg_scale=DEFAULT_CFG_SCALE, seed=3,
                          device="cpu", dtype=torch.float32)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0)  # measured: at most 5.5e-6 (latents up to 4.7)
