"""Loading base models (engine.models.loading): single files, diffusers folders, hub ids, shipped configs, tokenizers.

The shipped configs are checked against the published model sizes on the meta device (no weights), and the shape
inference against the shipped configs with real-size shapes. The tiny models prove that a single file and the
diffusers folder holding the same weights load into models that compute the same thing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.models import pipeline_to_ldm, save_ldm_checkpoint
from engine.models.configs import family_components, shipped_configs
from engine.models.configs.inference import infer_configs
from engine.models.ldm_checkpoint import EMBEDDED_CONFIGS_KEY
from engine.models.ldm_text import SD2_TEXT_PREFIX, open_clip_to_ldm
from engine.models.loading import ModelLoadError, detect_model_family, load_model
from engine.models.text_encoders import load_text_encoders
from engine.models.text_encoding import encode_captions, tokenize_chunks
from engine.models.tokenizers import cached_folder, load_tokenizer, tokenizer_folder

FAMILIES = ("sd1", "sd2", "sdxl")
CAPTIONS = ["a photo of sks dog, red square", "", "sks dog, blue circle, white background!"]
# Published parameter counts in millions (UNet, VAE, text encoders in pipeline order). SD2's OpenCLIP-H has the
# 23 layers of the diffusers repository (the 24th is unused: SD2 conditions on the penultimate layer).
PARAMETERS = {
    "sd1": {"unet": 859.52, "vae": 83.65, "text_encoder": 123.06},
    "sd2": {"unet": 865.91, "vae": 83.65, "text_encoder": 340.39},
    "sdxl": {"unet": 2567.46, "vae": 83.65, "text_encoder": 123.06, "text_encoder_2": 694.66},
}


def build_on_meta(configs: dict) -> dict[str, torch.nn.Module]:
    """The family's modules from its configs, on the meta device: shapes without memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                   "vae": AutoencoderKL.from_config(configs["vae"])}
        for name in ("text_encoder", "text_encoder_2"):
            if name in configs:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                modules[name] = cls(CLIPTextConfig(**configs[name]))
    return modules


@pytest.fixture(scope="module")
def real_size() -> dict:
    """Per family: the shipped configs and the modules built from them on the meta device (built once)."""
    return {family: (shipped_configs(family), build_on_meta(shipped_configs(family))) for family in FAMILIES}


# --- shipped configs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_configs_have_the_published_model_sizes(family, real_size):
    configs, modules = real_size[family]
    assert set(configs) == set(family_components(family))
    counts = {name: round(sum(p.numel() for p in module.parameters()) / 1e6, 2) for name, module in modules.items()}
    assert counts == PARAMETERS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_inference_reproduces_the_shipped_configs(family, real_size):
    configs, modules = real_size[family]
    shapes = {key: tuple(tensor.shape) for key, tensor in pipeline_to_ldm(modules, family).items()}
    assert infer_configs(family, shapes) == configs
    if family == "sd2":
        # Real SD2 files hold OpenCLIP-H's 24 blocks; diffusers drops block 23, and so does the inferred config.
        last = {key.replace("resblocks.22.", "resblocks.23."): shape for key, shape in shapes.items()
                if key.startswith(SD2_TEXT_PREFIX + "transformer.resblocks.22.")}
        assert infer_configs(family, {**shapes, **last})["text_encoder"]["num_hidden_layers"] == 23
    if family == "sdxl":  # a UNet-only file keeps the shipped text-encoder configs and still gets the UNet right
        unet_only = {key: shape for key, shape in shapes.items() if key.startswith("model.diffusion_model.")}
        assert infer_configs(family, unet_only) == configs


# --- tokenizers ----------------------------------------------------------------------------------------------------

# openai/clip-vit-large-patch14's ids for "a photo of a cat".
CLIP_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize(("family", "subfolder", "pad_id"),
                         [("sd1", "tokenizer", 49407), ("sd2", "tokenizer", 0), ("sdxl", "tokenizer", 49407),
                          ("sdxl", "tokenizer_2", 0)])
def test_tokenizers_have_clip_ids_and_each_encoders_padding(family, subfolder, pad_id):
    tokenizer = load_tokenizer(family, subfolder)
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == CLIP_IDS
    # CLIP-L pads with <|endoftext|>; OpenCLIP encoders (SD2, SDXL's second) with "!" (id 0).
    assert tokenizer.pad_token_id == pad_id
    assert tokenizer("a cat", padding="max_length", max_length=8).input_ids == [49406, 320, 2368, 49407] + [pad_id] * 4
    assert tokenizer_folder(family, subfolder) == tokenizer_folder(family, subfolder)  # built once, reused


def test_cached_folders_appear_whole_and_are_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path))
    calls = []

    def write(folder: Path) -> None:
        calls.append(folder)
        (folder / "a.txt").write_text("complete", encoding="utf-8")

    first = cached_folder("things", "key1", write)
    assert first == tmp_path / "things" / "key1" and (first / "a.txt").read_text(encoding="utf-8") == "complete"
    assert cached_folder("things", "key1", write) == first and len(calls) == 1
    assert calls[0] != first  # written under another name, then renamed into place

    def fail(folder: Path) -> None:
        (folder / "half.txt").write_text("", encoding="utf-8")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cached_folder("things", "key2", fail)
    assert sorted(p.name for p in (tmp_path / "things").iterdir()) == ["key1"]  # nothing half-written is left


