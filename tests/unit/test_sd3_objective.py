"""The SD3 / SD3.5 objective (engine.train.sd3_objective) against flux-sd3-spec §8.3 and §8.4.

Each expected value is written out here from the spec, independently of the code under test, and drawn from a
generator in the same state as the one handed to it, so a test fails if a formula or the order of draws changes.
The objective runs on a stand-in session around a small real torch module with the MMDiT's call signature, and
on the tiny MMDiT.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine.train.flow import loss_weighting
from engine.train.losses import LossSettings, batch_loss
from engine.train.sd3_objective import (
    SD3Objective,
    SD3Settings,
    noisy_input,
    sample_timesteps,
    sigmas_of,
    text_dropout_generators,
    x0_prediction,
)

B = 64  # enough draws to see a formula's shape, few enough to stay instant


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def next_draw(generator: torch.Generator) -> float:
    """A draw that tells whether two generators were advanced by the same amount."""
    return torch.rand((), generator=generator).item()


def spec_shift(u: torch.Tensor, s: float) -> torch.Tensor:
    """Spec §8.4 step 2: u ← s·u / (1 + (s − 1)·u)."""
    return (u * s) / (1 + (s - 1) * u)


def spec_t(u: torch.Tensor, t_min: int, t_max: int) -> torch.Tensor:
    """Spec §8.4 step 3: t = floor(u·(t_max − t_min) + t_min)."""
    return (u * (t_max - t_min) + t_min).long().float()


# --- settings -----------------------------------------------------------------------------------------------------


def test_settings_defaults_are_sd_scripts() -> None:
    settings = SD3Settings()
    assert (settings.weighting_scheme, settings.logit_mean, settings.logit_std, settings.mode_scale) == \
        ("uniform", 0.0, 1.0, 1.29)
    assert (settings.training_shift, settings.min_timestep, settings.max_timestep) == (1.0, 0, 1000)
    assert settings.dropout_rates == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(("field", "bad", "match"), [
    ("weighting_scheme", "snr", "flow.weighting_scheme"), ("training_shift", 0.0, "flow.training_shift"),
    ("min_timestep", 600, "min_timestep"), ("max_timestep", 1001, "max_timestep"),
    ("t5_dropout_rate", 1.5, "training.t5_dropout_rate"), ("clip_l_dropout_rate", -0.1, "clip_l_dropout_rate"),
])
def test_settings_refuse_bad_values(field: str, bad: object, match: str) -> None:
    values = {"max_timestep": 500} if field == "min_timestep" else {}
    with pytest.raises(ValueError, match=match):
        SD3Settings(**values, **{field: bad})


def test_settings_from_config_reads_flow_and_training() -> None:
    flow = SimpleNamespace(weighting_scheme="mode", logit_mean=0.1, logit_std=0.9, mode_scale=1.1, training_shift=3.0,
                           timestep_sampling="sigma", discrete_flow_shift=3.0)
    training = SimpleNamespace(min_timestep=100, max_timestep=900, clip_l_dropout_rate=0.1, clip_g_dropout_rate=0.2,
                               t5_dropout_rate=0.3, noise_offset=0.05)
    settings = SD3Settings.from_config(SimpleNamespace(flow=flow, training=training))
    assert settings == SD3Settings("mode", 0.1, 0.9, 1.1, 3.0, 100, 900, 0.1, 0.2, 0.3)


def test_settings_from_a_real_run_config() -> None:
    from engine.config.schema import RunConfig

    config = RunConfig()
    assert SD3Settings.from_config(config) == SD3Settings()  # the config's defaults are sd-scripts' too
    flow = config.flow.model_copy(update={"weighting_scheme": "logit_normal", "training_shift": 3.0})
    training = config.training.model_copy(update={"min_timestep": 100, "t5_dropout_rate": 0.25})
    settings = SD3Settings.from_config(config.model_copy(update={"flow": flow, "training": training}))
    assert (settings.weighting_scheme, settings.training_shift) == ("logit_normal", 3.0)
    assert (settings.min_timestep, settings.dropout_rates) == (100, (0.0, 0.0, 0.25))


# --- t and σ (spec §8.4 steps 1-3) --------------------------------------------------------------------------------


def test_uniform_timesteps_floor_u_times_1000() -> None:
    reference = gen(1)
    expected = spec_t(torch.rand(B, generator=reference), 0, 1000)
    drawn = gen(1)
    t = sample_timesteps(B, SD3Settings(), drawn)
    assert t.dtype == torch.float32 and torch.equal(t, expected)
    assert next_draw(drawn) == next_draw(reference)
    assert torch.equal(t, t.floor()) and t.min() >= 0 and t.max() <= 999


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_only_schemes_draw_uniformly(scheme: str) -> None:
    assert torch.equal(sample_timesteps(B, SD3Settings(weighting_scheme=scheme), gen(2)),
                       sample_timesteps(B, SD3Settings(), gen(2)))


def test_logit_normal_density() -> None:
    reference = gen(3)
    u = torch.sigmoid(0.5 + 0.8 * torch.randn(B, generator=reference))
    drawn = gen(3)
    t = sample_timesteps(B, SD3Settings(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.8), drawn)
    assert torch.equal(t, spec_t(u, 0, 1000))
    assert next_draw(drawn) == next_draw(reference)


def test_mode_density() -> None:
    reference = gen(4)
    u0 = torch.rand(B, generator=reference)
    u = 1 - u0 - 1.29 * (torch.cos(math.pi * u0 / 2) ** 2 - 1 + u0)
    t = sample_timesteps(B, SD3Settings(weighting_scheme="mode"), gen(4))
    assert torch.equal(t, spec_t(u, 0, 1000))


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_training_shift(shift: float) -> None:
    u = torch.rand(B, generator=gen(5))
    t = sample_timesteps(B, SD3Settings(training_shift=shift), gen(5))
    assert torch.equal(t, spec_t(spec_shift(u, shift), 0, 1000))
    if shift == 3.0:  # s > 1 favours noisier σ
        assert t.mean() > sample_timesteps(B, SD3Settings(), gen(5)).mean()


def test_min_and_max_timestep_stretch_u() -> None:
    u = spec_shift(torch.sigmoid(torch.randn(B, generator=gen(6))), 2.0)
    settings = SD3Settings(weighting_scheme="logit_normal", training_shift=2.0, min_timestep=200, max_timestep=700)
    t = sample_timesteps(B, settings, gen(6))
    assert torch.equal(t, spec_t(u, 200, 700))
    assert t.min() >= 200 and t.max() <= 699


def test_equal_min_and_max_fix_the_timestep() -> None:
    t = sample_timesteps(B, SD3Settings(min_timestep=400, max_timestep=400), gen(7))
    assert torch.equal(t, torch.full((B,), 400.0))


def test_sigma_is_t_over_1000_in_steps_of_a_thousandth() -> None:
    t = torch.tensor([0.0, 1.0, 500.0, 999.0, 1000.0])
    assert torch.equal(sigmas_of(t), torch.tensor([0.0, 0.001, 0.5, 0.999, 1.0]))
    assert sigmas_of(t.to(torch.int64)).dtype == torch.float32


# --- x_σ, x0 preconditioning, target, weights (spec §8.4 steps 4-5) -----------------------------------------------


@pytest.fixture
def latents() -> torch.Tensor:
    return torch.randn(4, 16, 6, 8, generator=gen(10))


def test_noisy_input_interpolates(latents: torch.Tensor) -> None:
    noise = torch.randn(latents.shape, generator=gen(11))
    sigmas = torch.tensor([0.0, 0.25, 0.999, 1.0])
    noisy = noisy_input(latents, noise, sigmas)
    expected = sigmas.view(-1, 1, 1, 1) * noise + (1 - sigmas.view(-1, 1, 1, 1)) * latents
    torch.testing.assert_close(noisy, expected)
    assert torch.equal(noisy[0], latents[0]) and torch.equal(noisy[3], noise[3])


def test_x0_preconditioning_recovers_the_latents_from_the_velocity(latents: torch.Tensor) -> None:
    noise = torch.randn(latents.shape, generator=gen(12))
    sigmas = torch.tensor([0.0, 0.3, 0.7, 1.0])
    noisy = noisy_input(latents, noise, sigmas)
    pred = torch.randn(latents.shape, generator=gen(13))
    torch.testing.assert_close(x0_prediction(pred, noisy, sigmas), noisy - sigmas.view(-1, 1, 1, 1) * pred)
    # The ideal MMDiT output is the velocity ε − x0: its x0 estimate is the target, the clean latents.
    torch.testing.assert_close(x0_prediction(noise - latents, noisy, sigmas), latents, atol=1e-5, rtol=0)


def test_loss_weights_of_the_schemes() -> None:
    sigmas = torch.tensor([0.0, 0.001, 0.25, 0.5, 1.0])
    assert torch.equal(loss_weighting("sigma_sqrt", sigmas)[1:], sigmas[1:] ** -2.0)  # σ⁻² despite the name
    assert torch.isfinite(loss_weighting("sigma_sqrt", sigmas)).all()  # σ = 0 (t = 0) must not make the loss NaN
    torch.testing.assert_close(loss_weighting("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    for scheme in ("uniform", "none", "logit_normal", "mode"):
        assert torch.equal(loss_weighting(scheme, sigmas), torch.ones(5))


def test_x0_loss_is_sigma_squared_times_the_velocity_loss(latents: torch.Tensor) -> None:
    noise = torch.randn(latents.shape, generator=gen(14))
    sigmas = torch.tensor([0.05, 0.3, 0.7, 1.0])
    noisy = noisy_input(latents, noise, sigmas)
    pred = torch.randn(latents.shape, generator=gen(15))
    settings, ones = LossSettings(), torch.ones(4)
    x0_loss = batch_loss(x0_prediction(pred, noisy, sigmas), latents, sigmas * 1000, ones, settings, None)
    velocity_loss = batch_loss(pred, noise - latents, sigmas * 1000, sigmas**2, settings, None)
    torch.testing.assert_close(x0_loss, velocity_loss)


# --- the objective on a stand-in session --------------------------------------------------------------------------


class Denoiser(torch.nn.Module):
    """A small real module with the MMDiT's call signature (x, t, y, context), recording each call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.pooled = torch.nn.Linear(8, 16)
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append({"x": x, "t": t, "y": y, "context": context})
        scale = (t / 1000).view(-1, 1, 1, 1) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return self.conv(x) * scale + self.pooled(y)[:, :, None, None]


