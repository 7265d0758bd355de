"""SD3 caption encoding (spec §8.3): equal to diffusers' StableDiffusion3Pipeline.encode_prompt on the tiny encoders,
the CLIP/T5 attention masks, the layout, and per-encoder caption dropout."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

torch = pytest.importorskip("torch")
from sd3_tiny import tiny_sd3_files  # noqa: E402 (after the environment is set)

from engine.models.sd3.loading import load_sd3_model  # noqa: E402
from engine.models.sd3.text import SD3TextLayout, drop_text_outputs, encode_sd3, text_layout  # noqa: E402
from engine.models.text_encoders import ready_text_encoders  # noqa: E402

CAPTIONS = ["a photo of sks cat", "red square, blue circle on the dog"]


@pytest.fixture(scope="module")
def text():
    files = tiny_sd3_files("medium")
    loaded = load_sd3_model(files["model"], clip_l=files["clip_l"], clip_g=files["clip_g"], t5xxl=files["t5xxl"],
                            tokenizer_cache_dir=files["t5_tokenizer"])
    return loaded.text


def _diffusers_prompt(loaded, captions: list[str], t5_length: int):
    """diffusers' encode_prompt on the same encoders and tokenizers (clip_skip None: penultimate layer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    (tok_l, tok_g, tok_t5), (clip_l, clip_g, t5) = loaded.tokenizers, loaded.encoders
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
                                    text_encoder_3=t5, tokenizer_3=tok_t5)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False, max_sequence_length=t5_length)
    return embeds, pooled


def test_encode_sd3_equals_diffusers_encode_prompt(text):
    with torch.no_grad():
        ours = encode_sd3(text, CAPTIONS, t5_max_length=12)
    embeds, pooled = _diffusers_prompt(text, CAPTIONS, 12)
    assert ours.hidden_states.shape == (2, 77 + 12, 64) and ours.pooled.shape == (2, 64) and ours.mask is None
    torch.testing.assert_close(ours.hidden_states, embeds, atol=0, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=0, rtol=0)