# --- single file vs folder -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """Per family: (from the single file, from the diffusers folder)."""
    return {family: (load_model(tiny_models[f"{family}_ckpt"]), load_model(tiny_models[family])) for family in FAMILIES}


def unet_output(model, text) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(len(CAPTIONS), 4, 8, 8, generator=generator)
    extra = {}
    if model.family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": text.pooled,
                                      "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * len(CAPTIONS))}
    with torch.no_grad():
        return model.unet(sample, torch.tensor([10, 500, 999]), text.hidden_states, **extra).sample


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_and_folder_compute_the_same(family, loaded, tiny_models):
    from_file, from_folder = loaded[family]
    assert (from_file.family, from_folder.family) == (family, family)
    assert from_file.model_file == tiny_models[f"{family}_ckpt"] and from_folder.model_file is None
    assert from_file.vae.identity == from_folder.vae.identity
    assert from_file.text.identity == from_folder.text.identity
    assert from_file.scheduler_config == from_folder.scheduler_config
    assert from_file.vae.scaling_factor == from_folder.vae.scaling_factor
    with torch.no_grad():
        texts = [encode_captions(m.text, CAPTIONS, clip_skip=1, max_token_length=75) for m in (from_file, from_folder)]
        assert (texts[0].hidden_states - texts[1].hidden_states).abs().max() <= 1e-6
        outputs = [unet_output(m, texts[1]) for m in (from_file, from_folder)]
        assert (outputs[0] - outputs[1]).abs().max() <= 1e-6
        pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        latents = [m.vae.vae.encode(pixels).latent_dist.mode() for m in (from_file, from_folder)]
        assert latents[0].shape == (1, 4, 8, 8) and (latents[0] - latents[1]).abs().max() <= 1e-6
        decoded = [m.vae.vae.decode(latents[1]).sample for m in (from_file, from_folder)]
        assert (decoded[0] - decoded[1]).abs().max() <= 1e-6
    assert detect_model_family(tiny_models[f"{family}_ckpt"]) == detect_model_family(tiny_models[family]) == family


def test_sd2_scheduler_config_travels_in_the_file(loaded):
    # The tiny SD2 is v-prediction; the file states it only because our writer embedded the scheduler config.
    assert loaded["sd2"][0].scheduler_config["prediction_type"] == "v_prediction"
    assert loaded["sd1"][0].scheduler_config["prediction_type"] == "epsilon"


def strip_metadata(source: Path, target: Path) -> Path:
    """A copy of a checkpoint without the embedded configs, like a file from elsewhere."""
    with safe_open(str(source), "pt") as handle:
        assert EMBEDDED_CONFIGS_KEY in handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(target), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("family", FAMILIES)
def test_files_without_configs_load_with_shapes_read_off_the_tensors(family, loaded, tiny_models, tmp_path):
    # The tiny models' sizes are nothing like SD's, yet every weight lands where the folder has it.
    plain = load_model(strip_metadata(tiny_models[f"{family}_ckpt"], tmp_path / f"{family}.safetensors"))
    reference = loaded[family][1]
    for name, got, expected in [("unet", plain.unet, reference.unet), ("vae", plain.vae.vae, reference.vae.vae),
                                *zip(("te1", "te2"), plain.text.encoders, reference.text.encoders, strict=False)]:
        got_state, expected_state = got.state_dict(), expected.state_dict()
        assert got_state.keys() == expected_state.keys(), name
        assert all(torch.equal(got_state[key], expected_state[key]) for key in got_state), name
    assert plain.vae.identity == reference.vae.identity
    # Heads and the scheduler follow the family's convention rather than the tiny model's.
    assert plain.scheduler_config["prediction_type"] == "epsilon"


def test_ckpt_files_and_a_separate_vae(tiny_models, loaded, tmp_path):
    with safe_open(str(tiny_models["sd1_ckpt"]), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 10}, checkpoint)
    model = load_model(checkpoint, vae_path=tiny_models["sdxl_ckpt"], family="sd1")
    reference = loaded["sd1"][1]
    assert model.family == "sd1" and model.model_file == checkpoint
    assert model.text.identity == reference.text.identity
    assert all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), reference.unet.state_dict().values(),
                                                 strict=True))
    assert model.vae.identity == loaded["sdxl"][1].vae.identity != reference.vae.identity
    assert model.vae.scaling_factor == 0.18215  # the family's scale, whatever VAE is used


def test_dtype_and_frozen_parts(tiny_models):
    model = load_model(tiny_models["sd1_ckpt"], dtype=torch.float16)
    assert model.unet.dtype == torch.float16 and model.vae.vae.dtype == torch.float16
    assert model.text.encoders[0].dtype == torch.float16
    assert not any(p.requires_grad for p in model.text.encoders[0].parameters())
    assert model.text.identity == load_model(tiny_models["sd1"]).text.identity  # taken before the cast


