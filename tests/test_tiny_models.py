"""The tiny test models (tools/make_tiny_model.py) and the diffusers → LDM converter (engine.models).

The converter is proven the strict way: diffusers' own single-file loader must read our checkpoints back
bit-identically, with a config folder that holds no weights, so nothing can silently come from the folder.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from engine.models import detect_family, pipeline_to_ldm, unet_to_ldm, vae_to_ldm
from engine.models.ldm_checkpoint import EMBEDDED_CONFIGS_KEY
from engine.models.tokenizers import load_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
TEXT_ENCODERS = {"sd1": ("text_encoder",), "sd2": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _config_only_copy(folder: Path, destination: Path) -> Path:
    """The diffusers folder without weight files: configs, tokenizer and scheduler only."""
    if not destination.exists():
        shutil.copytree(folder, destination, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return destination


def _assert_same_tensors(loaded: torch.nn.Module, reference: torch.nn.Module, name: str) -> None:
    got, expected = loaded.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys(), f"{name}: key sets differ: {sorted(set(got) ^ set(expected))[:5]}"
    for key, tensor in expected.items():
        assert got[key].device.type != "meta", f"{name}.{key} was never loaded"
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{name}.{key} differs"


def _checkpoint_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _load_builder():
    script = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("atelier_make_tiny_model_tests", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- single-file round trips ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_single_file_round_trip_is_bit_identical(family, tiny_models, tmp_path_factory):
    cls = _pipeline_class(family)
    config = _config_only_copy(tiny_models[family], tmp_path_factory.getbasetemp() / f"{family}-config-only")
    loaded = cls.from_single_file(
        str(tiny_models[f"{family}_ckpt"]), config=str(config), local_files_only=True, dtype=torch.float32
    )
    reference = cls.from_pretrained(str(tiny_models[family]), local_files_only=True, dtype=torch.float32)
    for name in ("unet", "vae", *TEXT_ENCODERS[family]):
        _assert_same_tensors(getattr(loaded, name), getattr(reference, name), f"{family}.{name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_model_level_single_file_loading(family, tiny_models):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder, checkpoint = tiny_models[family], str(tiny_models[f"{family}_ckpt"])
    for cls, subfolder in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        loaded = cls.from_single_file(checkpoint, config=str(folder), subfolder=subfolder, local_files_only=True)
        reference = cls.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
        _assert_same_tensors(loaded, reference, f"{family}.{subfolder}")


def test_checkpoint_layout_and_metadata(tiny_models):
    from diffusers import UNet2DConditionModel

    with safe_open(str(tiny_models["sd1_ckpt"]), framework="pt") as handle:
        metadata = handle.metadata()
    assert set(metadata) == {"format", EMBEDDED_CONFIGS_KEY} and metadata["format"] == "pt"
    # The embedded configs are the folder's: loading the file needs no guess about the tiny sizes.
    embedded = json.loads(metadata[EMBEDDED_CONFIGS_KEY])
    assert set(embedded) == {"unet", "vae", "text_encoder", "scheduler"}
    folder_unet = UNet2DConditionModel.load_config(str(tiny_models["sd1"]), subfolder="unet")
    assert UNet2DConditionModel.from_config(embedded["unet"]).config == UNet2DConditionModel.from_config(
        folder_unet).config
    sd1, sd2, sdxl = (set(_checkpoint_keys(tiny_models[f"{f}_ckpt"])) for f in FAMILIES)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1
    # Index rules: downsampler at input_blocks.(i+1)(L+1); upsampler in slot 1 after a resnet-only up block,
    # slot 2 when the up block has attention.
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in sd1
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd1
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd1
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in sd2
    assert "cond_stage_model.model.ln_final.weight" in sd2 and "cond_stage_model.model.positional_embedding" in sd2
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sdxl
    assert "conditioner.embedders.1.model.text_projection" in sdxl
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in sdxl
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in sdxl
    with safe_open(str(tiny_models["sdxl_ckpt"]), framework="pt") as handle:
        assert tuple(handle.get_slice("conditioner.embedders.1.model.text_projection").get_shape()) == (64, 48)
        assert tuple(handle.get_slice("first_stage_model.decoder.mid.attn_1.proj_out.weight").get_shape()) == (
            64,
            64,
            1,
            1,
        )
    with safe_open(str(tiny_models["sd2_ckpt"]), framework="pt") as handle:
        fused = handle.get_tensor("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
        assert tuple(fused.shape) == (3 * 64, 64)


# --- the converter on layouts the tiny models do not cover ---------------------------------------------------
def _unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = {
        "sample_size": 8,
        "block_out_channels": (32, 32, 64, 64),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    }
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**config, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # SD1's real block structure: 4 blocks × 2 layers
        {  # SDXL-like: 3 blocks, deeper transformers, text_time embedding
            "block_out_channels": (32, 32, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 3),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 16,
        },
    ],
    ids=["sd1-4x2", "sdxl-3x2"],
)
def test_unet_to_ldm_inverts_diffusers_conversion(overrides):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _unet(**overrides)
    state = unet.state_dict()
    back = convert_ldm_unet_checkpoint(unet_to_ldm(state, unet.config), dict(unet.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_vae_to_ldm_inverts_diffusers_conversion():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,
    )
    state = vae.state_dict()
    back = convert_ldm_vae_checkpoint(vae_to_ldm(state), dict(vae.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_converter_rejects_what_it_cannot_place():
    unet = _unet()
    state = {**unet.state_dict(), "mystery_block.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="mystery_block"):
        unet_to_ldm(state, unet.config)
    with pytest.raises(ValueError, match="unknown family"):
        pipeline_to_ldm({"unet": unet}, "sd3")
    with pytest.raises(ValueError, match="vae"):
        pipeline_to_ldm({"unet": unet}, "sd1")


# --- family detection -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_detect_family(family, tiny_models):
    assert detect_family(_checkpoint_keys(tiny_models[f"{family}_ckpt"])) == family


def test_detect_family_rejects_unrelated_state_dict():
    with pytest.raises(ValueError, match=r"not an SD1/SD2/SDXL checkpoint.*'encoder.layer'"):
        detect_family(["encoder.layer.0.weight", "classifier.bias"])


# --- family-specific configuration ------------------------------------------------------------------------------
def test_sd2_is_v_prediction_with_linear_projection(tiny_models):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    scheduler = DDIMScheduler.from_pretrained(str(tiny_models["sd2"]), subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    unet = UNet2DConditionModel.load_config(str(tiny_models["sd2"]), subfolder="unet")
    text = CLIPTextConfig.from_pretrained(str(tiny_models["sd2"]), subfolder="text_encoder")
    assert unet["use_linear_projection"] and unet["upcast_attention"]
    assert list(unet["attention_head_dim"]) == [2, 4]
    assert unet["cross_attention_dim"] == text.hidden_size == 64
    assert text.hidden_act == "gelu"
    sd1_unet = UNet2DConditionModel.load_config(str(tiny_models["sd1"]), subfolder="unet")
    assert sd1_unet["cross_attention_dim"] == 32 and not sd1_unet["use_linear_projection"]


def test_sdxl_pipeline_generates_an_image(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models["sdxl"]), local_files_only=True)
    assert pipe.config.force_zeros_for_empty_prompt is True
    unet = pipe.unet.config
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    result = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, generator=generator)
    image = result.images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)


# --- tokenizers -------------------------------------------------------------------------------------------------
def test_clip_tokenizers_are_the_shipped_real_ones(tiny_models, tmp_path):
    from transformers import CLIPTokenizer

    folder = tiny_models["sd1"] / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    ids = tokenizer("a photo of sks dog")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>", "<|endoftext|>"]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert ids == load_tokenizer("sd1")("a photo of sks dog")["input_ids"]
    # The vocab.json/merges.txt kept for transformers 4.x must describe the same tokenizer on their own.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(folder / name, tmp_path / name)
    from_bpe_files = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert from_bpe_files("a photo of sks dog")["input_ids"] == ids
    for family, subfolder, pad in (("sd2", "tokenizer", "!"), ("sdxl", "tokenizer", "<|endoftext|>"),
                                   ("sdxl", "tokenizer_2", "!")):
        assert CLIPTokenizer.from_pretrained(str(tiny_models[family] / subfolder)).pad_token == pad


# --- captioners -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["blip", "git"])
def test_captioner_generates_text(name, tiny_models):
    from transformers import AutoModelForCausalLM, AutoProcessor, BlipForConditionalGeneration

    model_class = BlipForConditionalGeneration if name == "blip" else AutoModelForCausalLM
    model = model_class.from_pretrained(str(tiny_models[name]), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(tiny_models[name]))
    assert type(processor.image_processor).__name__.endswith("Pil")  # no torchvision here
    inputs = processor(images=Image.new("RGB", (80, 60), (200, 30, 30)), return_tensors="pt")
    output = model.generate(pixel_values=inputs.pixel_values, max_new_tokens=6, do_sample=False)
    text = processor.batch_decode(output, skip_special_tokens=True)
    assert output.shape[-1] > 1 and isinstance(text[0], str)


# --- WD14 -------------------------------------------------------------------------------------------------------
def _read_tags(folder: Path) -> list[dict[str, str]]:
    with (folder / "selected_tags.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_wd14_tag_list(tiny_models):
    rows = _read_tags(tiny_models["wd14"])
    assert list(rows[0]) == ["tag_id", "name", "category", "count"]
    by_category = {category: [r["name"] for r in rows if r["category"] == category] for category in "094"}
    assert by_category["9"] == ["general", "sensitive", "questionable", "explicit"]
    assert [r["category"] for r in rows[:4]] == ["9"] * 4  # ratings first, as taggers index them
    assert {"long_hair", "looking_at_viewer", "^_^", ">_<"} <= set(by_category["0"])
    assert "hatsune_miku" in by_category["4"]


def _run_tagger(folder: Path, size: int, colours: list[tuple[int, int, int]]) -> tuple[object, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([np.full((size, size, 3), colour[::-1], dtype=np.float32) for colour in colours])  # BGR
    return session, session.run(None, {session.get_inputs()[0].name: batch})[0]


def test_wd14_runs_in_onnxruntime(tiny_models):
    session, scores = _run_tagger(tiny_models["wd14"], 448, [(220, 40, 40), (40, 70, 220)])
    (model_input,) = session.get_inputs()
    assert model_input.name == "input_1:0" and model_input.shape[1:] == [448, 448, 3]
    assert model_input.type == "tensor(float)"
    assert scores.shape == (2, len(_read_tags(tiny_models["wd14"])))
    assert ((scores > 0) & (scores < 1)).all()
    assert (scores[0] >= 0.35).tolist() != (scores[1] >= 0.35).tolist()  # different images, different tags


def test_wd14_small_variant_and_missing_onnx(tmp_path, monkeypatch):
    builder = _load_builder()
    folder = builder.build_wd14(tmp_path, input_size=64)
    assert folder.name == "wd14_64"
    session, scores = _run_tagger(folder, 64, [(0, 0, 0)])
    assert session.get_inputs()[0].shape[1:] == [64, 64, 3] and scores.shape == (1, len(_read_tags(folder)))
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail as if it were not installed
    with pytest.raises(ModuleNotFoundError, match="pip install onnx"):
        builder.build_wd14(tmp_path / "other")


# --- dataset and build caching ---------------------------------------------------------------------------------
def test_dataset_layout(tiny_models):
    instance = tiny_models["dataset_img"] / "10_sks dog"
    images = sorted(p for p in instance.iterdir() if p.suffix in {".png", ".jpg"})
    assert len(images) == 6 and {p.suffix for p in images} == {".png", ".jpg"}
    sizes = []
    for image in images:
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption.startswith("sks dog, ")
        with Image.open(image) as opened:
            sizes.append(opened.size)
    assert all(min(size) >= 64 and max(size) <= 96 for size in sizes)
    assert any(width != height for width, height in sizes)  # something for aspect-ratio bucketing to do
    regularisation = list((tiny_models["dataset_reg"] / "1_dog").iterdir())
    assert len(regularisation) == 8 and not any(p.suffix == ".txt" for p in regularisation)


def test_build_is_skipped_when_stamped_and_redone_when_stale(tmp_path):
    builder = _load_builder()
    folder = builder.build_dataset(tmp_path)
    stamp = folder / builder.STAMP_NAME
    marker = folder / "left-by-previous-build"
    marker.touch()
    assert builder.build_all(tmp_path, only=["dataset"])["dataset"] == folder
    assert marker.exists()  # current stamp: nothing rebuilt
    stamp.write_text("atelier-tiny-dataset-v0\n", encoding="utf-8")
    builder.build_dataset(tmp_path)
    assert not marker.exists() and stamp.read_text(encoding="utf-8").strip().endswith(builder.DATASET_VERSION)
    with pytest.raises(ValueError, match="unknown artefacts"):
        builder.build_all(tmp_path, only=["sd4"])