def session_for(model: torch.nn.Module, **config: object) -> SimpleNamespace:
    flow = {"weighting_scheme": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
            "training_shift": 1.0}
    training = {"min_timestep": 0, "max_timestep": 1000, "clip_l_dropout_rate": 0.0, "clip_g_dropout_rate": 0.0,
                "t5_dropout_rate": 0.0, "loss_type": "l2", "huber_schedule": "constant",
                "huber_c": 0.1, "huber_scale": 1.0, "min_snr_gamma": 0.0, "scale_v_pred_loss_like_noise_pred": False,
                "debiased_estimation_loss": False}
    for key, value in config.items():
        (flow if key in flow else training)[key] = value
    from engine.train.precision import make_precision

    accelerator = SimpleNamespace(device=torch.device("cpu"))
    return SimpleNamespace(config=SimpleNamespace(flow=SimpleNamespace(**flow), training=SimpleNamespace(**training)),
                           accelerator=accelerator, model=SimpleNamespace(unet=model), weight_dtype=torch.float32,
                           device=torch.device("cpu"), precision=make_precision("no", torch.device("cpu")))


def conditioning(batch: int, seed: int = 20) -> dict[str, torch.Tensor]:
    generator = gen(seed)
    return {"context": torch.randn(batch, 5, 8, generator=generator), "y": torch.randn(batch, 8, generator=generator)}


