"""SD3 / SD3.5 loading (issue 13): every source kind gives the same model, detection, and the errors that name what
to set.

The models are the tiny SAI files of tests/sd3_tiny.py; the diffusers folder is written from them with our
converter, so a naming mistake in either direction shows as a different transformer.
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
from flux_tiny import tiny_flux_files, write_tiny_diffusers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from sd3_tiny import (  # noqa: E402 (after the environment is set)
    EMBEDDED,
    SAI_PREFIX,
    VARIANTS,
    tiny_clip_g,
    tiny_clip_l,
    tiny_sd3_files,
    tiny_t5,
    tiny_vae,
    write_tiny_sd3_diffusers,
)

from engine.models.ldm_keys import vae_to_ldm  # noqa: E402
from engine.models.sd3.files import detect_sd3_file  # noqa: E402
from engine.models.sd3.loading import load_sd3_model  # noqa: E402
from engine.models.sd3.text import encode_sd3  # noqa: E402
from engine.models.single_file import ModelLoadError  # noqa: E402
from engine.models.text_encoders import text_encoders_identity  # noqa: E402
from engine.models.vae import weights_identity  # noqa: E402


@pytest.fixture(scope="module")
def tiny() -> dict[str, dict[str, Path]]:
    return {variant: tiny_sd3_files(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory) -> Path:
    """The 5-medium model as a diffusers folder (attn2 and the swapped halves go through the converter)."""
    return write_tiny_sd3_diffusers(tiny["5-medium"], tmp_path_factory.mktemp("sd3-diffusers") / "5-medium")


@pytest.fixture(scope="module")
def sd1_checkpoint(tmp_path_factory) -> Path:
    """tools/make_tiny_model.py's SD1 single file (kept under $ATELIER_TINY_MODELS when set)."""
    import fcntl
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "tools" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("atelier_make_tiny_model", script)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    out = Path(os.environ.get("ATELIER_TINY_MODELS") or tmp_path_factory.mktemp("tiny"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder.build_sd("sd1", out)
    return builder.sd_checkpoint_path(out, "sd1")


def _load(files: dict[str, Path], model: Path | None = None, **overrides):
    options = {"clip_l": files["clip_l"], "clip_g": files["clip_g"], "t5xxl": files["t5xxl"],
               "tokenizer_cache_dir": files["t5_tokenizer"], **overrides}
    return load_sd3_model(model or files["model"], **options)


def _transformer_state(path: Path) -> dict[str, torch.Tensor]:
    return {key.removeprefix(SAI_PREFIX): t for key, t in load_file(str(path)).items() if key.startswith(SAI_PREFIX)}


def _assert_same_state(module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key].float(), tensor.float()), key


def _encoded(loaded):
    with torch.no_grad():
        return encode_sd3(loaded.text, ["a photo of sks cat", "red square"], t5_max_length=12)


def _assert_same_text(first, second) -> None:
    assert first.text.identity == second.text.identity
    a, b = _encoded(first), _encoded(second)
    torch.testing.assert_close(a.hidden_states, b.hidden_states, atol=0, rtol=0)
    torch.testing.assert_close(a.pooled, b.pooled, atol=0, rtol=0)


# --- sources -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_file_with_separate_text_encoders_loads_each_variant(tiny, variant):
    files = tiny[variant]
    loaded = _load(files)
    assert loaded.family == "sd3" and loaded.model_file == files["model"]
    assert loaded.scheduler_config["variant"] == variant and loaded.scheduler_config["shift"] == 3.0
    assert loaded.unet.params.variant == variant
    _assert_same_state(loaded.unet, _transformer_state(files["model"]))
    assert [type(e).__name__ for e in loaded.text.encoders] == \
        ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert loaded.text.family == "sd3"
    assert loaded.text.identity == text_encoders_identity([tiny_clip_l(), tiny_clip_g(), tiny_t5()],
                                                          loaded.text.tokenizers)
    assert [tok.pad_token_id for tok in loaded.text.tokenizers[:2]] == [49407, 0]
    vae = loaded.vae
    assert (vae.family, vae.scaling_factor, vae.shift_factor) == ("sd3", 1.5305, 0.0609)
    assert vae.vae.config.latent_channels == 16 and vae.vae.config.shift_factor == 0.0609
    assert vae.identity == weights_identity(tiny_vae().state_dict())


@pytest.mark.parametrize("variant", ["medium", "5-large"])
def test_embedded_single_file_is_the_same_model_and_separate_files_win(tiny, variant, tmp_path):
    files = tiny[variant]
    separate = _load(files)
    embedded_file = tiny_sd3_files(variant, embedded=True)["model"]
    embedded = load_sd3_model(embedded_file, tokenizer_cache_dir=files["t5_tokenizer"])
    assert embedded.model_file == embedded_file and embedded.scheduler_config["variant"] == variant
    _assert_same_state(embedded.unet, _transformer_state(files["model"]))
    _assert_same_text(separate, embedded)
    assert embedded.vae.identity == separate.vae.identity
    other = tiny_clip_g()
    with torch.no_grad():
        other.text_projection.weight.mul_(2)
    other_file = tmp_path / "clip_g_other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(other_file))
    overridden = load_sd3_model(embedded_file, clip_g=other_file, tokenizer_cache_dir=files["t5_tokenizer"])
    assert overridden.text.identity == text_encoders_identity([tiny_clip_l(), other, tiny_t5()],
                                                              overridden.text.tokenizers)


def test_diffusers_folder_loads_the_same_model(tiny, folder):
    from_file = _load(tiny["5-medium"])
    from_folder = load_sd3_model(folder)  # encoders, tokenizers and VAE from the folder itself
    assert from_folder.family == "sd3" and from_folder.model_file is None
    assert from_folder.scheduler_config["variant"] == "5-medium" and from_folder.scheduler_config["shift"] == 3.0
    _assert_same_state(from_folder.unet, _transformer_state(tiny["5-medium"]["model"]))
    _assert_same_text(from_file, from_folder)
    assert from_folder.vae.identity == from_file.vae.identity
    assert detect_sd3_file(folder)


def test_diffusers_folder_loads_into_diffusers_pipeline(tiny, folder):
    """The folder our writer makes is a real StableDiffusion3Pipeline (its transformer config and weights fit)."""
    from diffusers import StableDiffusion3Pipeline

    from engine.models.sd3.convert import sai_to_diffusers

    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True)
    assert tuple(pipe.transformer.config.dual_attention_layers) == (0,)
    _assert_same_state(pipe.transformer, sai_to_diffusers(_transformer_state(tiny["5-medium"]["model"]))[0])


