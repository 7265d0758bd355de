"""SD3 / SD3.5 full fine-tuning (engine.train.method_full_sd3): what trains, and the files a save writes.

The saved files are read back by other code than ours where it exists: the SAI single file by diffusers' own
single-file loader (StableDiffusion3Pipeline.from_single_file, offline, with a local config folder) and by our
loader; the text-encoder siblings by transformers and our loader; the diffusers folder by
StableDiffusion3Pipeline.from_pretrained (offline). Their transformers must compute what our MMDiT computes.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from sd3_tiny import tiny_sd3_files, write_tiny_sd3_diffusers  # noqa: E402

from engine.config.schema import RunConfig  # noqa: E402
from engine.train.method_full_sd3 import SD3FullModelMethod  # noqa: E402
from engine.train.setup import RunInputError  # noqa: E402

ARCHITECTURES = {"medium": "stable-diffusion-3-medium", "5-medium": "stable-diffusion-3-5-medium",
                 "5-large": "stable-diffusion-3-5-large"}
# What the trainer hands save(): a LoRA key (must go), SD keys that mean nothing for SD3 (must go), the title (stays).
RUN_METADATA = {"ss_network_dim": "4", "ss_steps": "7", "modelspec.architecture": "stable-diffusion-3-medium",
                "modelspec.prediction_type": "epsilon", "modelspec.encoder_layer": "1", "modelspec.title": "tiny"}
TEXT_SIBLINGS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}


def _config(variant: str, **sections: dict[str, Any]) -> RunConfig:
    files = tiny_sd3_files(variant)
    config: dict[str, Any] = {
        "method": "dreambooth",
        "model": {"model_family": "sd3", "pretrained_model_name_or_path": str(files["model"]),
                  "clip_l": str(files["clip_l"]), "clip_g": str(files["clip_g"]), "t5xxl": str(files["t5xxl"]),
                  "tokenizer_cache_dir": str(files["t5_tokenizer"])},
        "dataset": {"train_data_dir": str(files["model"].parent)},
        "optimizer": {"learning_rate": 1e-5, "unet_lr": 2e-5, "text_encoder_lr": 0.0},
        "training": {"mixed_precision": "bf16"},
    }
    for key, values in sections.items():
        config[key] = {**config.get(key, {}), **values}
    return RunConfig.model_validate(config)


def _unchecked(config: RunConfig, section: str, values: dict[str, Any]) -> RunConfig:
    """A config that skipped validation: the method must refuse it when the run starts."""
    return config.model_copy(update={section: getattr(config, section).model_copy(update=values)})


def _load(location: Path, variant: str, **components: Path) -> Any:
    from engine.models.sd3.loading import load_sd3_model

    files = tiny_sd3_files(variant)
    parts = {"clip_l": files["clip_l"], "clip_g": files["clip_g"], "t5xxl": files["t5xxl"], **components}
    return load_sd3_model(location, tokenizer_cache_dir=files["t5_tokenizer"], **parts)


@pytest.fixture(scope="module", params=["medium", "5-medium", "5-large"])
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def trained(variant):
    """The tiny model with every MMDiT and CLIP weight moved, as after training (the files must hold these)."""
    model = _load(tiny_sd3_files(variant)["model"], variant)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (model.unet, model.text.encoders[0], model.text.encoders[1]):
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return model


@pytest.fixture(scope="module")
def config_folder(variant, tmp_path_factory) -> Path:
    """The tiny model as a diffusers folder: the configs diffusers' single-file loader needs offline."""
    return write_tiny_sd3_diffusers(tiny_sd3_files(variant), tmp_path_factory.mktemp("config") / "pipeline")


def _save(model: Any, variant: str, folder: Path, save_model_as: str, precision: str, **sections: Any) -> Path:
    config = _config(variant, saving={"save_model_as": save_model_as, "save_precision": precision}, **sections)
    method = SD3FullModelMethod(config, model, folder)
    return method.save(folder / "model", dict(RUN_METADATA))


def _inputs(params: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"x": torch.randn(2, params.in_channels, 8, 12, generator=generator),
            "t": torch.tensor([250.0, 900.0]),
            "y": torch.randn(2, params.adm_in_channels, generator=generator),
            "context": torch.randn(2, 9, params.context_in_dim, generator=generator)}