def expected_loss(model: torch.nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor], seeds: list[int],
                  settings: SD3Settings, weights: torch.Tensor) -> torch.Tensor:
    """Spec §8.4 written out: per sample ε then t from its seed, x_σ, p, x̂0 = x_σ − σ·p vs x0, × weighting."""
    losses = []
    for index, seed in enumerate(seeds):
        generator = gen(seed)
        x0 = latents[index:index + 1]
        noise = torch.randn(x0.shape, generator=generator)
        t = sample_timesteps(1, settings, generator)
        sigma = t / 1000
        noisy = sigma * noise + (1 - sigma) * x0
        pred = model(x=noisy, t=t, y=cond["y"][index:index + 1], context=cond["context"][index:index + 1])
        x0_hat = noisy - sigma * pred
        weight = {"sigma_sqrt": sigma.clamp(min=0.001) ** -2,
                  "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))}.get(settings.weighting_scheme, 1.0)
        losses.append(((x0_hat - x0) ** 2).mean() * weight * weights[index])
    return torch.stack([loss.reshape(()) for loss in losses]).mean()


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "sigma_sqrt", "cosmap", "mode"])
def test_objective_loss_is_the_spec_formula(scheme: str) -> None:
    torch.manual_seed(0)
    model = Denoiser()
    session = session_for(model, weighting_scheme=scheme, training_shift=3.0, min_timestep=100, max_timestep=900)
    latents = torch.randn(3, 16, 4, 6, generator=gen(21))
    seeds, weights = [11, 12, 13], torch.tensor([1.0, 0.5, 2.0])
    cond = conditioning(3)
    loss = SD3Objective(session).loss(latents, cond, {"noise_seed": seeds, "loss_weight": weights})
    expected = expected_loss(model, latents, cond, seeds, SD3Settings.from_config(session.config), weights)
    torch.testing.assert_close(loss, expected)
    call = model.calls[0]
    assert set(call) == {"x", "t", "y", "context"}
    assert call["t"].dtype == torch.float32 and torch.equal(call["t"], call["t"].floor())
    assert ((call["t"] >= 100) & (call["t"] < 900)).all()
    assert call["context"] is cond["context"] and call["y"] is cond["y"]