def test_hub_id_in_the_local_cache_resolves_to_its_snapshot(folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny-sd3"
    shutil.copytree(folder, repo / "snapshots" / ("b" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_sd3_model("someone/tiny-sd3")
    assert loaded.source == "someone/tiny-sd3" and loaded.scheduler_config["variant"] == "5-medium"
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*hf download"):
        load_sd3_model("someone/not-cached-sd3")


def test_transformer_only_file_and_vae_files(tiny, tmp_path):
    files = tiny["medium"]
    state = _transformer_state(files["model"])
    bare = tmp_path / "mmdit_only.safetensors"
    save_file(state, str(bare))
    assert detect_sd3_file(bare)
    with pytest.raises(ModelLoadError, match=r"model.vae is not set and mmdit_only.safetensors has no VAE inside"):
        _load(files, bare)
    # The VAE from another SAI file (first_stage_model.*), and from a standalone LDM-named VAE file.
    from_sai = _load(files, bare, vae=files["model"])
    _assert_same_state(from_sai.unet, state)
    standalone = tmp_path / "sd3_vae.safetensors"
    ldm = vae_to_ldm(tiny_vae().state_dict())
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in ldm.items()}, str(standalone))
    assert _load(files, bare, vae=standalone).vae.identity == from_sai.vae.identity


def test_clip_l_without_projection_gets_the_identity(tiny, tmp_path):
    files = dict(tiny["medium"])
    files["clip_l"] = tmp_path / "clip_l_no_projection.safetensors"
    save_file({k: v for k, v in load_file(str(tiny["medium"]["clip_l"])).items() if k != "text_projection.weight"},
              str(files["clip_l"]))
    clip_l = _load(files).text.encoders[0]
    assert torch.equal(clip_l.text_projection.weight, torch.eye(32))


def test_fp8_e4m3fn_file_kept_as_fp8_storage_or_cast_up(tiny, tmp_path):
    files = tiny["5-large"]
    path = tmp_path / "sd3-fp8.safetensors"
    state = {k: (v.to(torch.float8_e4m3fn) if k.startswith(SAI_PREFIX) and v.ndim == 2 else v.to(torch.bfloat16))
             for k, v in load_file(str(files["model"])).items()}
    save_file(state, str(path))
    key = "joint_blocks.0.x_block.attn.qkv.weight"
    kept = _load(files, path, fp8=True, dtype=torch.bfloat16).unet.state_dict()
    assert kept[key].dtype == torch.float8_e4m3fn
    assert kept["joint_blocks.0.x_block.attn.qkv.bias"].dtype == torch.bfloat16
    cast = _load(files, path, dtype=torch.float32).unet.state_dict()
    assert cast[key].dtype == torch.float32 and torch.equal(cast[key], state[SAI_PREFIX + key].float())


# --- detection -----------------------------------------------------------------------------------------------------


def test_detection_reads_headers(tiny, sd1_checkpoint, tmp_path):
    assert all(detect_sd3_file(tiny[v]["model"]) for v in VARIANTS)
    assert detect_sd3_file(tiny_sd3_files("5-medium", embedded=True)["model"])
    flux = tiny_flux_files("dev")
    assert not detect_sd3_file(flux["model"]) and not detect_sd3_file(flux["ae"])
    assert not detect_sd3_file(sd1_checkpoint)
    assert not detect_sd3_file(tiny["medium"]["clip_g"])
    assert not detect_sd3_file(write_tiny_diffusers(flux, tmp_path / "flux", "dev"))
    with pytest.raises(ModelLoadError, match="no such file"):
        detect_sd3_file(tmp_path / "missing.safetensors")


# --- errors --------------------------------------------------------------------------------------------------------


def test_missing_components_name_their_config_key(tiny):
    files = tiny["medium"]
    with pytest.raises(ModelLoadError, match=r"sd3-medium.safetensors has no CLIP-G inside; set model.clip_g to "
                                             r"clip_g.safetensors"):
        _load(files, clip_g=None)
    with pytest.raises(ModelLoadError, match=r"model.clip_l is not set.*no CLIP-L inside.*clip_l.safetensors"):
        _load(files, clip_l="")
    with pytest.raises(ModelLoadError, match=r"model.t5xxl is not set.*no T5-XXL inside.*t5xxl_fp16.safetensors"):
        _load(files, t5xxl=None)


def test_lora_given_as_base_model_is_refused(tiny, tmp_path):
    path = tmp_path / "my_sd3_lora.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 128),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(384, 4)}, str(path))
    with pytest.raises(ModelLoadError, match=rf"{path.name}: this is a LoRA file.*network.network_weights.*SD3/SD3.5"):
        _load(tiny["medium"], path)
    assert not detect_sd3_file(path)
    with pytest.raises(ModelLoadError, match=rf"{path.name}: this is a LoRA file.*model.clip_g"):
        _load(tiny["medium"], clip_g=path)


def test_flux_and_sd1_files_given_as_sd3_are_named(tiny, sd1_checkpoint, tmp_path):
    flux = tiny_flux_files("dev")
    with pytest.raises(ModelLoadError, match=r"flux1-dev.safetensors: this is a FLUX.1 model, not an SD3/SD3.5 one; "
                                             r"set model.model_family to flux1"):
        _load(tiny["medium"], flux["model"])
    with pytest.raises(ModelLoadError, match=r"sd1.safetensors: this is an SD1.x checkpoint, not an SD3/SD3.5 model; "
                                             r"set model.model_family to sd1"):
        _load(tiny["medium"], sd1_checkpoint)
    with pytest.raises(ModelLoadError, match=r"a FluxPipeline folder, not an SD3/SD3.5 one"):
        _load(tiny["medium"], write_tiny_diffusers(flux, tmp_path / "flux", "dev"))
    with pytest.raises(ModelLoadError, match=r"sd1.safetensors: a VAE with 4 latent channels.*model.vae"):
        _load(tiny["medium"], vae=sd1_checkpoint)
    with pytest.raises(ModelLoadError, match=r"t5xxl.safetensors: not a CLIP text encoder.*T5 encoder.*model.clip_g"):
        _load(tiny["medium"], clip_g=tiny["medium"]["t5xxl"])


def test_t5_of_another_width_is_named(tiny):
    flux_t5 = tiny_flux_files("dev")["t5xxl"]  # width 32; the tiny MMDiT's context is 64
    with pytest.raises(ModelLoadError, match=r"t5xxl.safetensors: T5 width 32 does not fit the transformer, which "
                                             r"expects 64.*model.t5xxl"):
        _load(tiny["medium"], t5xxl=flux_t5)


def _clip_file(path: Path, width: int, projection: int | None) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=37, num_hidden_layers=1, num_attention_heads=1,
                            vocab_size=49408, projection_dim=projection or width, hidden_act="gelu")
    state = CLIPTextModelWithProjection(config).state_dict()
    if projection is None:
        state.pop("text_projection.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_clip_widths_that_do_not_fit_are_named(tiny, tmp_path):
    files = tiny["medium"]
    pooled = _clip_file(tmp_path / "clip_g_proj48.safetensors", 32, 48)
    with pytest.raises(ModelLoadError, match=r"clip_g_proj48.safetensors: CLIP-L \+ CLIP-G pooled widths 32 \+ 48 = 80 "
                                             r"do not fit the transformer, which expects 64 \(adm_in_channels\); check "
                                             r"model.clip_l.*and model.clip_g"):
        _load(files, clip_g=pooled)
    wide = _clip_file(tmp_path / "clip_g_wide.safetensors", 64, 32)
    with pytest.raises(ModelLoadError, match=r"CLIP-L \+ CLIP-G widths 32 \+ 64 = 96 exceed the transformer's context "
                                             r"width 64"):
        _load(files, clip_g=wide)
    no_projection = _clip_file(tmp_path / "clip_g_bare.safetensors", 32, None)
    with pytest.raises(ModelLoadError, match=r"clip_g_bare.safetensors: a CLIP text model without text_projection"):
        _load(files, clip_g=no_projection)


def test_missing_file_and_embedded_prefixes_are_per_key(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match=r"nowhere.safetensors.*no such file.*model.pretrained_model_name_or_path"):
        _load(tiny["medium"], tmp_path / "nowhere.safetensors")
    # An all-in-one file whose CLIP-G is missing: the other embedded parts still load, CLIP-G is asked for.
    state = {k: v for k, v in load_file(str(tiny_sd3_files("medium", embedded=True)["model"])).items()
             if not k.startswith(EMBEDDED["clip_g"])}
    path = tmp_path / "sd3_incl_clip_l_t5.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=r"sd3_incl_clip_l_t5.safetensors has no CLIP-G inside"):
        load_sd3_model(path, tokenizer_cache_dir=tiny["medium"]["t5_tokenizer"])
    loaded = load_sd3_model(path, clip_g=tiny["medium"]["clip_g"], tokenizer_cache_dir=tiny["medium"]["t5_tokenizer"])
    assert json.dumps(loaded.scheduler_config["variant"]) == '"medium"'


def test_real_clip_g_config_is_read_off_its_shapes():
    from engine.models.configs import shipped_configs
    from engine.models.flux.text_encoders import clip_config_from_shapes

    shapes = {"embeddings.token_embedding.weight": (49408, 1280), "embeddings.position_embedding.weight": (77, 1280),
              "encoder.layers.0.mlp.fc1.weight": (5120, 1280), "encoder.layers.31.mlp.fc1.weight": (5120, 1280),
              "text_projection.weight": (1280, 1280)}
    config = clip_config_from_shapes(shapes, shipped_configs("sdxl")["text_encoder_2"])
    assert (config["num_attention_heads"], config["num_hidden_layers"], config["intermediate_size"]) == (20, 32, 5120)
    assert (config["hidden_act"], config["projection_dim"], config["eos_token_id"]) == ("gelu", 1280, 2)


def test_a_diffusers_layout_sd3_transformer_file_is_not_taken_for_flux(tiny, tmp_path):
    """diffusers' SD3 and FLUX transformers share their joint-block key names; a lone SD3 transformer in diffusers
    naming must not be read as FLUX.1 (whose loader would then fail on a missing img_in) but be sent to its folder."""
    from engine.models.loading import detect_model_family, load_model
    from engine.models.sd3.convert import sai_to_diffusers

    state = load_file(str(tiny["5-large"]["model"]))
    transformer = {key.removeprefix("model.diffusion_model."): value for key, value in state.items()
                   if key.startswith("model.diffusion_model.")}
    path = tmp_path / "sd3_transformer_diffusers.safetensors"
    save_file(sai_to_diffusers(transformer)[0], str(path))
    for attempt in (lambda: detect_model_family(path), lambda: load_model(path)):
        with pytest.raises(ModelLoadError, match="point at the whole diffusers folder"):
            attempt()
