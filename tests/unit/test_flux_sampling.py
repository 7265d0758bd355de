"""FLUX sampling during training (engine.train.flux_sampling) against flux-sd3-spec §7.

Runs a tiny FLUX transformer (hidden 64, 2 heads, 2 + 2 blocks, context 32, vec 32, RoPE axes 4/14/14) on the CPU:
the noise, the Euler steps and the CFG batch are checked against loops written out here, and the whole denoising
loop against diffusers' FluxPipeline driving a FluxTransformer2DModel converted from the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.models.encoded_text import EncodedText
from engine.models.flux.params import FluxParams
from engine.models.flux.transformer import Flux
from engine.train.flow import image_ids, inference_schedule, unpack_latents
from engine.train.flux_sampling import FlowConditioning, denoise, sample_latents, sample_size

TINY = FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                  axes_dim=(4, 14, 14))
TINY_SCHNELL = FluxParams(**{**TINY.__dict__, "guidance_embed": False})
TINY_CHROMA = FluxParams(**{**TINY.__dict__, "guidance_embed": False, "chroma": True, "approximator_hidden": 32,
                            "approximator_depth": 2})
TXT_LEN = 7
W, H = 96, 64  # → latent 8×12, 4×6 = 24 tokens


def tiny_model(params: FluxParams = TINY, seed: int = 0) -> Flux:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Flux(params).eval()


def prompt(seed: int, *, pooled: bool = True, real_tokens: int = 4) -> EncodedText:
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(1, TXT_LEN, 32, generator=generator)
    vector = torch.randn(1, 32, generator=generator) if pooled else None
    return EncodedText(states, vector, torch.arange(TXT_LEN)[None] < real_tokens)


class Recorder:
    """Calls the model and keeps every call's arguments."""

    def __init__(self, model: Flux) -> None:
        self.model, self.calls = model, []
        self.device, self.dtype = model.device, model.dtype

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.model(**kwargs)


def test_sample_size_floors_to_16() -> None:
    assert sample_size(100, 70) == (96, 64)
    assert sample_size(10, 1030) == (64, 1024)


