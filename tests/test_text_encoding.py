"""Text encoders: loading, sd-scripts' caption encoding (checked against diffusers) and the text-encoder cache."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.cache.latent_files import cache_path as latent_cache_path
from engine.cache.text_encoder import (
    build_text_encoder_cache,
    cache_path,
    entry_status,
    expected_key,
    jobs_from_scan,
    load_entry,
)
from engine.config.io import validate_config
from engine.data.scan import scan_config
from engine.models.text_encoders import TextEncoderLoadError, load_text_encoders
from engine.models.text_encoding import encode_captions, tokenize_chunks

CAPTIONS = ["a photo of sks cat, red square!", "", "sks dog, blue circle, white background"]
# 86 CLIP tokens, 11 of them beyond the first 75 ("soft light" is among those).
LONG = ("sks dog sitting on a wooden porch, extraordinarily detailed watercolour landscape, misty mountains beyond "
        "a quiet lake at dawn, tall pine trees along the shore, a small red boat tied to a weathered pier, "
        "reflections rippling across the water, wildflowers in the foreground, scattered clouds drifting over "
        "snowy peaks, birds circling high above the valley, a winding path leading into the forest, golden reeds "
        "swaying in the breeze, soft light")


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return {family: load_text_encoders(tiny_models[family]) for family in ("sd1", "sd2", "sdxl")}


def encode(loaded_encoders, captions, clip_skip=1, max_token_length=75):
    with torch.no_grad():
        return encode_captions(loaded_encoders, captions, clip_skip=clip_skip, max_token_length=max_token_length)


# --- loading -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("with_config_dir", [False, True], ids=["shipped-configs", "config-dir"])
def test_single_file_loads_the_folders_encoders(tiny_models, loaded, family, with_config_dir):
    config_dir = tiny_models[family] if with_config_dir else None
    from_file = load_text_encoders(tiny_models[f"{family}_ckpt"], config_dir=config_dir)
    folder = loaded[family]
    assert (from_file.family, folder.family) == (family, family)
    assert [type(e).__name__ for e in from_file.encoders] == [type(e).__name__ for e in folder.encoders] == (
        ["CLIPTextModel", "CLIPTextModelWithProjection"] if family == "sdxl" else ["CLIPTextModel"])
    assert from_file.identity == folder.identity
    assert len({loaded[f].identity for f in loaded}) == 3


def test_loading_errors_name_the_file_and_what_to_do(tiny_models, tmp_path):
    lora = tmp_path / "style_lora.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(TextEncoderLoadError, match=r"style_lora\.safetensors: this is a LoRA file, not a base model"):
        load_text_encoders(lora)
    with pytest.raises(TextEncoderLoadError, match="is an sdxl model folder, but .* is an sd1 checkpoint"):
        load_text_encoders(tiny_models["sd1_ckpt"], config_dir=tiny_models["sdxl"])
    with pytest.raises(TextEncoderLoadError, match="this model folder is SDXL but model.model_family is sd1"):
        load_text_encoders(tiny_models["sdxl"], family="sd1")
    with pytest.raises(TextEncoderLoadError, match="this checkpoint is SD1.x but model.model_family is sd2"):
        load_text_encoders(tiny_models["sd1_ckpt"], family="sd2")
    with pytest.raises(TextEncoderLoadError, match="model not found"):
        load_text_encoders(tiny_models["sd1"] / "missing")


# --- encoding: 75 tokens equals diffusers ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd_encoding_equals_diffusers_encode_prompt(tiny_models, loaded, family):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models[family], local_files_only=True)
    with torch.no_grad():
        reference, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
        assert torch.equal(encode(loaded[family], CAPTIONS).hidden_states, reference)
        # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, which transformers >= 5.6 no longer has
        # ("'CLIPTextModel' object has no attribute 'text_model'"); point the old name at the model itself.
        if not hasattr(pipe.text_encoder, "text_model"):
            object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
        # diffusers' clip_skip k takes hidden_states[-(k + 1)]: ours (sd-scripts') is theirs + 1.
        skipped, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False, clip_skip=1)
    ours = encode(loaded[family], CAPTIONS, clip_skip=2)
    assert ours.pooled is None and torch.equal(ours.hidden_states, skipped)
    assert not torch.equal(skipped, reference)
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 2"):
        encode(loaded[family], CAPTIONS, clip_skip=3)


def test_sdxl_encoding_equals_diffusers_and_ignores_clip_skip(tiny_models, loaded):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models["sdxl"], local_files_only=True)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    ours = encode(loaded["sdxl"], CAPTIONS)
    assert ours.hidden_states.shape == (3, 77, 32 + 64)
    assert torch.equal(ours.hidden_states, embeds) and torch.equal(ours.pooled, pooled)
    assert torch.equal(encode(loaded["sdxl"], CAPTIONS, clip_skip=2).hidden_states, ours.hidden_states)


# --- encoding: long captions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_long_captions_are_encoded_in_chunks(loaded, family):
    encoders = loaded[family]
    assert 75 < len(encoders.tokenizers[0](LONG, truncation=True, max_length=150).input_ids) - 2 < 150
    captions = [*CAPTIONS, LONG]
    short = encode(encoders, captions)
    width = short.hidden_states.shape[-1]
    for length in (150, 225):
        chunked = encode(encoders, captions, max_token_length=length)
        assert chunked.hidden_states.shape == (4, length + 2, width)
        # BOS and the first chunk's 75 inner positions are the 75-token encoding's; position 76 is already the
        # second chunk's first inner position, so it (and everything after) differs, for short captions too.
        assert torch.equal(chunked.hidden_states[:, :76], short.hidden_states[:, :76])
        assert not torch.equal(chunked.hidden_states[:, 76], short.hidden_states[:, 76])
        if family == "sdxl":  # the pooled embedding comes from the first chunk
            assert torch.equal(chunked.pooled, short.pooled)
    # Tokens past the first 75 are truncated at 75 but encoded at 150.
    changed_tail = LONG.replace("soft light", "warm light")
    assert torch.equal(*tokenize_chunks(encoders.tokenizers[0], [LONG, changed_tail], 75))
    pair_75, pair_150 = encode(encoders, [LONG, changed_tail]), encode(encoders, [LONG, changed_tail], 1, 150)
    assert torch.equal(pair_75.hidden_states[0], pair_75.hidden_states[1])
    assert not torch.equal(pair_150.hidden_states[0], pair_150.hidden_states[1])


def test_open_clip_chunks_get_sd_scripts_eos_fixups(loaded):
    tokenizer = loaded["sdxl"].tokenizers[1]  # pads with "!", not EOS, like SD2's and SDXL's OpenCLIP tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos
    chunks = tokenize_chunks(tokenizer, ["a dog", LONG], 150)
    assert chunks.shape == (2, 2, 77) and (chunks[:, :, 0] == bos).all()
    assert chunks[0, 0, :4].tolist() == [bos, tokenizer.convert_tokens_to_ids("a</w>"), tokenizer.convert_tokens_to_ids(
        "dog</w>"), eos]
    assert chunks[0, 1, 1] == eos and (chunks[0, 1, 2:] == pad).all()  # an empty chunk: BOS EOS pad ...
    assert chunks[1, 0, -1] == eos  # a chunk cut in the middle of the text ends with EOS, not pad
    tail = len(tokenizer(LONG, truncation=True, max_length=152).input_ids) - 2 - 75
    assert chunks[1, 1, 1 + tail] == eos and (chunks[1, 1, 2 + tail:] == pad).all()  # the tail, EOS, pads


# --- the cache -----------------------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tiny_models, tmp_path):
    return Path(shutil.copytree(tiny_models["dataset"], tmp_path / "dataset"))


def scan_text_jobs(root: Path, **general):
    settings = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, **general}
    config = validate_config({"dataset": {"train_data_dir": str(root / "img"), "reg_data_dir": str(root / "reg"),
                                          "general": settings}}, check_packages=False)
    return jobs_from_scan(scan_config(config, root))


def build(jobs, encoders, **options):
    return build_text_encoder_cache(jobs, encoders, **{"clip_skip": 1, "max_token_length": 75, **options})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cache_holds_exactly_what_encode_captions_gives_and_is_reused(dataset, loaded, family):
    encoders = loaded[family]
    jobs = scan_text_jobs(dataset, caption_prefix="best")
    assert jobs[0].caption.startswith("best sks dog, ") and any(job.caption == "best dog" for job in jobs)
    report = build(jobs, encoders, batch_size=64)
    assert (report.total, report.encoded, report.reused, report.failed) == (len(jobs), len(jobs), 0, [])
    # One batch of the distinct captions in sorted order, as the cache batches them: bit for bit the same.
    captions = sorted({job.caption for job in jobs})
    reference = encode(encoders, captions)
    for job in jobs:
        entry = load_entry(cache_path(job.record.path, family))
        row = captions.index(job.caption)
        assert np.array_equal(entry.hidden_states, reference.hidden_states[row].numpy())
        assert (entry.pooled is None) == (family != "sdxl")
        if family == "sdxl":
            assert np.array_equal(entry.pooled, reference.pooled[row].numpy())
        assert entry.key.caption == job.caption and entry.key.encoder == encoders.identity
    again = build(jobs, encoders)
    assert (again.encoded, again.reused, again.rebuilt_stale) == (0, len(jobs), [])
    memory = build(jobs, encoders, to_disk=False, batch_size=64)
    assert all(np.array_equal(memory.outputs[job.record.path].hidden_states,
                              load_entry(cache_path(job.record.path, family)).hidden_states) for job in jobs)


def test_cache_is_rebuilt_when_caption_clip_skip_or_encoder_changes(dataset, loaded, tiny_models, tmp_path):
    encoders = loaded["sd1"]
    jobs = scan_text_jobs(dataset)
    build(jobs, encoders)
    first = jobs[0]
    Path(first.record.path).with_suffix(".txt").write_text("sks dog, a new caption", encoding="utf-8")
    jobs = scan_text_jobs(dataset)
    report = build(jobs, encoders)
    assert (report.encoded, report.reused) == (1, len(jobs) - 1)
    assert report.rebuilt_stale == [(cache_path(first.record.path, "sd1"), "the caption changed")]
    report = build(jobs, encoders, clip_skip=2)
    assert report.encoded == len(jobs) and {r for _, r in report.rebuilt_stale} == {"clip_skip changed from 1 to 2"}
    # Other weights in the same layout: a copy of the model with one weight nudged.
    changed = Path(shutil.copytree(tiny_models["sd1"], tmp_path / "sd1-changed"))
    model = load_text_encoders(changed).encoders[0]
    with torch.no_grad():
        model.final_layer_norm.weight.add_(0.01)
    model.save_pretrained(changed / "text_encoder")
    other = load_text_encoders(changed)
    assert other.identity != encoders.identity
    report = build(jobs, other, clip_skip=2)
    assert report.encoded == len(jobs) and {r for _, r in report.rebuilt_stale} == {"the text encoder changed"}
    assert build(jobs, other, clip_skip=2, skip_existing=False).encoded == len(jobs)
    assert build(jobs, other, clip_skip=2).reused == len(jobs)


def test_cache_folder_status_reasons_and_refusals(dataset, loaded, tmp_path):
    encoders, cache_dir = loaded["sdxl"], tmp_path / "cache"
    jobs = scan_text_jobs(dataset)
    image = jobs[0].record.path
    path = cache_path(image, "sdxl", cache_dir)
    assert path.parent == latent_cache_path(image, (64, 64), "sdxl", cache_dir).parent
    assert path.name == f"{image.stem}_te_outputs_sdxl.npz"
    key = expected_key(jobs[0].caption, encoder_identity=encoders.identity, clip_skip=1, max_token_length=75,
                       family="sdxl", dtype="float32")
    assert entry_status(path, key) == ("missing", "not cached yet")
    assert build(jobs, encoders, cache_dir=cache_dir).encoded == len(jobs)
    assert not any(p.name.endswith("_te_outputs_sdxl.npz") for p in image.parent.iterdir())
    assert entry_status(path, key) == ("ok", "")
    assert entry_status(path, expected_key(jobs[0].caption, encoder_identity=None, clip_skip=2, max_token_length=150,
                                           family="sdxl", dtype=None)) == ("stale", "max_token_length changed from "
                                                                                    "75 to 150")
    path.write_bytes(b"not a zip")
    assert entry_status(path, key)[0] == "unreadable"
    report = build(jobs, encoders, cache_dir=cache_dir)
    assert report.encoded == 1 and report.rebuilt_stale[0][1].startswith("the cache file cannot be read")
    with pytest.raises(ValueError, match="captions change during training"):
        scan_text_jobs(dataset, shuffle_caption=True)
