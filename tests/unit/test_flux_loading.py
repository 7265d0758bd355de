"""FLUX.1 / Chroma loading (issue 12): every source kind, detection, fp8, tokenizers, errors, AE and text encoding.

The models are the tiny BFL files of tests/flux_tiny.py; diffusers folders are written from them with our
converter and checked against diffusers' own transformer classes, so a naming or split mistake cannot hide.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

torch = pytest.importorskip("torch")
from flux_tiny import (  # noqa: E402 (after the environment is set)
    VARIANTS,
    ae_to_bfl,
    diffusers_transformer_config,
    tiny_ae,
    tiny_clip,
    tiny_flux_files,
    tiny_t5,
    tiny_t5_tokenizer,
    write_spiece_tokenizer,
    write_tiny_diffusers,
)
from safetensors.torch import load_file, save_file  # noqa: E402

from engine.models.flux.convert import bfl_to_diffusers, diffusers_to_bfl  # noqa: E402
from engine.models.flux.loading import detect_flux_file, load_flux_model  # noqa: E402
from engine.models.flux.text import encode_flux  # noqa: E402
from engine.models.flux.text_encoders import clip_config_from_shapes, t5_config_from_shapes  # noqa: E402
from engine.models.flux.tokenizers import load_clip_tokenizer, load_t5_tokenizer  # noqa: E402
from engine.models.single_file import ModelLoadError  # noqa: E402
from engine.models.text_encoders import text_encoders_identity  # noqa: E402
from engine.models.vae import weights_identity  # noqa: E402


@pytest.fixture(scope="module")
def tiny() -> dict[str, dict[str, Path]]:
    return {variant: tiny_flux_files(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-diffusers")
    return {variant: write_tiny_diffusers(tiny[variant], root / variant, variant) for variant in ("dev", "chroma")}


def _load(files: dict[str, Path], model: Path | None = None, **overrides):
    options = {"clip_l": files["clip_l"], "t5xxl": files["t5xxl"], "ae": files["ae"],
               "tokenizer_cache_dir": files["t5_tokenizer"], **overrides}
    return load_flux_model(model or files["model"], **options)


def _assert_same_state(module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key].float(), tensor.float()), key


# --- sources -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfl_file_loads_with_its_variant(tiny, variant):
    files = tiny[variant]
    loaded = _load(files)
    assert loaded.family == ("chroma" if variant == "chroma" else "flux1")
    assert loaded.scheduler_config["variant"] == variant
    assert loaded.model_file == files["model"]
    _assert_same_state(loaded.unet, load_file(str(files["model"])))
    assert [type(e).__name__ for e in loaded.text.encoders] == \
        (["T5EncoderModel"] if variant == "chroma" else ["CLIPTextModel", "T5EncoderModel"])
    assert loaded.vae.vae.config.latent_channels == 16
    assert (loaded.vae.scaling_factor, loaded.vae.shift_factor) == (0.3611, 0.1159)
    assert loaded.vae.vae.config.shift_factor == 0.1159


def test_comfyui_prefixed_all_in_one_file_and_sft_suffix_load(tiny, tmp_path):
    files = tiny["dev"]
    state = load_file(str(files["model"]))
    # Prefix per key; another component's keys in the same file are left alone.
    mixed = {f"model.diffusion_model.{key}": tensor for key, tensor in state.items()}
    mixed["vae.encoder.conv_in.weight"] = torch.zeros(2, 2)
    comfy = tmp_path / "flux1-dev-comfy.sft"
    save_file(mixed, str(comfy))
    _assert_same_state(_load(files, comfy).unet, state)
    assert detect_flux_file(comfy) == "flux1"


@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_diffusers_folder_loads_the_same_model(tiny, folders, variant):
    from_file = _load(tiny[variant])
    from_folder = load_flux_model(folders[variant])  # encoders, tokenizers and AE from the folder itself
    assert from_folder.family == from_file.family and from_folder.model_file is None
    _assert_same_state(from_folder.unet, load_file(str(tiny[variant]["model"])))
    assert from_folder.text.identity == from_file.text.identity
    assert from_folder.vae.identity == from_file.vae.identity
    assert from_folder.scheduler_config["use_dynamic_shifting"] is True
    assert from_folder.scheduler_config["variant"] == variant
    assert detect_flux_file(folders[variant]) == from_file.family


def test_separate_files_override_the_folders_components(tiny, folders, tmp_path):
    other_ae = tmp_path / "ae.safetensors"
    ae = tiny_ae()
    with torch.no_grad():
        ae.encoder.conv_in.weight.mul_(2)
    save_file(ae_to_bfl(ae.state_dict()), str(other_ae))
    loaded = load_flux_model(folders["dev"], ae=other_ae)
    assert loaded.vae.identity == weights_identity(ae.state_dict())


@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_converted_keys_load_strictly_into_diffusers_transformers(tiny, variant):
    import diffusers

    config = diffusers_transformer_config(variant)
    model_class = getattr(diffusers, config.pop("_class_name"))
    model = model_class(**config)
    converted, leftover = bfl_to_diffusers(load_file(str(tiny[variant]["model"])))
    assert leftover == []
    model.load_state_dict(converted, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_flux_matches_diffusers_transformer_with_converted_weights(tiny, variant):
    """Names, Q/K/V splits and the final layer's (shift, scale) swap, checked by running both models."""
    import diffusers

    loaded = _load(tiny[variant])
    config = diffusers_transformer_config(variant)
    reference = getattr(diffusers, config.pop("_class_name"))(**config).eval()
    reference.load_state_dict(bfl_to_diffusers(loaded.unet.state_dict())[0], strict=True)
    generator = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 6, 64, generator=generator), torch.randn(2, 5, 32, generator=generator)
    y, sigma = torch.randn(2, 32, generator=generator), torch.tensor([0.3, 0.8])
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(2.0), torch.arange(3.0), indexing="ij"), -1)
    img_ids, txt_ids = img_ids.reshape(-1, 3), torch.zeros(5, 3)
    inputs = {"hidden_states": img, "encoder_hidden_states": txt, "timestep": sigma, "img_ids": img_ids,
              "txt_ids": txt_ids}
    if variant == "chroma":
        y = guidance = None
    else:
        guidance = torch.tensor([3.5, 1.0]) if variant == "dev" else None
        inputs.update(pooled_projections=y, guidance=guidance)
    with torch.no_grad():
        ours = loaded.unet(img, img_ids.expand(2, -1, -1), txt, txt_ids.expand(2, -1, -1), sigma, y, guidance)
        theirs = reference(**inputs).sample
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_bfl_diffusers_conversion_round_trips_and_swaps_the_final_modulation(tiny):
    state = load_file(str(tiny["dev"]["model"]))
    converted, _ = bfl_to_diffusers(state)
    shift, scale = state["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(converted["norm_out.linear.weight"], torch.cat([scale, shift]))
    q, k, v = state["double_blocks.1.img_attn.qkv.weight"].chunk(3)
    assert torch.equal(converted["transformer_blocks.1.attn.to_k.weight"], k)
    back, leftover = diffusers_to_bfl(converted)
    assert leftover == []
    assert set(back) == set(state) and all(torch.equal(back[key], state[key]) for key in state)


def test_diffusers_layout_single_file_loads(tiny, tmp_path):
    state = load_file(str(tiny["schnell"]["model"]))
    path = tmp_path / "transformer.safetensors"
    save_file(bfl_to_diffusers(state)[0], str(path))
    loaded = _load(tiny["schnell"], path)
    assert loaded.scheduler_config["variant"] == "schnell"
    _assert_same_state(loaded.unet, state)


def test_hub_id_in_the_local_cache_resolves_to_its_snapshot(folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny-flux"
    shutil.copytree(folders["dev"], repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_flux_model("someone/tiny-flux")
    assert loaded.source == "someone/tiny-flux" and loaded.scheduler_config["variant"] == "dev"
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*hf download"):
        load_flux_model("someone/not-cached-flux")


# --- fp8 -----------------------------------------------------------------------------------------------------------


def _fp8_copy(source: Path, target: Path, kind: torch.dtype) -> dict[str, torch.Tensor]:
    """Matrices in ``kind`` (as published fp8 files do), vectors kept in bfloat16."""
    state = {key: t.to(kind) if t.ndim == 2 else t.to(torch.bfloat16) for key, t in load_file(str(source)).items()}
    save_file(state, str(target))
    return state


def test_fp8_e4m3fn_file_kept_as_fp8_storage_or_cast_up(tiny, tmp_path):
    files = tiny["dev"]
    path = tmp_path / "flux1-dev-fp8.safetensors"
    state = _fp8_copy(files["model"], path, torch.float8_e4m3fn)
    kept = _load(files, path, fp8=True, dtype=torch.bfloat16).unet.state_dict()
    assert kept["img_in.weight"].dtype == torch.float8_e4m3fn and kept["img_in.bias"].dtype == torch.bfloat16
    assert torch.equal(kept["img_in.weight"].float(), state["img_in.weight"].float())
    cast = _load(files, path, fp8=False, dtype=torch.float32).unet.state_dict()
    assert {tensor.dtype for tensor in cast.values()} == {torch.float32}
    qkv = "double_blocks.0.img_attn.qkv.weight"
    assert torch.equal(cast[qkv], state[qkv].float())


@pytest.mark.parametrize("component", ["model", "t5xxl"])
def test_other_fp8_kinds_are_refused_naming_the_file(tiny, tmp_path, component):
    files = dict(tiny["dev"])
    files[component] = tmp_path / f"{component}-e5m2.safetensors"
    _fp8_copy(tiny["dev"][component], files[component], torch.float8_e5m2)
    with pytest.raises(ModelLoadError, match=rf"{files[component].name}.*float8_e5m2.*only float8_e4m3fn"):
        _load(files, files["model"], fp8=True)


def test_fp8_t5_file_is_cast_up(tiny, tmp_path):
    files = dict(tiny["dev"])
    files["t5xxl"] = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    _fp8_copy(tiny["dev"]["t5xxl"], files["t5xxl"], torch.float8_e4m3fn)
    loaded = _load(files, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.text.encoders[1].parameters()} == {torch.bfloat16}


# --- detection and errors ------------------------------------------------------------------------------------------


def test_detection_reads_the_family(tiny, tmp_path):
    assert [detect_flux_file(tiny[v]["model"]) for v in VARIANTS] == ["flux1", "flux1", "chroma"]
    assert detect_flux_file(tiny["dev"]["ae"]) is None
    assert detect_flux_file(_sd_checkpoint(tmp_path)) is None


def _sd_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    return path


def test_sd_checkpoint_given_as_flux_is_named(tiny, tmp_path):
    path = _sd_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match=rf"{path.name}: this is an SD1.x checkpoint, not a FLUX.1/Chroma"):
        _load(tiny["dev"], path)
    with pytest.raises(ModelLoadError, match=rf"{path.name}: no FLUX AE weights.*SD checkpoint"):
        _load(tiny["dev"], ae=path)


def test_lora_given_as_base_model_is_refused(tiny, tmp_path):
    path = tmp_path / "my_flux_lora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)}, str(path))
    with pytest.raises(ModelLoadError, match=rf"{path.name}: this is a LoRA file.*network.network_weights"):
        _load(tiny["dev"], path)


def test_t5_file_must_have_the_t5_encoder_layout(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match=r"clip_l.safetensors: not a T5 encoder.*CLIP text encoder.*model.t5xxl"):
        _load(tiny["dev"], t5xxl=tiny["dev"]["clip_l"])
    v10 = {key.replace("wi_0", "wi"): t for key, t in load_file(str(tiny["dev"]["t5xxl"])).items() if "wi_1" not in key}
    path = tmp_path / "t5_v1_0.safetensors"
    save_file(v10, str(path))
    with pytest.raises(ModelLoadError, match=r"t5_v1_0.safetensors: a T5 v1.0 encoder"):
        _load(tiny["dev"], t5xxl=path)


def test_t5_of_another_width_is_named(tiny, tmp_path):
    from transformers import T5Config, T5EncoderModel

    wide = T5EncoderModel(T5Config(vocab_size=96, d_model=48, d_kv=8, d_ff=40, num_layers=1, num_heads=2,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    path = tmp_path / "t5_wide.safetensors"
    save_file({k: v for k, v in wide.state_dict().items() if k != "encoder.embed_tokens.weight"}, str(path))
    with pytest.raises(ModelLoadError, match=r"t5_wide.safetensors: T5 width 48 does not fit.*expects 32.*model.t5xxl"):
        _load(tiny["dev"], t5xxl=path)


def test_ae_with_4_latent_channels_is_refused(tiny, tmp_path):
    from diffusers import AutoencoderKL

    sd_vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)
    path = tmp_path / "sd_vae.safetensors"
    save_file(ae_to_bfl(sd_vae.state_dict()), str(path))
    with pytest.raises(ModelLoadError, match=r"sd_vae.safetensors: an AE with 4 latent channels.*model.ae"):
        _load(tiny["dev"], ae=path)


def test_missing_components_name_their_config_key(tiny):
    with pytest.raises(ModelLoadError, match=r"model.clip_l is not set.*FLUX.1 needs it"):
        _load(tiny["dev"], clip_l=None)
    with pytest.raises(ModelLoadError, match=r"model.t5xxl is not set"):
        _load(tiny["dev"], t5xxl="")
    with pytest.raises(ModelLoadError, match=r"model.ae is not set"):
        _load(tiny["dev"], ae=None)
    assert len(_load(tiny["chroma"], clip_l=None).text.encoders) == 1  # Chroma needs no CLIP-L


def test_family_mismatch_and_missing_file_are_named(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match=r"chroma.safetensors: this is a Chroma model but model.model_family is "
                                             r"flux1; set model.model_family to chroma"):
        _load(tiny["chroma"], family="flux1")
    with pytest.raises(ModelLoadError, match=r"nowhere.safetensors.*no such file.*model.pretrained_model_name_or_path"):
        _load(tiny["dev"], tmp_path / "nowhere.safetensors")


# --- tokenizers ----------------------------------------------------------------------------------------------------


def test_clip_tokenizer_is_clip_l_s_without_a_folder():
    assert load_clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_t5_tokenizer_found_in_the_cache_dir_layouts(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))
    expected = tiny_t5_tokenizer()("a photo of sks cat").input_ids
    direct = load_t5_tokenizer(None, tiny["dev"]["t5_tokenizer"])
    sd_scripts_dir = tmp_path / "tokenizers"
    shutil.copytree(tiny["dev"]["t5_tokenizer"], sd_scripts_dir / "google_t5-v1_1-xxl")
    nested = load_t5_tokenizer(None, sd_scripts_dir)
    assert direct("a photo of sks cat").input_ids == nested("a photo of sks cat").input_ids == expected


def test_t5_tokenizer_from_spiece_model_alone_as_the_hub_ships_it(tmp_path):
    """google/t5-v1_1-xxl has no tokenizer.json; spiece.model loads without the sentencepiece package."""
    captions = ["a photo of sks cat", "xyz dog, 42!"]
    plain = load_t5_tokenizer(None, write_spiece_tokenizer(tmp_path / "plain"))
    assert plain(captions).input_ids == tiny_t5_tokenizer()(captions).input_ids
    with_extra = load_t5_tokenizer(None, write_spiece_tokenizer(tmp_path / "extra", extra_ids=3))
    pieces = len(plain)
    # As T5: the extra ids follow the pieces in reverse, <extra_id_0> last.
    assert with_extra.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_2>"]) == [pieces + 2, pieces]
    assert with_extra(captions).input_ids == plain(captions).input_ids


def test_t5_tokenizer_from_the_model_cache_only_when_its_download_finished(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = tmp_path / "cache" / "models" / "google_t5-v1_1-xxl"
    shutil.copytree(tiny["dev"]["t5_tokenizer"], cached)
    with pytest.raises(ModelLoadError) as error:  # no marker: an interrupted download is not used
        load_t5_tokenizer(None, None)
    message = str(error.value)
    assert "offline (HF_HUB_OFFLINE=1)" in message and "model.tokenizer_cache_dir" in message
    assert "hf download google/t5-v1_1-xxl" in message
    (cached / ".atelier-download.json").write_text(json.dumps({"repo_id": "google/t5-v1_1-xxl"}))
    assert load_t5_tokenizer(None, None)("a cat").input_ids == tiny_t5_tokenizer()("a cat").input_ids


def test_offline_without_a_t5_tokenizer_says_how_to_pass_one(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"T5-XXL tokenizer.*not found.*set model.tokenizer_cache_dir"):
        _load(tiny["dev"], tokenizer_cache_dir=tmp_path / "empty")


# --- configs from shapes -------------------------------------------------------------------------------------------


def test_real_clip_l_and_t5_xxl_configs_are_read_off_their_shapes():
    clip = {"embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768),
            "encoder.layers.0.mlp.fc1.weight": (3072, 768), "encoder.layers.11.mlp.fc1.weight": (3072, 768)}
    config = clip_config_from_shapes(clip)
    assert (config["num_attention_heads"], config["num_hidden_layers"], config["intermediate_size"]) == (12, 12, 3072)
    assert (config["hidden_act"], config["eos_token_id"]) == ("quick_gelu", 2)
    layer = "encoder.block.0.layer."
    t5 = {"shared.weight": (32128, 4096), f"{layer}0.SelfAttention.q.weight": (4096, 4096),
          f"{layer}0.SelfAttention.relative_attention_bias.weight": (32, 64),
          f"{layer}1.DenseReluDense.wi_0.weight": (10240, 4096), "encoder.block.23.layer.0.layer_norm.weight": (4096,)}
    config = t5_config_from_shapes(t5)
    assert {k: config[k] for k in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab_size")} == \
        {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "vocab_size": 32128}
    assert config["feed_forward_proj"] == "gated-gelu"


# --- AE ------------------------------------------------------------------------------------------------------------


def test_ae_encodes_and_decodes_as_diffusers_autoencoderkl_with_the_same_weights(tiny):
    loaded = _load(tiny["dev"]).vae
    reference = tiny_ae()
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ours = loaded.vae.encode(image).latent_dist
        theirs = reference.encode(image).latent_dist
        assert ours.mean.shape == (1, 16, 8, 6)
        torch.testing.assert_close(ours.mean, theirs.mean, atol=0, rtol=0)
        torch.testing.assert_close(ours.logvar, theirs.logvar, atol=0, rtol=0)
        torch.testing.assert_close(loaded.vae.decode(ours.mean).sample, reference.decode(theirs.mean).sample,
                                   atol=0, rtol=0)
    assert loaded.identity == weights_identity(reference.state_dict())
    z = torch.full((1,), 0.5)
    torch.testing.assert_close(loaded.normalize(z), (z - 0.1159) * 0.3611)


# --- text encoding -------------------------------------------------------------------------------------------------


def test_encode_flux_as_sd_scripts(tiny):
    text = _load(tiny["dev"]).text
    assert text.identity == text_encoders_identity([tiny_clip(), tiny_t5()], text.tokenizers)
    captions = ["a photo of sks cat", "red square"]
    with torch.no_grad():
        plain = encode_flux(text, captions, max_length=12, apply_mask=False)
        masked = encode_flux(text, captions, max_length=12, apply_mask=True)
        clip_ids = text.tokenizers[0](captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        clip_states = text.encoders[0](clip_ids).last_hidden_state
        tokens = text.tokenizers[1](captions, padding="max_length", max_length=12, return_tensors="pt")
        unmasked_t5 = text.encoders[1](tokens.input_ids).last_hidden_state
    assert plain.hidden_states.shape == (2, 12, 32) and plain.pooled.shape == (2, 32)
    # CLIP-L's pooled output: the final-norm state at the EOS (49407, the highest id), no projection, no mask.
    eos = (clip_ids == 49407).int().argmax(dim=1)
    torch.testing.assert_close(plain.pooled, clip_states[torch.arange(2), eos])
    torch.testing.assert_close(plain.hidden_states, unmasked_t5)
    assert plain.mask.dtype == torch.bool and plain.mask.sum(1).tolist() == [6, 3]  # words + EOS
    assert torch.equal(plain.mask, masked.mask)
    real = masked.mask
    assert not torch.allclose(masked.hidden_states[real], plain.hidden_states[real])  # padding no longer attended


def test_chroma_encodes_t5_only_and_bfloat16_keeps_identities(tiny):
    float32 = _load(tiny["chroma"], clip_l=None)
    bf16 = _load(tiny["chroma"], clip_l=None, dtype=torch.bfloat16)
    assert (bf16.text.identity, bf16.vae.identity) == (float32.text.identity, float32.vae.identity)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.text.encoders[0].dtype == torch.bfloat16
    with torch.no_grad():
        encoded = encode_flux(bf16.text, ["a cat"], max_length=8, apply_mask=True)
    assert encoded.pooled is None and encoded.hidden_states.shape == (1, 8, 32)