def test_shapes_and_determinism() -> None:
    model = tiny_model()
    first = sample_latents(model, prompt(1), width=W + 7, height=H, steps=4, seed=5)
    assert first.shape == (1, 16, H // 8, W // 8) and first.dtype == torch.float32
    assert torch.equal(first, sample_latents(model, prompt(1), width=W, height=H, steps=4, seed=5))
    assert not torch.allclose(first, sample_latents(model, prompt(1), width=W, height=H, steps=4, seed=6))
    assert bool(torch.isfinite(first).all())


def test_noise_is_drawn_packed_and_euler_integrates_the_velocity() -> None:
    """With a constant velocity c, Euler from σ = 1 to 0 lands on noise − c, whatever the schedule."""
    tokens = (H // 16) * (W // 16)
    noise = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(9))  # [1, L, 64] from the seed
    velocity = torch.linspace(-1, 1, 64)

    class Constant:
        device, dtype = torch.device("cpu"), torch.float32

        def __call__(self, img, **kwargs):
            return velocity.expand_as(img).clone()

    out = sample_latents(Constant(), prompt(1), width=W, height=H, steps=7, seed=9)
    torch.testing.assert_close(out, unpack_latents(noise - velocity, (H // 8, W // 8)))


def test_model_inputs_follow_the_spec() -> None:
    recorder = Recorder(tiny_model())
    encoded = prompt(2)
    sample_latents(recorder, encoded, width=W, height=H, steps=5, guidance=2.5, seed=1)
    schedule = inference_schedule(5, (H // 16) * (W // 16))
    assert len(recorder.calls) == 5
    for call, t in zip(recorder.calls, schedule[:-1], strict=True):
        assert call["timesteps"].tolist() == pytest.approx([t])  # σ itself, shifted schedule
        assert call["guidance"].tolist() == [2.5]
        assert call["txt_mask"] is None  # no mask unless apply_t5_attn_mask (sd-scripts' default)
        assert torch.equal(call["img_ids"], image_ids(1, (H // 8, W // 8)))
        assert torch.equal(call["txt_ids"], torch.zeros(1, TXT_LEN, 3))
        assert torch.equal(call["txt"], encoded.hidden_states) and torch.equal(call["y"], encoded.pooled)
    assert recorder.calls[0]["timesteps"].item() == 1.0
    recorder.calls.clear()
    sample_latents(recorder, encoded, width=W, height=H, steps=2, seed=1, apply_t5_attn_mask=True)
    assert torch.equal(recorder.calls[0]["txt_mask"], encoded.mask)
    recorder.calls.clear()
    sample_latents(recorder, encoded, width=W, height=H, steps=3, seed=1, shift=False)
    assert [c["timesteps"].item() for c in recorder.calls] == pytest.approx([1.0, 2 / 3, 1 / 3])


def reference_cfg(model: Flux, noise: torch.Tensor, latent_hw: tuple[int, int], positive: EncodedText,
                  negative: EncodedText, schedule: list[float], guidance: float, cfg: float) -> torch.Tensor:
    """Spec §7 written out: two separate model calls per step, pred = neg + cfg·(pos − neg), x += (t' − t)·pred."""
    ids = image_ids(1, latent_hw)
    x = noise.clone()
    with torch.no_grad():
        for t, t_next in zip(schedule[:-1], schedule[1:], strict=True):
            preds = [model(img=x, img_ids=ids, txt=p.hidden_states, txt_ids=torch.zeros(1, TXT_LEN, 3),
                           timesteps=torch.tensor([t]), y=p.pooled, guidance=torch.tensor([guidance]),
                           txt_mask=None) for p in (positive, negative)]
            x = x + (t_next - t) * (preds[1] + cfg * (preds[0] - preds[1]))
    return unpack_latents(x, latent_hw)


@pytest.mark.parametrize("params", [TINY, TINY_SCHNELL])
def test_cfg_batch_equals_two_separate_calls(params: FluxParams) -> None:
    model = tiny_model(params)
    positive, negative = prompt(3), prompt(4)
    recorder = Recorder(model)
    out = sample_latents(recorder, positive, negative, width=W, height=H, steps=6, guidance=3.0, cfg_scale=4.0,
                         seed=2)
    assert all(call["img"].shape[0] == 2 for call in recorder.calls)  # one batch of 2 per step
    tokens = (H // 16) * (W // 16)
    noise = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(2))
    expected = reference_cfg(model, noise, (H // 8, W // 8), positive, negative, inference_schedule(6, tokens),
                             3.0, 4.0)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # cfg 1 ignores the negative prompt: one call per step, batch 1
    recorder.calls.clear()
    plain = sample_latents(recorder, positive, negative, width=W, height=H, steps=6, guidance=3.0, seed=2)
    assert all(call["img"].shape[0] == 1 for call in recorder.calls)
    torch.testing.assert_close(plain, sample_latents(model, positive, width=W, height=H, steps=6, guidance=3.0,
                                                     seed=2))


def test_cfg_needs_a_negative_prompt_and_denoise_checks_the_batch() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="negative prompt"):
        sample_latents(model, prompt(1), width=W, height=H, steps=2, cfg_scale=2.0, seed=1)
    conditioning = FlowConditioning.from_encoded([prompt(1)], apply_t5_attn_mask=False, device=torch.device("cpu"),
                                                 dtype=torch.float32)
    with pytest.raises(ValueError, match="cfg_scale"):
        denoise(model, torch.zeros(1, 24, 64), (8, 12), conditioning, [1.0, 0.0], guidance=1.0, cfg_scale=2.0,
                dtype=torch.float32)


def test_chroma_with_mask_and_cfg() -> None:
    """Chroma: no pooled vector, the T5 mask on, guidance 0 and true CFG (its documented sampling settings)."""
    model = tiny_model(TINY_CHROMA)
    positive, negative = prompt(5, pooled=False, real_tokens=3), prompt(6, pooled=False, real_tokens=5)
    out = sample_latents(model, positive, negative, width=W, height=H, steps=4, guidance=0.0, cfg_scale=4.0, seed=3,
                         apply_t5_attn_mask=True)
    assert out.shape == (1, 16, H // 8, W // 8) and bool(torch.isfinite(out).all())
    # the batch of 2 keeps the longer text window; the shorter prompt's extra tokens stay masked, so each image
    # gets what a separate call gives
    tokens = (H // 16) * (W // 16)
    noise = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(3))
    ids, schedule = image_ids(1, (H // 8, W // 8)), inference_schedule(4, tokens)
    x = noise.clone()
    with torch.no_grad():
        for t, t_next in zip(schedule[:-1], schedule[1:], strict=True):
            preds = [model(img=x, img_ids=ids, txt=p.hidden_states, txt_ids=torch.zeros(1, TXT_LEN, 3),
                           timesteps=torch.tensor([t]), y=None, guidance=torch.tensor([0.0]), txt_mask=p.mask)
                     for p in (positive, negative)]
            x = x + (t_next - t) * (preds[1] + 4.0 * (preds[0] - preds[1]))
    torch.testing.assert_close(out, unpack_latents(x, (H // 8, W // 8)), rtol=1e-4, atol=1e-5)


# --- against diffusers' FluxPipeline ------------------------------------------------------------------------------


def diffusers_transformer(model: Flux, monkeypatch: pytest.MonkeyPatch):
    """diffusers' FluxTransformer2DModel holding ``model``'s weights, through diffusers' own key converter."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    params = model.params
    # The converter splits single blocks' linear1 with FLUX.1's fixed widths (3072 ×3, 12288); give it the tiny ones.
    real_split = torch.split

    def split(tensor, sizes, dim=0):
        if isinstance(sizes, tuple) and sizes == (3072, 3072, 3072, 12288):
            sizes = (params.hidden_size,) * 3 + (params.mlp_hidden,)
        return real_split(tensor, sizes, dim)

    monkeypatch.setattr(torch, "split", split)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(model.state_dict()))
    monkeypatch.setattr(torch, "split", real_split)
    reference = FluxTransformer2DModel(
        patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
        num_single_layers=params.depth_single_blocks, attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim, guidance_embeds=params.guidance_embed,
        axes_dims_rope=tuple(params.axes_dim),
    )
    reference.load_state_dict(converted, strict=True)  # raises on any missing or unexpected key
    return reference.eval()


@pytest.mark.parametrize(("params", "cfg"), [(TINY, 1.0), (TINY, 3.0), (TINY_SCHNELL, 1.0)])
def test_denoising_loop_matches_diffusers_flux_pipeline(params: FluxParams, cfg: float,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model = tiny_model(params, seed=1)
    positive, negative = prompt(7), prompt(8)
    steps, guidance, seed = 8, 3.5, 11
    ours = sample_latents(model, positive, negative, width=W, height=H, steps=steps, guidance=guidance,
                          cfg_scale=cfg, seed=seed)

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=diffusers_transformer(model, monkeypatch))
    pipe.set_progress_bar_config(disable=True)
    tokens = (H // 16) * (W // 16)
    noise = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(seed))  # the same packed draw
    with torch.no_grad():
        packed = pipe(prompt_embeds=positive.hidden_states, pooled_prompt_embeds=positive.pooled,
                      negative_prompt_embeds=negative.hidden_states,
                      negative_pooled_prompt_embeds=negative.pooled, true_cfg_scale=cfg, guidance_scale=guidance,
                      width=W, height=H, num_inference_steps=steps, latents=noise, output_type="latent").images
    expected = unpack_latents(packed, (H // 8, W // 8))
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