def test_clip_states_are_zero_padded_to_a_wider_t5(text):
    """With T5 wider than both CLIPs (4096 vs 768 + 1280 in the real model) the CLIP tokens are zero-padded."""
    from transformers import T5Config, T5EncoderModel

    wide_t5 = T5EncoderModel(T5Config(vocab_size=96, d_model=80, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    wide = ready_text_encoders("sd3", text.tokenizers, [*text.encoders[:2], wide_t5], "test")
    with torch.no_grad():
        ours = encode_sd3(wide, CAPTIONS, t5_max_length=10)
    embeds, pooled = _diffusers_prompt(wide, CAPTIONS, 10)
    assert ours.hidden_states.shape == (2, 87, 80)
    assert torch.count_nonzero(ours.hidden_states[:, :77, 64:]) == 0
    torch.testing.assert_close(ours.hidden_states, embeds, atol=0, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=0, rtol=0)


def test_parts_are_the_penultimate_states_and_projected_pooled_outputs(text):
    with torch.no_grad():
        ours = encode_sd3(text, CAPTIONS, t5_max_length=12)
        offset = 0
        for tokenizer, encoder in zip(text.tokenizers[:2], text.encoders[:2], strict=True):
            ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
            output = encoder(ids, output_hidden_states=True)
            width = encoder.config.hidden_size
            torch.testing.assert_close(ours.hidden_states[:, :77, offset:offset + width], output.hidden_states[-2])
            # the pooled vector: text_projection of the final-norm state at the first EOS (id 49407)
            eos = (ids == 49407).int().argmax(dim=1)
            projected = encoder.text_projection(output.last_hidden_state[torch.arange(2), eos])
            torch.testing.assert_close(ours.pooled[:, offset:offset + 32], projected)
            offset += width
    # CLIP-G pads with "!" (id 0) after the EOS, CLIP-L with the EOS itself
    ids_l = text.tokenizers[0](["a cat"], padding="max_length", max_length=77).input_ids[0]
    ids_g = text.tokenizers[1](["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert ids_l[3:6] == [49407, 49407, 49407] and ids_g[3:6] == [49407, 0, 0]


def test_masks_go_into_the_encoders_attention_only(text):
    with torch.no_grad():
        plain = encode_sd3(text, CAPTIONS, t5_max_length=12)
        lg = encode_sd3(text, CAPTIONS, t5_max_length=12, apply_lg_mask=True)
        t5 = encode_sd3(text, CAPTIONS, t5_max_length=12, apply_t5_mask=True)
        tokens = text.tokenizers[2](CAPTIONS, padding="max_length", max_length=12, return_tensors="pt")
        masked_t5 = text.encoders[2](tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert lg.mask is None and t5.mask is None
    # the CLIP masks change CLIP's part (at the padding: real tokens see only earlier ones anyway), not T5's
    torch.testing.assert_close(lg.hidden_states[:, 77:], plain.hidden_states[:, 77:], atol=0, rtol=0)
    assert not torch.equal(lg.hidden_states[:, :77], plain.hidden_states[:, :77])
    torch.testing.assert_close(t5.hidden_states[:, :77], plain.hidden_states[:, :77], atol=0, rtol=0)
    torch.testing.assert_close(t5.hidden_states[:, 77:], masked_t5, atol=0, rtol=0)
    assert not torch.equal(t5.hidden_states[:, 77:], plain.hidden_states[:, 77:])
    with pytest.raises(ValueError, match="at least 1"):
        encode_sd3(text, CAPTIONS, t5_max_length=0)


def test_text_layout(text):
    assert text_layout(text) == SD3TextLayout(clip_tokens=77, l_width=32, g_width=32, l_pooled=32, g_pooled=32)


# --- dropout -------------------------------------------------------------------------------------------------------


def _encoded(text):
    with torch.no_grad():
        return encode_sd3(text, CAPTIONS, t5_max_length=8)


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_no_dropout_returns_the_outputs_without_drawing(text):
    encoded = _encoded(text)
    generators = _generators(1, 2)
    assert drop_text_outputs(encoded, text_layout(text), (0.0, 0.0, 0.0), generators) is encoded
    assert torch.rand(1, generator=generators[0]).item() == torch.rand(1, generator=_generators(1)[0]).item()


@pytest.mark.parametrize(("rates", "part"), [((1.0, 0.0, 0.0), 0), ((0.0, 1.0, 0.0), 1), ((0.0, 0.0, 1.0), 2)])
def test_dropout_of_one_encoder_zeroes_its_parts_only(text, rates, part):
    encoded = _encoded(text)
    dropped = drop_text_outputs(encoded, text_layout(text), rates, _generators(1, 2))
    context, pooled = encoded.hidden_states, encoded.pooled
    regions = [(slice(0, 77), slice(0, 32)), (slice(0, 77), slice(32, 64)), (slice(77, None), slice(None))]
    pooled_regions = [slice(0, 32), slice(32, 64), slice(0, 0)]
    for index, (tokens, features) in enumerate(regions):
        expected = torch.zeros_like(context[:, tokens, features]) if index == part else context[:, tokens, features]
        assert torch.equal(dropped.hidden_states[:, tokens, features], expected)
        expected_pooled = torch.zeros_like(pooled[:, pooled_regions[index]]) if index == part else \
            pooled[:, pooled_regions[index]]
        assert torch.equal(dropped.pooled[:, pooled_regions[index]], expected_pooled)
    assert torch.count_nonzero(encoded.hidden_states) > 0  # the input is not modified


def test_dropout_draws_per_sample_from_its_generator(text):
    encoded, layout = _encoded(text), text_layout(text)
    rates = (0.5, 0.5, 0.5)
    dropped = drop_text_outputs(encoded, layout, rates, _generators(3, 4))
    again = drop_text_outputs(encoded, layout, rates, _generators(3, 4))
    assert torch.equal(dropped.hidden_states, again.hidden_states) and torch.equal(dropped.pooled, again.pooled)
    for sample, seed in enumerate((3, 4)):
        draws = torch.rand(3, generator=torch.Generator().manual_seed(seed))
        kept = [bool(draw >= 0.5) for draw in draws]
        assert bool(dropped.pooled[sample, :32].any()) == kept[0]
        assert bool(dropped.hidden_states[sample, :77, 32:64].any()) == kept[1]
        assert bool(dropped.hidden_states[sample, 77:].any()) == kept[2]
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        drop_text_outputs(encoded, layout, rates, _generators(3))


def test_dropout_keeps_gradients_of_the_kept_parts(text):
    encoded = _encoded(text)
    context = encoded.hidden_states.clone().requires_grad_(True)
    pooled = encoded.pooled.clone().requires_grad_(True)
    from engine.models.encoded_text import EncodedText

    dropped = drop_text_outputs(EncodedText(context, pooled), text_layout(text), (1.0, 0.0, 0.0), _generators(1, 2))
    (dropped.hidden_states.sum() + dropped.pooled.sum()).backward()
    assert torch.count_nonzero(context.grad[:, :77, :32]) == 0 and torch.all(context.grad[:, 77:] == 1)
    assert torch.count_nonzero(pooled.grad[:, :32]) == 0 and torch.all(pooled.grad[:, 32:] == 1)