# --- SD2's penultimate layer ---------------------------------------------------------------------------------------


def test_sd2_files_with_all_24_openclip_blocks_encode_with_the_penultimate_one(tiny_models, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    # A 24-block OpenCLIP-style encoder, as in real SD2 files; the loaded model keeps 23 blocks.
    config = CLIPTextConfig(hidden_size=64, intermediate_size=133, num_hidden_layers=24, num_attention_heads=1,
                            vocab_size=49408, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=0)
    torch.manual_seed(7)
    full = CLIPTextModel(config).eval()
    with safe_open(str(tiny_models["sd2_ckpt"]), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()  # noqa: SIM118
                   if not key.startswith(SD2_TEXT_PREFIX)}
    tensors.update(open_clip_to_ldm(full.state_dict(), SD2_TEXT_PREFIX))
    path = save_ldm_checkpoint(tensors, tmp_path / "sd2-24.safetensors")
    loaded = load_text_encoders(path)
    assert loaded.encoders[0].config.num_hidden_layers == 23
    with torch.no_grad():
        ours = encode_captions(loaded, CAPTIONS, clip_skip=1, max_token_length=75).hidden_states
        ids = tokenize_chunks(loaded.tokenizers[0], CAPTIONS, 75)[:, 0]
        states = full(ids, output_hidden_states=True).hidden_states
        expected = full.final_layer_norm(states[-2])  # OpenCLIP's penultimate block, then the final norm
    assert (ours - expected).abs().max() <= 1e-6
    assert (ours - full.final_layer_norm(states[-1])).abs().max() > 1e-3


# --- errors --------------------------------------------------------------------------------------------------------


def test_family_mismatch_names_both(tiny_models):
    with pytest.raises(ModelLoadError, match=r"sdxl\.safetensors: this checkpoint is SDXL but model\.model_family "
                                             r"is sd1; set model\.model_family to sdxl or auto"):
        load_model(tiny_models["sdxl_ckpt"], family="sd1")
    with pytest.raises(ModelLoadError, match=r"this checkpoint is SD2\.x but model\.model_family is sd1"):
        load_model(tiny_models["sd2_ckpt"], family="sd1")
    with pytest.raises(ModelLoadError, match=r"this model folder is SDXL but model\.model_family is sd2"):
        load_model(tiny_models["sdxl"], family="sd2")
    with pytest.raises(ModelLoadError, match=r"a StableDiffusionPipeline folder, not an SD3/SD3\.5 one"):
        load_model(tiny_models["sd1"], family="sd3")
    with pytest.raises(ModelLoadError, match="unknown model family 'sd4'"):
        load_model(tiny_models["sd1"], family="sd4")


def test_lora_and_embedding_files_are_not_base_models(tmp_path):
    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(lora))
    for call in (load_model, detect_model_family, load_text_encoders):
        with pytest.raises(ModelLoadError, match=r"my_lora\.safetensors: this is a LoRA file, not a base model: put "
                                                 r"it in network\.network_weights"):
            call(lora)
    embedding = tmp_path / "my_style.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(embedding))
    with pytest.raises(ModelLoadError, match="my_style.safetensors: this is a Textual Inversion embedding"):
        load_model(embedding)


def test_missing_unknown_and_hub_locations(tmp_path, tiny_models):
    with pytest.raises(ModelLoadError, match=r"model not found: .*nope\.safetensors"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError, match="no model given"):
        load_model("")
    other = tmp_path / "classifier.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ModelLoadError, match=r"classifier\.safetensors: detect_family: not an SD1/SD2/SDXL checkpoint"):
        load_model(other)
    folder = Path(shutil.copytree(tiny_models["sd1"] / "vae", tmp_path / "just-a-vae"))
    with pytest.raises(ModelLoadError, match="just-a-vae: a folder but not a diffusers pipeline"):
        load_model(folder)
    for call in (load_model, detect_model_family):
        with pytest.raises(ModelLoadError, match=r"'some-org/some-model' is not a local file or folder; .* offline "
                                                 r".* not in the local Hugging Face cache.*`hf download "
                                                 r"some-org/some-model"):
            call("some-org/some-model")


def test_saved_files_are_byte_identical_for_the_same_content(tmp_path):
    # safetensors orders metadata by a per-map random hash; save_ldm_checkpoint sorts it, so files are reproducible.
    tensors = {"b": torch.arange(4.0), "a": torch.ones(2, 2)}
    metadata = {f"key{index}": str(index) for index in range(8)}
    paths = [save_ldm_checkpoint(tensors, tmp_path / f"{n}.safetensors", metadata, configs={"unet": {"x": n % 1}})
             for n in range(3)]
    assert len({path.read_bytes() for path in paths}) == 1
    raw = paths[0].read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) and len(header["__metadata__"]) == 10
    with safe_open(str(paths[0]), "pt") as handle:  # still a valid file
        assert torch.equal(handle.get_tensor("b"), tensors["b"]) and handle.metadata()["key7"] == "7"