def _assert_same_output(mmdit: torch.nn.Module, transformer: torch.nn.Module) -> None:
    inputs = _inputs(mmdit.params)
    with torch.no_grad():
        ours = mmdit(**inputs)
        theirs = transformer.eval()(hidden_states=inputs["x"], timestep=inputs["t"],
                                    encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"]).sample
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def _assert_same_weights(theirs: torch.nn.Module, ours: torch.nn.Module) -> None:
    mine = ours.state_dict()
    state = theirs.state_dict()
    assert state.keys() == mine.keys()
    for key, tensor in state.items():
        assert torch.equal(tensor, mine[key].to(tensor.dtype)), key


# --- the SAI single file -------------------------------------------------------------------------------------


def test_single_file_holds_the_mmdit_and_the_vae_in_sai_layout(variant, trained, tmp_path) -> None:
    from engine.models.ldm_keys import vae_to_ldm

    path = _save(trained, variant, tmp_path, "safetensors", "bf16")
    assert path == tmp_path / "model.safetensors"
    expected = {f"model.diffusion_model.{key}": tensor for key, tensor in trained.unet.state_dict().items()}
    expected.update(vae_to_ldm(trained.vae.vae.state_dict()))
    with safe_open(str(path), "pt") as saved:
        assert set(saved.keys()) == set(expected)
        for key, tensor in expected.items():
            stored = saved.get_tensor(key)
            assert stored.dtype == torch.bfloat16
            assert torch.equal(stored, tensor.to(torch.bfloat16)), key
        metadata = saved.metadata()
    assert metadata["modelspec.architecture"] == ARCHITECTURES[variant]
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/sd3.5"
    assert "modelspec.prediction_type" not in metadata and "modelspec.encoder_layer" not in metadata
    assert metadata["modelspec.title"] == "tiny" and metadata["ss_steps"] == "7"
    assert not any(key.startswith("ss_network_") for key in metadata)
    # Frozen text encoders are not written; no temporary is left.
    assert [entry.name for entry in tmp_path.iterdir()] == ["model.safetensors"]


def test_single_file_loads_in_diffusers_and_in_our_loader(variant, trained, config_folder, tmp_path) -> None:
    from diffusers import StableDiffusion3Pipeline

    path = _save(trained, variant, tmp_path, "safetensors", "float")
    reference = StableDiffusion3Pipeline.from_pretrained(str(config_folder), local_files_only=True)
    encoders = {name: getattr(reference, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3",
                                                            "tokenizer", "tokenizer_2", "tokenizer_3")}
    pipeline = StableDiffusion3Pipeline.from_single_file(str(path), config=str(config_folder),
                                                         local_files_only=True, **encoders)
    _assert_same_output(trained.unet, pipeline.transformer)  # diffusers' own converter of SAI names
    _assert_same_weights(pipeline.vae, trained.vae.vae)

    loaded = _load(path, variant)
    assert loaded.scheduler_config["variant"] == variant
    assert loaded.unet.params == trained.unet.params
    _assert_same_weights(loaded.unet, trained.unet)
    _assert_same_weights(loaded.vae.vae, trained.vae.vae)


def test_trained_text_encoders_go_to_sibling_files(variant, trained, tmp_path) -> None:
    from transformers import CLIPTextModelWithProjection

    config = _config(variant, saving={"save_model_as": "safetensors", "save_precision": "float"},
                     optimizer={"text_encoder_lr": 1e-6})
    method = SD3FullModelMethod(config, trained, tmp_path)
    path = method.save(tmp_path / "model", dict(RUN_METADATA))
    clip_l, clip_g = tmp_path / "model_clip_l.safetensors", tmp_path / "model_clip_g.safetensors"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [
        "model.safetensors", "model_clip_g.safetensors", "model_clip_l.safetensors"]  # T5 is not trained
    assert method.companion_files(path) == [clip_l, clip_g]
    for sibling, encoder in ((clip_l, trained.text.encoders[0]), (clip_g, trained.text.encoders[1])):
        with safe_open(str(sibling), "pt") as saved:
            assert set(saved.keys()) == set(encoder.state_dict())  # bare Hugging Face keys
        rebuilt = CLIPTextModelWithProjection(encoder.config)
        from safetensors.torch import load_file

        rebuilt.load_state_dict(load_file(str(sibling)), strict=True)
        _assert_same_weights(rebuilt, encoder)
    loaded = _load(path, variant, clip_l=clip_l, clip_g=clip_g)
    _assert_same_weights(loaded.text.encoders[0], trained.text.encoders[0])
    _assert_same_weights(loaded.text.encoders[1], trained.text.encoders[1])


def test_a_t5_sibling_holds_untied_copies_and_loads_back(trained, variant, tmp_path) -> None:
    """No setting trains T5 in full fine-tuning; the writer still handles its tied embedding (sd-scripts clones it)."""
    from engine.train.method_full_sd3 import save_sai_file

    t5 = trained.text.encoders[2]
    save_sai_file(trained, tmp_path / "model", {}, None, ["text_encoder_3"])
    sibling = tmp_path / "model_t5xxl.safetensors"
    with safe_open(str(sibling), "pt") as saved:
        assert {"shared.weight", "encoder.embed_tokens.weight"} <= set(saved.keys())
        assert torch.equal(saved.get_tensor("shared.weight"), t5.shared.weight)
    loaded = _load(tmp_path / "model.safetensors", variant, t5xxl=sibling)
    _assert_same_weights(loaded.text.encoders[2], t5)


# --- the diffusers folder ----------------------------------------------------------------------------------------


def test_diffusers_folder_loads_in_diffusers_and_computes_the_same(variant, trained, tmp_path) -> None:
    from diffusers import StableDiffusion3Pipeline

    folder = _save(trained, variant, tmp_path, "diffusers", "float")
    assert folder == tmp_path / "model" and folder.is_dir()
    assert [entry.name for entry in tmp_path.iterdir()] == ["model"]
    assert list((folder / "transformer").glob("*.safetensors")) and not list(folder.rglob("*.bin"))
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True)
    _assert_same_output(trained.unet, pipeline.transformer)
    _assert_same_weights(pipeline.vae, trained.vae.vae)
    for index, name in enumerate(("text_encoder", "text_encoder_2", "text_encoder_3")):
        _assert_same_weights(getattr(pipeline, name), trained.text.encoders[index])
    assert pipeline.vae.config.latent_channels == 16
    assert pipeline.vae.config.scaling_factor == pytest.approx(1.5305)
    assert pipeline.vae.config.shift_factor == pytest.approx(0.0609)
    assert type(pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipeline.scheduler.config.shift == 3.0
    assert pipeline.tokenizer_3("a photo of sks").input_ids == trained.text.tokenizers[2]("a photo of sks").input_ids

    loaded = _load(folder, variant, clip_l=None, clip_g=None, t5xxl=None)
    assert loaded.scheduler_config["variant"] == variant
    _assert_same_weights(loaded.unet, trained.unet)


def test_a_later_save_replaces_the_folder_in_save_precision(tmp_path) -> None:
    from diffusers import SD3Transformer2DModel

    model = _load(tiny_sd3_files("medium")["model"], "medium")
    _save(model, "medium", tmp_path, "diffusers_safetensors", "bf16")
    with torch.no_grad():
        model.unet.x_embedder.proj.bias.add_(1.0)
    folder = _save(model, "medium", tmp_path, "diffusers_safetensors", "bf16")
    saved = SD3Transformer2DModel.from_pretrained(str(folder / "transformer"), local_files_only=True,
                                                  torch_dtype=torch.bfloat16)
    for shard in (folder / "transformer").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as stored:
            assert {stored.get_slice(name).get_dtype() for name in stored.keys()} == {"BF16"}  # noqa: SIM118
    assert torch.equal(saved.pos_embed.proj.bias, model.unet.x_embedder.proj.bias.to(torch.bfloat16))
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize(("save_model_as", "text_encoder_lr"), [("safetensors", 0.0), ("safetensors", 1e-6),
                                                                 ("diffusers", 0.0)])
def test_the_free_space_check_sizes_what_the_save_writes(trained, variant, save_model_as, text_encoder_lr,
                                                         tmp_path) -> None:
    from engine.train.save_checks import save_bytes

    config = _config(variant, saving={"save_model_as": save_model_as, "save_precision": "bf16"},
                     optimizer={"text_encoder_lr": text_encoder_lr})
    method = SD3FullModelMethod(config, trained, tmp_path)
    expected = save_bytes(method, method.trained_state(), None, "bf16")
    method.save(tmp_path / "model", dict(RUN_METADATA))
    weights = sum(path.stat().st_size for path in tmp_path.rglob("*.safetensors"))
    assert expected <= weights < expected * 1.1  # the files add their headers


# --- what trains, what is refused ----------------------------------------------------------------------------


def test_the_mmdit_trains_at_unet_lr_and_the_clips_at_text_encoder_lr(variant, trained) -> None:
    method = SD3FullModelMethod(_config(variant, optimizer={"text_encoder_lr": 3e-6}), trained, Path("."))
    groups = method.param_groups()
    assert [(group["name"], group["lr"]) for group in groups] == [
        ("transformer", 2e-5), ("text_encoder", 3e-6), ("text_encoder_2", 3e-6)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in trained.unet.parameters()}
    assert method.trains_unet and method.trains_text_encoders == [True, True, False]
    assert method.trainable_modules() == [trained.unet, *trained.text.encoders[:2]]
    state = method.trained_state()
    assert {key.split(".", 1)[0] for key in state} == {"transformer", "text_encoder", "text_encoder_2"}
    method.load_trained_state(state)


def test_text_encoder_lr_empty_trains_the_clips_at_learning_rate_and_0_freezes_them(trained) -> None:
    empty = SD3FullModelMethod(_config("medium", optimizer={"text_encoder_lr": None}), trained, Path("."))
    assert [(group["name"], group["lr"]) for group in empty.param_groups()] == [
        ("transformer", 2e-5), ("text_encoder", 1e-5), ("text_encoder_2", 1e-5)]
    frozen = SD3FullModelMethod(_config("medium"), trained, Path("."))
    assert [group["name"] for group in frozen.param_groups()] == ["transformer"]
    assert frozen.trains_text_encoders == [False, False, False]
    clips_only = SD3FullModelMethod(_config("medium", optimizer={"unet_lr": 0.0, "text_encoder_lr": 1e-6}), trained,
                                    Path("."))
    assert [group["name"] for group in clips_only.param_groups()] == ["text_encoder", "text_encoder_2"]
    assert not clips_only.trains_unet


@pytest.mark.parametrize(("section", "values", "field"), [
    ("optimizer", {"unet_lr": 0.0}, "optimizer.unet_lr"),
    ("training", {"cache_text_encoder_outputs": True, "text_encoder_lr": None}, "training.cache_text_encoder_outputs"),
    ("model", {"fp8_base": True}, "model.fp8_base"),
    ("model", {"fp8_base_unet": True}, "model.fp8_base_unet"),
    ("training", {"blocks_to_swap": 2}, "training.blocks_to_swap"),  # without optimizer.fused_backward_pass
    ("saving", {"save_model_as": "ckpt"}, "saving.save_model_as"),
])
def test_what_full_fine_tuning_cannot_do_is_refused_by_name(trained, section, values, field) -> None:
    config = _config("medium")
    if "text_encoder_lr" in values:  # cached outputs with the CLIPs learning at learning_rate
        values = {key: value for key, value in values.items() if key != "text_encoder_lr"}
        config = _unchecked(config, "optimizer", {"text_encoder_lr": None})
    with pytest.raises(RunInputError) as refused:
        SD3FullModelMethod(_unchecked(config, section, values), trained, Path("."))
    assert refused.value.where == field


def test_block_swap_with_the_fused_pass_is_accepted(trained) -> None:
    config = _config("medium", optimizer={"fused_backward_pass": True, "optimizer_type": "Adafactor"})
    method = SD3FullModelMethod(_unchecked(config, "training", {"blocks_to_swap": 2}), trained, Path("."))
    assert method.trains_unet


def test_the_swap_limit_of_a_loaded_model_names_the_setting(trained, variant) -> None:
    """Block swapping is for LoRA runs on the same loaded MMDiT: more than depth - 2 is refused with the limit."""
    from engine.models.flux.block_swap import swap_limits, swap_split

    params = trained.unet.params
    assert swap_limits(params) == params.depth - 2 == 0  # the tiny models have two joint blocks
    with pytest.raises(ValueError, match=r"training\.blocks_to_swap 1 .*\(2 joint blocks\).*at most 0"):
        swap_split(1, params)


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dreambooth_trains_the_mmdit_and_the_clips_through_the_cli(tiny_models, tmp_path) -> None:
    """A short SD3.5 medium DreamBooth run: the SAI file and the CLIP siblings differ from the base by training."""
    from safetensors.torch import load_file
    from train_helpers import train_here, write_config

    files = tiny_sd3_files("5-medium")
    config = write_config(
        tmp_path / "config.toml", {"sd3": files["model"], "dataset_img": tiny_models["dataset_img"]}, "sd3",
        method="dreambooth",
        model={"v_parameterization": False, "clip_l": str(files["clip_l"]), "clip_g": str(files["clip_g"]),
               "t5xxl": str(files["t5xxl"]), "tokenizer_cache_dir": str(files["t5_tokenizer"])},
        dataset={"general": {"bucket_reso_steps": 16}},
        optimizer={"learning_rate": 1e-3, "text_encoder_lr": 1e-4},
        training={"max_train_steps": 3, "cache_latents": True},
        saving={"output_name": "model", "save_model_as": "safetensors"})
    train_here(config)
    out = tmp_path / "out"
    assert sorted(path.name for path in out.glob("model*.safetensors")) == [
        "model.safetensors", "model_clip_g.safetensors", "model_clip_l.safetensors"]
    saved, base = load_file(str(out / "model.safetensors")), load_file(str(files["model"]))
    assert saved.keys() == base.keys()
    assert any(not torch.equal(saved[key], base[key]) for key in base if key.startswith("model.diffusion_model."))
    assert all(torch.equal(saved[key], base[key]) for key in base if key.startswith("first_stage_model."))
    for part in ("clip_l", "clip_g"):
        trained_clip, base_clip = load_file(str(out / f"model_{part}.safetensors")), load_file(str(files[part]))
        assert trained_clip.keys() == base_clip.keys()
        assert any(not torch.equal(trained_clip[key], base_clip[key]) for key in base_clip), part
    with safe_open(str(out / "model.safetensors"), "pt") as stored:
        metadata = stored.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium"
    assert "modelspec.prediction_type" not in metadata
    assert metadata["ss_steps"] == "3" and not any(key.startswith("ss_network_") for key in metadata)