def test_objective_draws_per_sample() -> None:
    """A sample's draws depend on its seed only: the batch's loss is the mean of its samples' losses."""
    torch.manual_seed(0)
    model = Denoiser()
    objective = SD3Objective(session_for(model, weighting_scheme="logit_normal"))
    latents, cond = torch.randn(2, 16, 4, 4, generator=gen(22)), conditioning(2)
    batch = objective.loss(latents, cond, {"noise_seed": [5, 6], "loss_weight": torch.ones(2)})
    single = [objective.loss(latents[i:i + 1], {k: v[i:i + 1] for k, v in cond.items()},
                             {"noise_seed": [seed], "loss_weight": torch.ones(1)}) for i, seed in enumerate([5, 6])]
    torch.testing.assert_close(batch, (single[0] + single[1]) / 2)
    swapped = objective.loss(latents.flip(0), {k: v.flip(0) for k, v in cond.items()},
                             {"noise_seed": [6, 5], "loss_weight": torch.ones(2)})
    torch.testing.assert_close(batch, swapped)


def test_objective_backpropagates_to_the_model() -> None:
    torch.manual_seed(0)
    model = Denoiser()
    latents = torch.randn(2, 16, 4, 4, generator=gen(23))
    loss = SD3Objective(session_for(model)).loss(latents, conditioning(2),
                                                 {"noise_seed": [1, 2], "loss_weight": torch.ones(2)})
    loss.backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_objective_on_the_tiny_mmdit(dtype: torch.dtype) -> None:
    """The real MMDiT (SD3.5 medium layout) takes t as float32 on 0..1000 next to inputs in the weight dtype."""
    from engine.models.sd3.mmdit import MMDiT
    from engine.models.sd3.params import tiny_params

    params = tiny_params("5-medium")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mmdit = MMDiT(params).to(dtype)
    session = session_for(mmdit, weighting_scheme="logit_normal")
    session.weight_dtype = dtype
    generator = gen(24)
    cond = {"context": torch.randn(2, 77 + 4, params.context_in_dim, generator=generator).to(dtype),
            "y": torch.randn(2, params.adm_in_channels, generator=generator).to(dtype)}
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    loss = SD3Objective(session).loss(latents, cond, {"noise_seed": [3, 4], "loss_weight": torch.ones(2)})
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in mmdit.joint_blocks[0].x_block.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if dtype == torch.float32:
        settings = SD3Settings.from_config(session.config)
        with torch.no_grad():
            torch.testing.assert_close(loss.detach(), expected_loss(mmdit, latents, cond, [3, 4], settings,
                                                                    torch.ones(2)))


# --- text dropout seeds (spec §8.3) -------------------------------------------------------------------------------


def test_text_dropout_generators_are_per_sample_and_not_the_noise_stream() -> None:
    first, second = text_dropout_generators([7, 8]), text_dropout_generators([7, 8])
    draws = [torch.rand(4, generator=g) for g in first]
    assert all(torch.equal(a, torch.rand(4, generator=g)) for a, g in zip(draws, second, strict=True))
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], torch.rand(4, generator=gen(7)))  # independent of the noise's draws


