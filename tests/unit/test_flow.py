"""The flow-matching objective (engine.train.flow) against the spec's formulas (flux-sd3-spec §2.2, §2.3, §4, §7).

Each expected value is written out here from the spec, independently of the code under test, and drawn from a
generator in the same state as the one handed to it, so a test fails if a formula or the order of draws changes.
Packing, ids and the sampling schedule are also compared with diffusers' FLUX pipeline and scheduler.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.train.flow import (
    FlowSettings,
    apply_prediction_type,
    flow_noise,
    flux_shift_mu,
    image_ids,
    inference_schedule,
    loss_weighting,
    loss_weights,
    noisy_input,
    pack_latents,
    sample_sigmas,
    sigma_table,
    text_ids,
    unpack_latents,
    velocity_target,
)

B = 64  # enough draws to see a formula's shape, few enough to stay instant
T = 1000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def next_draw(generator: torch.Generator) -> float:
    """A draw that tells whether two generators were advanced by the same amount."""
    return torch.rand((), generator=generator).item()


def spec_table(shift: float) -> torch.Tensor:
    """Spec §4.1: t_k = k for k = 1000…1, σ_k = s·(t_k/1000) / (1 + (s − 1)·t_k/1000), in float64."""
    t = torch.tensor([float(k) for k in range(T, 0, -1)], dtype=torch.float64) / T
    return shift * t / (1 + (shift - 1) * t)


def spec_mu(tokens: float) -> float:
    """Spec §4.2: μ = m·L + b, m = (1.15 − 0.5)/(4096 − 256), b = 0.5 − 256·m."""
    m = (1.15 - 0.5) / (4096 - 256)
    return m * tokens + (0.5 - 256 * m)


# --- settings -----------------------------------------------------------------------------------------------------


def test_settings_defaults_and_unknown_names() -> None:
    settings = FlowSettings()
    assert (settings.timestep_sampling, settings.discrete_flow_shift, settings.weighting_scheme) == ("sigma", 3.0,
                                                                                                     "uniform")
    assert settings.model_prediction_type == "raw"  # not sd-scripts' sigma_scaled (spec §4.4)
    for field, bad in (("timestep_sampling", "logit"), ("weighting_scheme", "snr"),
                       ("model_prediction_type", "eps")):
        with pytest.raises(ValueError, match=f"flow.{field}"):
            FlowSettings(**{field: bad})
    with pytest.raises(ValueError, match="discrete_flow_shift"):
        FlowSettings(discrete_flow_shift=0.0)


def test_settings_from_config_reads_flow_and_training() -> None:
    flow = SimpleNamespace(timestep_sampling="flux_shift", sigmoid_scale=1.5, discrete_flow_shift=3.1582,
                           model_prediction_type="additive", weighting_scheme="mode", logit_mean=0.1, logit_std=0.9,
                           mode_scale=1.1, guidance_scale=1.0)
    training = SimpleNamespace(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, noise_offset=0.05)
    settings = FlowSettings.from_config(SimpleNamespace(flow=flow, training=training))
    assert settings == FlowSettings(**vars(flow), ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)


def test_settings_from_a_real_run_config() -> None:
    from engine.config.schema import RunConfig

    if "flow" not in RunConfig.model_fields:
        pytest.skip("RunConfig has no flow section yet (config part of issue 12)")
    config = RunConfig()
    settings = FlowSettings.from_config(config)
    assert settings.timestep_sampling == config.flow.timestep_sampling
    assert settings.guidance_scale == config.flow.guidance_scale
    assert settings.ip_noise_gamma == config.training.ip_noise_gamma


# --- σ table and σ sampling (spec §4.1, §4.2) ---------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0, 3.1582])
def test_sigma_table_is_the_shifted_scheduler_table(shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    table = sigma_table(shift)
    torch.testing.assert_close(table.double(), spec_table(shift), rtol=0, atol=1e-6)
    assert torch.equal(table, FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift).sigmas)
    assert table[0] == 1.0 and bool((table[1:] < table[:-1]).all())  # descending: index 0 is pure noise


def test_sigma_mode_uniform_indexes_the_table() -> None:
    settings = FlowSettings(discrete_flow_shift=3.0)
    sigmas = sample_sigmas(B, settings, (64, 64), gen(1), "cpu")
    reference = gen(1)
    u = torch.rand(B, generator=reference)
    expected = spec_table(3.0)[torch.floor(u.double() * T).long()]
    torch.testing.assert_close(sigmas.double(), expected, rtol=0, atol=1e-6)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (B,)


def test_sigma_mode_logit_normal_density() -> None:
    settings = FlowSettings(weighting_scheme="logit_normal", logit_mean=0.4, logit_std=1.3, discrete_flow_shift=2.0)
    sigmas = sample_sigmas(B, settings, (64, 64), gen(2), "cpu")
    reference = gen(2)
    u = torch.sigmoid(torch.normal(0.4, 1.3, (B,), generator=reference))  # as diffusers' density draws it
    expected = spec_table(2.0)[torch.floor(u.double() * T).long()]
    # An index may differ by one where u·1000 lies within float rounding of an integer.
    assert (sigmas.double() - expected).abs().max() < 3e-3
    assert (sigmas.double() - expected).abs().lt(1e-6).float().mean() > 0.95


def test_sigma_mode_mode_density() -> None:
    settings = FlowSettings(weighting_scheme="mode", mode_scale=1.29, discrete_flow_shift=1.0)
    sigmas = sample_sigmas(B, settings, (64, 64), gen(3), "cpu")
    reference = gen(3)
    u0 = torch.rand(B, generator=reference).double()
    u = 1 - u0 - 1.29 * (torch.cos(math.pi * u0 / 2) ** 2 - 1 + u0)
    expected = spec_table(1.0)[torch.floor(u * T).long()]
    assert (sigmas.double() - expected).abs().max() < 2e-3


def test_sigma_mode_index_stays_in_the_table_at_u_equal_one() -> None:
    # mode density with u0 = 0 gives u = 1, one past the table in sd-scripts; a large mode_scale pushes u above 1.
    settings = FlowSettings(weighting_scheme="mode", mode_scale=5.0)
    sigmas = sample_sigmas(4096, settings, (8, 8), gen(4), "cpu")
    assert bool(((sigmas > 0) & (sigmas <= 1)).all())


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_only_schemes_draw_uniformly(scheme: str) -> None:
    plain = sample_sigmas(B, FlowSettings(), (64, 64), gen(5), "cpu")
    assert torch.equal(sample_sigmas(B, FlowSettings(weighting_scheme=scheme), (64, 64), gen(5), "cpu"), plain)


def test_uniform_and_sigmoid_modes() -> None:
    uniform = sample_sigmas(B, FlowSettings(timestep_sampling="uniform", discrete_flow_shift=5.0), (64, 64), gen(6),
                            "cpu")
    assert torch.equal(uniform, torch.rand(B, generator=gen(6)))  # no shift, no table
    sigmoid = sample_sigmas(B, FlowSettings(timestep_sampling="sigmoid", sigmoid_scale=2.0, discrete_flow_shift=5.0),
                            (64, 64), gen(7), "cpu")
    torch.testing.assert_close(sigmoid, torch.sigmoid(2.0 * torch.randn(B, generator=gen(7))))


def test_shift_mode() -> None:
    s = 3.1582
    sigmas = sample_sigmas(B, FlowSettings(timestep_sampling="shift", sigmoid_scale=1.5, discrete_flow_shift=s),
                           (64, 64), gen(8), "cpu")
    u = torch.sigmoid(1.5 * torch.randn(B, generator=gen(8)).double())
    torch.testing.assert_close(sigmas.double(), s * u / (1 + (s - 1) * u), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("pixels", "mu", "shift"), [((512, 512), 0.630, 1.878), ((768, 768), 0.847, 2.332),
                                                     ((1024, 1024), 1.150, 3.158), ((1536, 1536), 2.017, 7.513),
                                                     ((1024, 768), 0.9767, 2.656)])
def test_flux_shift_worked_values(pixels: tuple[int, int], mu: float, shift: float) -> None:
    latent_hw = (pixels[0] // 8, pixels[1] // 8)
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    assert flux_shift_mu(tokens) == pytest.approx(spec_mu(tokens), abs=1e-12)
    assert flux_shift_mu(tokens) == pytest.approx(mu, abs=1e-3)
    assert math.exp(flux_shift_mu(tokens)) == pytest.approx(shift, abs=1e-3)
    # σ = e^μ/(e^μ + 1/u − 1) with u = sigmoid(a·n): the `shift` mode with s = e^μ (spec §4.2).
    settings = FlowSettings(timestep_sampling="flux_shift", sigmoid_scale=1.2, discrete_flow_shift=9.0)
    sigmas = sample_sigmas(B, settings, latent_hw, gen(9), "cpu").double()
    u = torch.sigmoid(1.2 * torch.randn(B, generator=gen(9)).double())
    e_mu = math.exp(spec_mu(tokens))
    torch.testing.assert_close(sigmas, e_mu / (e_mu + 1 / u - 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(sigmas, e_mu * u / (1 + (e_mu - 1) * u), rtol=0, atol=1e-6)


def test_flux_shift_refuses_odd_latents() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        sample_sigmas(2, FlowSettings(timestep_sampling="flux_shift"), (63, 64), gen(), "cpu")


@pytest.mark.parametrize("mode", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
def test_each_mode_draws_per_sample_and_deterministically(mode: str) -> None:
    settings = FlowSettings(timestep_sampling=mode, weighting_scheme="logit_normal")
    first, second = gen(10), gen(10)
    together = sample_sigmas(3, settings, (32, 48), first, "cpu")
    assert torch.equal(together, sample_sigmas(3, settings, (32, 48), second, "cpu"))
    assert next_draw(first) == next_draw(second)
    assert bool(((together >= 0) & (together <= 1)).all())


# --- noisy input, target, prediction types, weights (spec §4.3-§4.5) ---------------------------------------------


@pytest.fixture
def latents() -> torch.Tensor:
    return torch.randn(3, 16, 8, 12, generator=gen(123)) * 2 + 0.5


def test_noise_is_plain_randn(latents: torch.Tensor) -> None:
    assert torch.equal(flow_noise(latents, gen(11)), torch.randn(latents.shape, generator=gen(11)))


def test_noisy_input_interpolates(latents: torch.Tensor) -> None:
    noise = torch.randn(latents.shape, generator=gen(12))
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    noisy = noisy_input(latents, noise, sigmas)
    expected = torch.stack([(1 - s) * x + s * e for s, x, e in zip(sigmas.tolist(), latents, noise, strict=True)])
    torch.testing.assert_close(noisy, expected)
    assert torch.equal(noisy[0], latents[0]) and torch.equal(noisy[2], noise[2])  # σ = 0 clean, σ = 1 pure noise


@pytest.mark.parametrize("random_strength", [False, True])
def test_noisy_input_with_input_perturbation(latents: torch.Tensor, random_strength: bool) -> None:
    noise = torch.randn(latents.shape, generator=gen(13))
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    generator, reference = gen(14), gen(14)
    noisy = noisy_input(latents, noise, sigmas, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=random_strength,
                        generator=generator)
    # x_σ = (1 − σ)·x0 + σ·(ε + γ·ξ), γ = U(0, 1)·γ₀ with random strength (one draw, before ξ)
    gamma = 0.1 * torch.rand((), generator=reference).item() if random_strength else 0.1
    xi = torch.randn(latents.shape, generator=reference)
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * latents + s * (noise + gamma * xi))
    assert next_draw(generator) == next_draw(reference)
    with pytest.raises(ValueError, match="generator"):
        noisy_input(latents, noise, sigmas, ip_noise_gamma=0.1)


def test_velocity_target_is_noise_minus_latents(latents: torch.Tensor) -> None:
    noise = torch.randn(latents.shape, generator=gen(15))
    assert torch.equal(velocity_target(latents, noise), noise - latents)


def test_prediction_types(latents: torch.Tensor) -> None:
    noise = torch.randn(latents.shape, generator=gen(16))
    pred = torch.randn(latents.shape, generator=gen(17))
    sigmas = torch.tensor([0.1, 0.5, 0.8])
    noisy = noisy_input(latents, noise, sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.equal(apply_prediction_type(pred, noisy, sigmas, "raw"), pred)
    torch.testing.assert_close(apply_prediction_type(pred, noisy, sigmas, "additive"), pred + noisy)
    torch.testing.assert_close(apply_prediction_type(pred, noisy, sigmas, "sigma_scaled"), noisy - s * pred)
    # With the exact velocity as prediction, sigma_scaled returns x0, not v (spec §4.4: mismatched quantities).
    exact = velocity_target(latents, noise)
    torch.testing.assert_close(apply_prediction_type(exact, noisy, sigmas, "sigma_scaled"), latents)


def test_loss_weighting_formulas() -> None:
    sigmas = torch.tensor([0.05, 0.25, 0.5, 0.75, 1.0])
    torch.testing.assert_close(loss_weighting("sigma_sqrt", sigmas), 1 / sigmas**2)  # σ⁻², despite the name
    torch.testing.assert_close(loss_weighting("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    for scheme in ("uniform", "none", "logit_normal", "mode"):
        assert torch.equal(loss_weighting(scheme, sigmas), torch.ones(5))
    assert bool(torch.isfinite(loss_weighting("sigma_sqrt", torch.tensor([0.0]))).all())  # uniform can draw σ = 0


def test_loss_weights_apply_only_with_sigma_scaled() -> None:
    sigmas = torch.tensor([0.2, 0.6])
    for kind in ("raw", "additive"):
        assert loss_weights(FlowSettings(model_prediction_type=kind, weighting_scheme="sigma_sqrt"), sigmas) is None
    scaled = FlowSettings(model_prediction_type="sigma_scaled", weighting_scheme="cosmap")
    torch.testing.assert_close(loss_weights(scaled, sigmas), loss_weighting("cosmap", sigmas))


# --- packing and ids (spec §2.2, §2.3) ----------------------------------------------------------------------------


def test_pack_channel_order_and_round_trip() -> None:
    latents = torch.randn(2, 16, 6, 10, generator=gen(18))
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 3 * 5, 64)
    for b, i, j, c, ph, pw in [(0, 0, 0, 0, 0, 0), (1, 2, 4, 15, 1, 1), (0, 1, 3, 7, 1, 0), (1, 0, 2, 3, 0, 1)]:
        # token index row-major over the (h/2, w/2) grid; channel c·4 + ph·2 + pw
        assert tokens[b, i * 5 + j, c * 4 + ph * 2 + pw] == latents[b, c, 2 * i + ph, 2 * j + pw]
    assert torch.equal(unpack_latents(tokens, (6, 10)), latents)
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack_latents(tokens, (6, 12))


def test_pack_matches_diffusers() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 12, 8, generator=gen(19))
    tokens = pack_latents(latents)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 16, 12, 8))
    # diffusers unpacks from the pixel size and the VAE's factor 8
    assert torch.equal(unpack_latents(tokens, (12, 8)), FluxPipeline._unpack_latents(tokens, 96, 64, 8))


def test_image_ids_and_text_ids() -> None:
    from diffusers import FluxPipeline

    ids = image_ids(2, (12, 8))
    assert ids.shape == (2, 6 * 4, 3)
    assert torch.equal(ids[1], FluxPipeline._prepare_latent_image_ids(2, 6, 4, "cpu", torch.float32))
    # spec §10 worked check: 1024×768 → latent 96×128 (h×w) → 3072 tokens, img_ids[k] = (0, k // 64, k % 64)
    worked = image_ids(1, (96, 128))[0]
    k = torch.arange(3072, dtype=torch.float32)
    assert torch.equal(worked, torch.stack([torch.zeros(3072), torch.div(k, 64, rounding_mode="floor"), k % 64], 1))
    assert torch.equal(text_ids(2, 7), torch.zeros(2, 7, 3))
    assert image_ids(1, (4, 4), dtype=torch.bfloat16).dtype == torch.bfloat16


# --- sampling schedule (spec §7) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "tokens"), [(1, 1024), (4, 256), (20, 1024), (28, 4096), (50, 3072)])
def test_inference_schedule_is_bfl_get_schedule(steps: int, tokens: int) -> None:
    schedule = inference_schedule(steps, tokens)
    assert len(schedule) == steps + 1
    assert schedule[0] == 1.0 and schedule[-1] == 0.0
    assert all(a > b for a, b in zip(schedule, schedule[1:], strict=False))
    e_mu = math.exp(spec_mu(tokens))
    linear = [1 - k / steps for k in range(steps + 1)]
    expected = [e_mu / (e_mu + 1 / t - 1) if t > 0 else 0.0 for t in linear]
    assert schedule == pytest.approx(expected, abs=1e-12)
    assert inference_schedule(steps, tokens, shift=False) == pytest.approx(linear, abs=1e-12)


@pytest.mark.parametrize(("steps", "tokens"), [(4, 256), (20, 1024), (28, 4096)])
def test_inference_schedule_matches_diffusers_flux_pipeline(steps: int, tokens: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    # as FluxPipeline.__call__ does: sigmas linspace(1, 1/n, n), μ from calculate_shift of the token count
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert flux_shift_mu(tokens) == pytest.approx(mu, abs=1e-12)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(torch.tensor(inference_schedule(steps, tokens), dtype=torch.float32),
                               scheduler.sigmas, rtol=0, atol=1e-6)
