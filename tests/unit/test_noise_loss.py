"""Noise, timesteps, targets and loss (engine.train.noise / engine.train.losses) against spec §6's formulas.

Each expected value is computed here, independently, from a generator in the same state as the one handed to
the code under test, so a test fails if an option changes its formula or its order of random draws.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.config.sections_training import TrainingSection
from engine.train.losses import (
    LossSettings,
    batch_loss,
    element_loss,
    huber_c,
    snr_table,
    snr_weights,
)
from engine.train.noise import (
    NoiseSettings,
    make_noise_scheduler,
    noisy_latents,
    sample_noise,
    sample_timesteps,
    training_target,
)

B, C, H, W = 4, 4, 16, 12
T = 1000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def latents() -> torch.Tensor:
    # Different mean per image and channel, so the adaptive noise offset has something to scale with.
    shift = torch.linspace(-1.5, 1.5, B * C).view(B, C, 1, 1)
    return torch.randn(B, C, H, W, generator=gen(123)) + shift


@pytest.fixture(scope="module")
def eps_scheduler():
    return make_noise_scheduler(v_prediction=False, zero_terminal_snr=False)


@pytest.fixture(scope="module")
def ztsnr_scheduler():
    return make_noise_scheduler(v_prediction=True, zero_terminal_snr=True)


def alphas_bar(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.double()


def next_draw(generator: torch.Generator) -> float:
    """A draw that tells whether two generators were advanced by the same amount."""
    return torch.rand((), generator=generator).item()


# --- scheduler ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v_prediction", [False, True])
def test_scheduler_has_sd_scripts_betas(v_prediction: bool) -> None:
    scheduler = make_noise_scheduler(v_prediction=v_prediction, zero_terminal_snr=False)
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2  # scaled_linear
    torch.testing.assert_close(scheduler.betas, expected)
    assert scheduler.config.num_train_timesteps == T
    assert scheduler.config.clip_sample is False
    assert scheduler.config.prediction_type == ("v_prediction" if v_prediction else "epsilon")


def test_zero_terminal_snr_follows_the_spec_rescale(eps_scheduler, ztsnr_scheduler) -> None:
    root = alphas_bar(eps_scheduler).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    expected = root**2
    got = ztsnr_scheduler.alphas_cumprod
    assert got[-1].item() == 0.0
    torch.testing.assert_close(got[0], eps_scheduler.alphas_cumprod[0])
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-4)
    # β = 1 − ᾱ_t/ᾱ_{t−1}: the last step destroys the signal completely.
    assert ztsnr_scheduler.betas[-1].item() == pytest.approx(1.0)


def test_snr_table_is_the_trained_schedule(eps_scheduler, ztsnr_scheduler) -> None:
    for scheduler in (eps_scheduler, ztsnr_scheduler):
        a = alphas_bar(scheduler)
        table = snr_table(scheduler)
        torch.testing.assert_close(table.double(), a / (1 - a), rtol=1e-5, atol=0)
        assert torch.isfinite(table).all()
    assert snr_table(ztsnr_scheduler)[-1].item() == 0.0


# --- the default path -----------------------------------------------------------------------------------------------


def test_defaults_reproduce_plain_add_noise_and_mse(latents, eps_scheduler) -> None:
    settings = NoiseSettings.from_config(TrainingSection())
    loss_settings = LossSettings.from_config(TrainingSection(), v_prediction=False)
    g, ref = gen(1), gen(1)

    noise = sample_noise(latents, settings, g)
    timesteps = sample_timesteps(B, settings, "cpu", g)
    x_t = noisy_latents(eps_scheduler, latents, noise, timesteps, settings, g)
    target = training_target(eps_scheduler, latents, noise, timesteps, v_prediction=False)

    expected_noise = torch.randn(latents.shape, generator=ref)
    expected_t = torch.randint(0, T, (B,), generator=ref)
    assert torch.equal(noise, expected_noise)
    assert torch.equal(timesteps, expected_t)
    assert torch.equal(x_t, eps_scheduler.add_noise(latents, expected_noise, expected_t))
    assert torch.equal(target, expected_noise)
    assert next_draw(g) == next_draw(ref)

    pred = torch.randn(latents.shape, generator=gen(2))
    loss = batch_loss(pred, target, timesteps, torch.ones(B), loss_settings, snr_table(eps_scheduler))
    torch.testing.assert_close(loss, F.mse_loss(pred, expected_noise))


def test_noise_keeps_the_latents_dtype(latents) -> None:
    noise = sample_noise(latents.half(), NoiseSettings(noise_offset=0.1, adaptive_noise_scale=0.5), gen())
    assert noise.dtype == torch.float16 and noise.shape == latents.shape


# --- noise options --------------------------------------------------------------------------------------------------


def test_noise_offset_adds_one_constant_per_image_and_channel(latents) -> None:
    g, ref = gen(3), gen(3)
    noise = sample_noise(latents, NoiseSettings(noise_offset=0.1), g)
    base = torch.randn(latents.shape, generator=ref)
    offset = torch.randn(B, C, 1, 1, generator=ref)
    torch.testing.assert_close(noise, base + 0.1 * offset)
    assert next_draw(g) == next_draw(ref)


def test_noise_offset_random_strength_scales_by_one_uniform_draw(latents) -> None:
    g, ref = gen(4), gen(4)
    noise = sample_noise(latents, NoiseSettings(noise_offset=0.1, noise_offset_random_strength=True), g)
    base = torch.randn(latents.shape, generator=ref)
    strength = torch.rand((), generator=ref) * 0.1
    offset = torch.randn(B, C, 1, 1, generator=ref)
    torch.testing.assert_close(noise, base + strength * offset)


@pytest.mark.parametrize("scale", [0.5, -1.0])
def test_adaptive_noise_scale_grows_the_offset_with_the_latent_mean(latents, scale: float) -> None:
    g, ref = gen(5), gen(5)
    noise = sample_noise(latents, NoiseSettings(noise_offset=0.1, adaptive_noise_scale=scale), g)
    base = torch.randn(latents.shape, generator=ref)
    offset = torch.randn(B, C, 1, 1, generator=ref)
    means = latents.mean(dim=(2, 3), keepdim=True).abs()
    effective = torch.clamp(0.1 + scale * means, min=0.0)
    torch.testing.assert_close(noise, base + effective * offset)
    if scale < 0:  # the clamp at 0 is exercised: some channels get no offset at all
        assert (effective == 0).any()
        assert torch.equal((noise - base) * (effective == 0), torch.zeros_like(noise))


def multires_by_hand(noise: torch.Tensor, iterations: int, discount: float, g: torch.Generator) -> torch.Tensor:
    """Spec §6 step 3, written out: r ~ U(2, 4), level size ⌊side/r^i⌋ (≥ 1), bilinear up, ×δ^i, stop at 1."""
    height, width = noise.shape[2:]
    for i in range(iterations):
        r = 2.0 + 2.0 * torch.rand((), generator=g).item()
        h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
        level = torch.randn(noise.shape[0], noise.shape[1], h, w, generator=g)
        noise = noise + F.interpolate(level, size=(height, width), mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_multires_noise_is_the_pyramid_with_unit_std(latents, iterations: int) -> None:
    g, ref = gen(6), gen(6)
    settings = NoiseSettings(multires_noise_iterations=iterations, multires_noise_discount=0.3)
    noise = sample_noise(latents, settings, g)
    expected = multires_by_hand(torch.randn(latents.shape, generator=ref), iterations, 0.3, ref)
    assert noise.shape == latents.shape
    torch.testing.assert_close(noise, expected)
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)
    assert next_draw(g) == next_draw(ref)  # 10 iterations stop early at 1x1, after the same draws


def test_multires_level_zero_adds_a_second_full_size_noise(latents) -> None:
    g, ref = gen(7), gen(7)
    noise = sample_noise(latents, NoiseSettings(multires_noise_iterations=1), g)
    base = torch.randn(latents.shape, generator=ref)
    torch.rand((), generator=ref)  # r is drawn even though level 0 does not use it
    total = base + torch.randn(latents.shape, generator=ref)
    torch.testing.assert_close(noise, total / total.std())


# --- timesteps ------------------------------------------------------------------------------------------------------


def test_timesteps_lie_in_min_max_and_repeat_with_the_seed() -> None:
    settings = NoiseSettings(min_timestep=200, max_timestep=300)
    first = sample_timesteps(5000, settings, "cpu", gen(8))
    assert first.dtype == torch.long
    assert first.min().item() == 200 and first.max().item() == 299  # upper bound exclusive, both ends reached
    assert torch.equal(first, sample_timesteps(5000, settings, "cpu", gen(8)))
    assert not torch.equal(first, sample_timesteps(5000, settings, "cpu", gen(9)))


@pytest.mark.parametrize(("low", "high", "expected"), [(500, 500, 500), (700, 400, 400), (1000, 1000, T - 1)])
def test_min_at_or_above_max_trains_at_max_inside_the_schedule(low: int, high: int, expected: int) -> None:
    g, ref = gen(10), gen(10)
    timesteps = sample_timesteps(3, NoiseSettings(min_timestep=low, max_timestep=high), "cpu", g)
    assert timesteps.tolist() == [expected] * 3
    assert next_draw(g) == next_draw(ref)  # nothing drawn


# --- noisy latents and targets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("random_strength", [False, True])
def test_ip_noise_perturbs_x_t_but_not_the_target(latents, eps_scheduler, random_strength: bool) -> None:
    settings = NoiseSettings(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=random_strength)
    noise = torch.randn(latents.shape, generator=gen(11))
    timesteps = torch.tensor([0, 250, 500, 999])
    g, ref = gen(12), gen(12)
    x_t = noisy_latents(eps_scheduler, latents, noise, timesteps, settings, g)
    gamma = torch.rand((), generator=ref) * 0.1 if random_strength else 0.1
    perturbed = noise + gamma * torch.randn(latents.shape, generator=ref)
    a = eps_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * latents + (1 - a).sqrt() * perturbed)
    assert not torch.allclose(x_t, eps_scheduler.add_noise(latents, noise, timesteps))
    assert torch.equal(training_target(eps_scheduler, latents, noise, timesteps, v_prediction=False), noise)


@pytest.mark.parametrize("ztsnr", [False, True])
def test_v_target_is_sqrt_a_eps_minus_sqrt_one_minus_a_x0(latents, ztsnr: bool) -> None:
    scheduler = make_noise_scheduler(v_prediction=True, zero_terminal_snr=ztsnr)
    noise = torch.randn(latents.shape, generator=gen(13))
    timesteps = torch.tensor([0, 1, 500, 999])
    a = alphas_bar(scheduler)[timesteps].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise.double() - (1 - a).sqrt() * latents.double()
    target = training_target(scheduler, latents, noise, timesteps, v_prediction=True)
    torch.testing.assert_close(target.double(), expected, rtol=1e-5, atol=1e-5)
    if ztsnr:  # pure noise at the last step: v = −x0
        torch.testing.assert_close(target[3], -latents[3])


# --- Huber threshold and element losses -----------------------------------------------------------------------------


def test_huber_c_constant_and_exponential_schedules(eps_scheduler) -> None:
    timesteps = torch.tensor([0, 1, 500, 999])
    constant = LossSettings(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=1.5)
    torch.testing.assert_close(huber_c(constant, timesteps, eps_scheduler), torch.full((4,), 0.3))
    exponential = LossSettings(loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=1.5)
    expected = torch.tensor([1.5 * 0.2 ** (t / T) for t in timesteps.tolist()])
    torch.testing.assert_close(huber_c(exponential, timesteps, eps_scheduler), expected)


@pytest.mark.parametrize("ztsnr", [False, True])
def test_huber_c_snr_schedule(ztsnr: bool) -> None:
    scheduler = make_noise_scheduler(v_prediction=ztsnr, zero_terminal_snr=ztsnr)
    settings = LossSettings(loss_type="smooth_l1", huber_schedule="snr", huber_c=0.2, huber_scale=3.0,
                            v_prediction=ztsnr)
    timesteps = torch.tensor([0, 100, 500, 998])
    a = alphas_bar(scheduler)[timesteps]
    sigma = ((1 - a) / a).sqrt()
    expected = (1 - 0.2) / (1 + sigma) ** 2 + 0.2  # huber_scale is not applied
    torch.testing.assert_close(huber_c(settings, timesteps, scheduler).double(), expected, rtol=1e-5, atol=1e-6)
    if ztsnr:  # σ = inf at the last step: the limit, huber_c itself
        assert huber_c(settings, torch.tensor([T - 1]), scheduler).item() == pytest.approx(0.2)


def test_element_losses_match_their_formulas() -> None:
    pred = torch.randn(B, C, H, W, generator=gen(14)) * 3
    target = torch.randn(B, C, H, W, generator=gen(15))
    c = torch.tensor([0.05, 0.1, 0.5, 2.0])
    d = (pred - target).double()
    cc = c.double().view(-1, 1, 1, 1)
    expected = {
        "l2": d**2,
        "l1": d.abs(),
        "huber": 2 * cc * ((d**2 + cc**2).sqrt() - cc),
        "smooth_l1": 2 * ((d**2 + cc**2).sqrt() - cc),
    }
    for loss_type, value in expected.items():
        torch.testing.assert_close(element_loss(pred, target, loss_type, c).double(), value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="threshold"):
        element_loss(pred, target, "huber")


def test_element_loss_is_computed_in_float32() -> None:
    pred, target = torch.randn(2, 4, 8, 8, generator=gen(21)).half(), torch.zeros(2, 4, 8, 8, dtype=torch.float16)
    got = element_loss(pred, target, "l2")
    assert got.dtype == torch.float32
    assert torch.equal(got, pred.float() ** 2)  # squared in float32, not squared in fp16 then widened


def test_huber_is_quadratic_near_zero_and_linear_far_away() -> None:
    c = torch.tensor([0.1])
    small = element_loss(torch.full((1, 1, 1, 1), 1e-2), torch.zeros(1, 1, 1, 1), "huber", c)
    large = element_loss(torch.full((1, 1, 1, 1), 100.0), torch.zeros(1, 1, 1, 1), "huber", c)
    assert small.item() == pytest.approx(1e-4, rel=1e-2)  # ≈ d²
    assert large.item() == pytest.approx(2 * 0.1 * 100.0, rel=1e-3)  # ≈ 2c·|d|


# --- SNR weights ------------------------------------------------------------------------------------------------


def snr_by_hand(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_bar(scheduler)[timesteps]
    return a / (1 - a)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_min_snr_gamma_weights(eps_scheduler, v_prediction: bool) -> None:
    timesteps = torch.tensor([0, 10, 100, 999])
    snr = snr_by_hand(eps_scheduler, timesteps)
    settings = LossSettings(min_snr_gamma=5.0, v_prediction=v_prediction)
    expected = snr.clamp(max=5.0) / (snr + 1 if v_prediction else snr)
    got = snr_weights(timesteps, settings, snr_table(eps_scheduler))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_scale_v_pred_like_noise_pred_weight(eps_scheduler) -> None:
    timesteps = torch.tensor([0, 10, 100, 999])
    capped = snr_by_hand(eps_scheduler, timesteps).clamp(max=1000.0)
    settings = LossSettings(scale_v_pred_loss_like_noise_pred=True, v_prediction=True)
    got = snr_weights(timesteps, settings, snr_table(eps_scheduler))
    torch.testing.assert_close(got.double(), capped / (capped + 1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_debiased_estimation_weights(eps_scheduler, v_prediction: bool) -> None:
    timesteps = torch.tensor([0, 10, 100, 999])
    capped = snr_by_hand(eps_scheduler, timesteps).clamp(max=1000.0)
    settings = LossSettings(debiased_estimation_loss=True, v_prediction=v_prediction)
    expected = 1 / (capped + 1) if v_prediction else 1 / capped.sqrt()
    got = snr_weights(timesteps, settings, snr_table(eps_scheduler))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_snr_weights_multiply_and_default_to_one(eps_scheduler) -> None:
    timesteps = torch.tensor([3, 300, 900])
    table = snr_table(eps_scheduler)
    assert torch.equal(snr_weights(timesteps, LossSettings(), table), torch.ones(3))
    parts = [LossSettings(min_snr_gamma=5.0, v_prediction=True),
             LossSettings(scale_v_pred_loss_like_noise_pred=True, v_prediction=True),
             LossSettings(debiased_estimation_loss=True, v_prediction=True)]
    combined = LossSettings(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True,
                            debiased_estimation_loss=True, v_prediction=True)
    product = math.prod(snr_weights(timesteps, part, table) for part in parts)
    torch.testing.assert_close(snr_weights(timesteps, combined, table), product)


def test_zero_terminal_snr_weights_use_limits_not_nan(ztsnr_scheduler) -> None:
    table = snr_table(ztsnr_scheduler)
    last = torch.tensor([T - 1])
    before = torch.tensor([T - 2])

    def weight(**options) -> float:
        return snr_weights(last, LossSettings(**options), table).item()

    assert weight(min_snr_gamma=5.0) == 1.0  # min(SNR, γ)/SNR → 1
    assert weight(min_snr_gamma=5.0, v_prediction=True) == 0.0  # min(SNR, γ)/(SNR + 1) → 0
    assert weight(scale_v_pred_loss_like_noise_pred=True, v_prediction=True) == 0.0
    assert weight(debiased_estimation_loss=True, v_prediction=True) == 1.0
    # 1/√SNR has no limit: documented clamp, the weight of the step before.
    eps_debiased = LossSettings(debiased_estimation_loss=True)
    assert weight(debiased_estimation_loss=True) == snr_weights(before, eps_debiased, table).item()
    assert math.isfinite(weight(debiased_estimation_loss=True))


# --- the whole reduction --------------------------------------------------------------------------------------------


def test_batch_loss_pipeline_with_prior_weights_and_snr_weights(eps_scheduler) -> None:
    pred = torch.randn(B, C, H, W, generator=gen(16))
    target = torch.randn(B, C, H, W, generator=gen(17))
    timesteps = torch.tensor([5, 50, 500, 950])
    prior = torch.tensor([1.0, 0.5, 1.0, 0.5])  # two regularization images at prior_loss_weight 0.5
    settings = LossSettings(loss_type="huber", huber_schedule="constant", huber_c=0.3, min_snr_gamma=5.0)
    c = 0.3
    d = (pred - target).double()
    per_sample = (2 * c * ((d**2 + c**2).sqrt() - c)).mean(dim=(1, 2, 3))
    snr = snr_by_hand(eps_scheduler, timesteps)
    expected = (per_sample * prior.double() * snr.clamp(max=5.0) / snr).mean()
    got = batch_loss(pred, target, timesteps, prior, settings, snr_table(eps_scheduler))
    assert got.dim() == 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_batch_loss_alpha_mask_is_area_resized_and_not_renormalised(eps_scheduler) -> None:
    pred = torch.randn(B, C, H, W, generator=gen(18))
    target = torch.zeros(B, C, H, W)
    timesteps = torch.tensor([1, 2, 3, 4])
    settings, table, ones = LossSettings(), snr_table(eps_scheduler), torch.ones(B)
    mask = torch.zeros(B, 8 * H, 8 * W)
    mask[:, :, : 4 * W] = 1.0  # left half of each image, in pixels
    expected = (pred[..., : W // 2] ** 2).sum(dim=(1, 2, 3)) / (C * H * W)
    got = batch_loss(pred, target, timesteps, ones, settings, table, mask=mask)
    torch.testing.assert_close(got, expected.mean())
    full = batch_loss(pred, target, timesteps, ones, settings, table, mask=torch.ones(B, 1, 8 * H, 8 * W))
    torch.testing.assert_close(full, batch_loss(pred, target, timesteps, ones, settings, table))


def test_batch_loss_is_finite_across_the_zero_terminal_snr_schedule(ztsnr_scheduler, latents) -> None:
    settings = LossSettings(loss_type="huber", huber_schedule="snr", min_snr_gamma=5.0,
                            scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True, v_prediction=True)
    timesteps = torch.tensor([0, 1, 998, 999])
    noise = torch.randn(latents.shape, generator=gen(19))
    target = training_target(ztsnr_scheduler, latents, noise, timesteps, v_prediction=True)
    pred = target + 0.1 * torch.randn(latents.shape, generator=gen(20))
    loss = batch_loss(pred, target, timesteps, torch.ones(B), settings, snr_table(ztsnr_scheduler))
    assert torch.isfinite(loss)


# --- settings from the config ---------------------------------------------------------------------------------------


def test_settings_read_the_config() -> None:
    training = TrainingSection(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.2,
                               ip_noise_gamma=0.05, min_timestep=10, max_timestep=900, loss_type="smooth_l1",
                               huber_schedule="exponential", huber_c=0.2, min_snr_gamma=5.0,
                               debiased_estimation_loss=True)
    noise = NoiseSettings.from_config(training)
    assert (noise.noise_offset, noise.noise_offset_random_strength, noise.adaptive_noise_scale) == (0.1, True, 0.2)
    assert (noise.ip_noise_gamma, noise.min_timestep, noise.max_timestep) == (0.05, 10, 900)
    assert noise.num_train_timesteps == T
    loss = LossSettings.from_config(training, v_prediction=True)
    assert (loss.loss_type, loss.huber_schedule, loss.huber_c, loss.min_snr_gamma) == ("smooth_l1", "exponential",
                                                                                         0.2, 5.0)
    assert loss.debiased_estimation_loss and loss.v_prediction


def test_settings_reject_what_sd_scripts_rejects() -> None:
    with pytest.raises(ValueError, match="noise_offset"):
        NoiseSettings(adaptive_noise_scale=0.5)
    with pytest.raises(ValueError, match="v-prediction"):
        LossSettings(scale_v_pred_loss_like_noise_pred=True)
    with pytest.raises(ValueError, match="loss_type"):
        LossSettings(loss_type="l3")
    with pytest.raises(ValueError, match="timesteps"):
        NoiseSettings(max_timestep=T + 1)