# --- the conditioning builder (spec §8.3) -------------------------------------------------------------------------

L_WIDTH, G_WIDTH, L_POOLED, G_POOLED, T5_TOKENS = 16, 24, 12, 20, 4


def tiny_text() -> SimpleNamespace:
    """Two tiny real CLIP encoders with projections ([CLIP-L, CLIP-G, T5] as the loader gives them; T5 unused)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip(width: int, projection: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=width, projection_dim=projection,
                                                          intermediate_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, vocab_size=100))

    return SimpleNamespace(encoders=[clip(L_WIDTH, L_POOLED), clip(G_WIDTH, G_POOLED), None])


def encoded_batch(batch: int, seed: int = 30):
    from engine.models.encoded_text import EncodedText

    generator = gen(seed)
    context = torch.randn(batch, 77 + T5_TOKENS, 64, generator=generator)
    context[:, :77, L_WIDTH + G_WIDTH:] = 0  # the CLIP tokens' zero padding up to T5's width
    return EncodedText(context, torch.randn(batch, L_POOLED + G_POOLED, generator=generator))


def builder_session(**rates: float) -> SimpleNamespace:
    session = session_for(Denoiser(), **rates)
    session.model.text = tiny_text()
    return session


def test_conditioning_without_dropout_is_the_encoding() -> None:
    from engine.train.sd3_objective import sd3_conditioning

    encoded = encoded_batch(3)
    session = builder_session()
    result = sd3_conditioning(session, {"noise_seed": [1, 2, 3]}, encoded)
    assert set(result) == {"context", "y"}
    assert torch.equal(result["context"], encoded.hidden_states) and torch.equal(result["y"], encoded.pooled)


@pytest.mark.parametrize(("rate", "part"), [("clip_l_dropout_rate", 0), ("clip_g_dropout_rate", 1),
                                            ("t5_dropout_rate", 2)])
def test_conditioning_drops_one_encoder_per_sample(rate: str, part: int) -> None:
    from engine.train.sd3_objective import sd3_conditioning

    encoded = encoded_batch(2)
    result = sd3_conditioning(builder_session(**{rate: 1.0}), {"noise_seed": [4, 5]}, encoded)
    context, pooled = encoded.hidden_states.clone(), encoded.pooled.clone()
    if part == 0:
        context[:, :77, :L_WIDTH], pooled[:, :L_POOLED] = 0, 0
    elif part == 1:
        context[:, :77, L_WIDTH:L_WIDTH + G_WIDTH], pooled[:, L_POOLED:] = 0, 0
    else:
        context[:, 77:] = 0
    assert torch.equal(result["context"], context) and torch.equal(result["y"], pooled)


def test_conditioning_dropout_follows_each_samples_seed() -> None:
    """Half rates: a sample's drops depend on its noise seed only, so a resumed run drops the same parts."""
    from engine.models.encoded_text import EncodedText
    from engine.train.sd3_objective import sd3_conditioning

    session = builder_session(clip_l_dropout_rate=0.5, clip_g_dropout_rate=0.5, t5_dropout_rate=0.5)
    seeds = list(range(40, 56))
    encoded = encoded_batch(len(seeds))
    first = sd3_conditioning(session, {"noise_seed": seeds}, encoded)
    again = sd3_conditioning(session, {"noise_seed": seeds}, encoded)
    assert torch.equal(first["context"], again["context"]) and torch.equal(first["y"], again["y"])
    alone = sd3_conditioning(session, {"noise_seed": seeds[3:4]},
                             EncodedText(encoded.hidden_states[3:4], encoded.pooled[3:4]))
    assert torch.equal(alone["context"], first["context"][3:4]) and torch.equal(alone["y"], first["y"][3:4])
    dropped_t5 = (first["context"][:, 77:] == 0).flatten(1).all(1)
    dropped_l = (first["y"][:, :L_POOLED] == 0).all(1)
    assert 0 < int(dropped_t5.sum()) < len(seeds) and 0 < int(dropped_l.sum()) < len(seeds)


def test_conditioning_needs_the_pooled_vector() -> None:
    from engine.models.encoded_text import EncodedText
    from engine.train.sd3_objective import sd3_conditioning

    with pytest.raises(ValueError, match="pooled"):
        sd3_conditioning(builder_session(), {"noise_seed": [1]}, EncodedText(encoded_batch(1).hidden_states, None))
