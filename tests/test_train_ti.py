"""Textual Inversion on tiny models: only the new rows learn, the file loads in diffusers, captions get the token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import events_of, load_pipeline, pipeline_text_encoders, run_trainer, write_config

from engine.config.io import load_config
from engine.models.text_encoding import encode_captions
from engine.networks.embedding_file import read_embedding_file, save_embedding_file
from engine.train.method_ti import add_tokens, caption_with_token, expand_token
from engine.train.setup import RunInputError

TOKEN = "zqtok"
VECTORS = 2
INIT_WORD = "dog"
PROMPT = f"a {TOKEN} dog, red square"


def ti_config(folder: Path, tiny_models: dict, family: str, **sections) -> Path:
    sections = {"training": {"max_train_steps": 4}, "optimizer": {"learning_rate": 5e-2},
                "saving": {"output_name": "emb"}, **sections}
    return write_config(folder / "config.toml", tiny_models, family, method="textual_inversion",
                        embedding={"token_string": TOKEN, "init_word": INIT_WORD, "num_vectors_per_token": VECTORS},
                        **sections)


def train_in_process(config_path: Path, run_dir: Path):
    """Build and run a session here; its session, to look at the trained models afterwards."""
    return run_trainer(config_path, run_dir).session


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def trained(request, tiny_models, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(f"ti_{family}")
    session = train_in_process(ti_config(folder, tiny_models, family), folder)
    return family, session, session.output_dir / "emb.safetensors"


def _base_encoders(tiny_models: dict, family: str):
    from engine.models.text_encoders import load_text_encoders

    return load_text_encoders(tiny_models[family])


@pytest.mark.slow
def test_only_the_new_rows_change(trained, tiny_models):
    from diffusers import UNet2DConditionModel

    family, session, _ = trained
    method = session.method
    base = _base_encoders(tiny_models, family)
    for trained_encoder, base_encoder, ids in zip(session.model.text.encoders, base.encoders, method.token_ids,
                                                  strict=True):
        base_weights = base_encoder.state_dict()
        embedding_name = next(name for name, value in base_encoder.named_parameters()
                              if value is base_encoder.get_input_embeddings().weight)
        vocabulary = base_weights[embedding_name].shape[0]
        assert ids == list(range(vocabulary, vocabulary + VECTORS))
        for name, value in trained_encoder.state_dict().items():
            if name == embedding_name:
                assert torch.equal(value[:vocabulary].cpu(), base_weights[name]), "an existing token row moved"
                init_row = base_weights[name][base.tokenizers[0].encode(INIT_WORD, add_special_tokens=False)[0]]
                assert (value[vocabulary:].cpu() - init_row).abs().max() > 1e-3, "the new rows did not learn"
            else:
                assert torch.equal(value.cpu(), base_weights[name]), name
    base_unet = UNet2DConditionModel.from_pretrained(tiny_models[family], subfolder="unet")
    base_state = base_unet.state_dict()
    for name, value in session.model.unet.state_dict().items():
        assert torch.equal(value.cpu(), base_state[name]), name


def test_saved_vectors_are_the_trained_rows(trained):
    family, session, path = trained
    keys = ("emb_params",) if family == "sd1" else ("clip_l", "clip_g")
    with safe_open(str(path), "pt") as handle:
        assert tuple(handle.keys()) == tuple(sorted(keys))
        metadata = handle.metadata()
    assert metadata["modelspec.architecture"].endswith("/textual-inversion")
    assert not [key for key in metadata if not key.startswith("modelspec.")], "sd-scripts writes modelspec only"
    tensors = load_file(str(path))
    for key, encoder, ids in zip(keys, session.model.text.encoders, session.method.token_ids, strict=True):
        rows = encoder.get_input_embeddings().weight.detach()[ids]
        assert tensors[key].shape == (VECTORS, rows.shape[1])
        assert torch.equal(tensors[key], rows.cpu().float())
    state = session.method.trained_state()  # what a saved state holds for resuming
    assert all(state[key].dtype == torch.float32 and torch.equal(state[key], tensors[key]) for key in keys)


def _load_in_diffusers(pipe, family: str, path: Path) -> None:
    if family == "sdxl":  # diffusers' documented way for SDXL embeddings: each half into its own encoder
        tensors = load_file(str(path))
        pipe.load_textual_inversion(tensors["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(tensors["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    else:
        pipe.load_textual_inversion(str(path), token=TOKEN)


def _encode(text_encoders, captions: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return encode_captions(text_encoders, captions, clip_skip=1, max_token_length=75).hidden_states


def test_file_loads_in_diffusers_and_encodes_like_the_trained_encoder(trained, tiny_models):
    family, session, path = trained
    base = load_pipeline(tiny_models[family])
    pipe = load_pipeline(tiny_models[family])
    _load_in_diffusers(pipe, family, path)
    converted = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)  # diffusers spells multi-vector tokens out
    assert converted == PROMPT.replace(TOKEN, f"{TOKEN} {TOKEN}_1")
    for encoder in session.model.text.encoders:
        encoder.eval()
    ours = _encode(session.model.text, session.method.prepare_captions([PROMPT]))
    theirs = _encode(pipeline_text_encoders(pipe, family), [converted])
    assert (ours - theirs).abs().max() <= 1e-5
    without = _encode(pipeline_text_encoders(base, family), [PROMPT])
    assert (theirs - without).abs().max() > 1e-3, "the embedding does not change the prompt's encoding"
    plain = ["a dog, red square"]
    assert torch.equal(_encode(pipeline_text_encoders(pipe, family), plain),
                       _encode(pipeline_text_encoders(base, family), plain))


def test_a1111_pt_form_round_trips_and_loads_in_diffusers(trained, tiny_models, tmp_path):
    family, session, _ = trained
    tensors = session.method.embeddings()
    path = save_embedding_file(tmp_path / "emb", tensors, {"modelspec.title": "x"}, save_as="pt", name=TOKEN,
                               step=4)
    assert path.suffix == ".pt"
    read = read_embedding_file(path)
    assert set(read) == set(tensors) and all(torch.equal(read[key], tensors[key]) for key in tensors)
    content = torch.load(path, weights_only=True)
    if family == "sd1":
        assert content["name"] == TOKEN and content["step"] == 4
        assert torch.equal(content["string_to_param"]["*"], tensors["emb_params"])
        pipe = load_pipeline(tiny_models[family])
        pipe.load_textual_inversion(str(path), token=TOKEN)
        ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight.detach()[ids], tensors["emb_params"])
    else:
        assert set(content) == {"clip_l", "clip_g"}


@pytest.mark.slow
def test_resume_continues_exactly(tiny_models, tmp_path):
    """4 steps straight equal 2 steps, a saved state, and 2 resumed steps: trained_state holds everything."""
    straight = train_in_process(ti_config(tmp_path / "a", tiny_models, "sd1"), tmp_path / "a")
    first = ti_config(tmp_path / "b", tiny_models, "sd1", saving={"output_name": "emb", "save_every_n_steps": 2,
                                                                  "save_state": True})
    train_in_process(first, tmp_path / "b")
    state = tmp_path / "b" / "out" / "emb-step00000002-state"
    resumed = train_in_process(ti_config(tmp_path / "c", tiny_models, "sd1",
                                         saving={"output_name": "emb", "resume": str(state)}), tmp_path / "c")
    assert torch.equal(resumed.method.embeddings()["emb_params"], straight.method.embeddings()["emb_params"])


def test_known_words_are_refused(tiny_models):
    text = _base_encoders(tiny_models, "sd1")
    tokenizer, encoder = text.tokenizers[0], text.encoders[0]
    for word in ("dog", "sks"):  # one existing token each ("dog</w>", the DreamBooth word "sks</w>")
        known = f"'{word}' is already (in the tokenizer's vocabulary|a word the tokenizer knows)"
        with pytest.raises(RunInputError, match=known) as error:
            add_tokens(tokenizer, encoder, [word], "*")
        assert error.value.where == "embedding.token_string"
    add_tokens(tokenizer, encoder, [TOKEN], "*")
    with pytest.raises(RunInputError, match="already in the tokenizer's vocabulary"):
        add_tokens(tokenizer, encoder, [TOKEN], "*")


def test_known_token_string_stops_the_run_with_a_clear_error(tiny_models, tmp_path):
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", method="textual_inversion",
                          embedding={"token_string": "dog"}, training={"max_train_steps": 1})
    from engine.train.run import EXIT_BAD_INPUT, run_training

    assert run_training(load_config(config, check_packages=False), config.parent) == EXIT_BAD_INPUT
    error = next(event for event in events_of(tmp_path / "out") if event["type"] == "error")
    assert error["where"] == "embedding.token_string" and "'dog' is already" in error["message"]


def test_new_rows_start_from_the_init_word(tiny_models):
    """sd-scripts: an init word of several tokens is repeated over the vectors; empty means '*'."""
    text = _base_encoders(tiny_models, "sd1")
    tokenizer, encoder = text.tokenizers[0], text.encoders[0]
    before = encoder.get_input_embeddings().weight.detach().clone()
    init_ids = tokenizer.encode("red square", add_special_tokens=False)
    assert len(init_ids) == 2
    ids = add_tokens(tokenizer, encoder, ["zqa", "zqa1", "zqa2"], "red square")
    weight = encoder.get_input_embeddings().weight.detach()
    assert [torch.equal(weight[i], before[init_ids[k % 2]]) for k, i in enumerate(ids)] == [True] * 3
    assert tokenizer.encode("zqa zqa1 zqa2", add_special_tokens=False) == ids


def test_text_encoder_cache_is_refused(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="training.cache_text_encoder_outputs"):
        write_config(tmp_path / "config.toml", tiny_models, "sd1", method="textual_inversion",
                     embedding={"token_string": TOKEN}, training={"cache_text_encoder_outputs": True})


@pytest.mark.parametrize(("caption", "expected"), [
    ("a photo of {}", "a photo of zqtok zqtok1"),  # the placeholder wins
    ("{} and {}, zqtok", "zqtok zqtok1 and zqtok zqtok1, zqtok"),
    ("zqtok, red square", "zqtok zqtok1, red square"),  # the token spelled out, as sd-scripts replaces it
    ("ZqTok dog", "zqtok zqtok1 dog"),  # CLIP lowercases, so does the rule
    ("zqtok zqtok1, red square", "zqtok zqtok1, red square"),  # already spelled out: unchanged
    ("zqtoken, red square", "zqtok zqtok1, zqtoken, red square"),  # only whole words count; else put in front
    ("sks dog, red square", "zqtok zqtok1, sks dog, red square"),  # DreamBooth-style class tokens
    ("", "zqtok zqtok1"),
])
def test_caption_rule(caption, expected):
    assert caption_with_token(caption, TOKEN, 2) == expected


def test_single_vector_captions_and_sample_prompts():
    assert caption_with_token("zqtok dog", TOKEN, 1) == "zqtok dog"
    assert caption_with_token("a dog", TOKEN, 1) == "zqtok, a dog"
    # Prompts (samples) get the vectors written out but nothing put in front.
    assert expand_token("a zqtok on a hill", TOKEN, 3) == "a zqtok zqtok1 zqtok2 on a hill"
    assert expand_token("a dog", TOKEN, 3) == "a dog"
