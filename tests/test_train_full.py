"""DreamBooth and fine-tuning end to end on tiny models: they learn, their checkpoints load in diffusers and in
load_model with exactly the trained weights, the text encoders stop when asked, and every save format works."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import REPO, engine_env, events_of, load_pipeline, train_here, validation_loss, write_config

from engine.models.ldm_checkpoint import EMBEDDED_CONFIGS_KEY
from engine.models.single_file import config_folder, file_configs, read_header
from engine.train.method_full import text_encoder_stop_step

SD1_TEXT = "cond_stage_model.transformer."
UNET = "model.diffusion_model."
# What the pipelines built from our files leave out (the tiny models have no safety checker or watermarker).
SD_OPTIONS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
PIPELINE_OPTIONS = {"sd1": SD_OPTIONS, "sd2": SD_OPTIONS, "sdxl": {"add_watermarker": False}}


def dreambooth_config(folder: Path, tiny_models: dict[str, Path], family: str, **sections) -> Path:
    """Kohya folders with class tokens for captions ("sks dog", and "dog" for the regularization images)."""
    base = {
        "method": "dreambooth",
        "dataset": {"reg_data_dir": str(tiny_models["dataset_reg"]), "general": {"caption_extension": ".tags"}},
        "optimizer": {"learning_rate": 1e-3, "lr_scheduler": "constant"},
        "training": {"prior_loss_weight": 0.5},
        "saving": {"output_name": "model"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return write_config(folder / "config.toml", tiny_models, family, **base)


def single_file_pipeline(path: Path, family: str):
    """The checkpoint loaded by diffusers itself, with a config folder made from the configs embedded in it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    folder = config_folder(family, file_configs(read_header(path), family))
    return pipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                     **PIPELINE_OPTIONS[family])


def tensors_with_prefix(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in load_file(str(path)).items() if key.startswith(prefix)}


def same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    assert first.keys() == second.keys() and first
    return all(torch.equal(first[key], second[key]) for key in first)


def unet_outputs(unet, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    latents = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def sd1_run(tiny_models, tmp_path_factory):
    """30 steps of SD1 DreamBooth with regularization images; the text encoder stops after step 10.

    Saves every 5 steps (with states), in float32, so saved weights can be compared exactly.
    """
    folder = tmp_path_factory.mktemp("dreambooth_sd1")
    config = dreambooth_config(folder, tiny_models, "sd1",
                               training={"max_train_steps": 30, "stop_text_encoder_training": 10},
                               saving={"save_every_n_steps": 5, "save_state": True})
    train_here(config)
    return folder


def test_text_encoder_stop_step_is_a_step_count_or_a_rounded_up_fraction():
    assert text_encoder_stop_step(0, 100) is None
    assert text_encoder_stop_step(10, 100) == 10
    assert text_encoder_stop_step(0.25, 30) == 8  # 7.5 steps: the encoders take part in the 8th update too
    assert text_encoder_stop_step(0.5, 6) == 3


@pytest.mark.slow
def test_sd1_dreambooth_learns_and_loads_in_diffusers_and_load_model(sd1_run, tiny_models):
    from engine.models.loading import load_model

    checkpoint = sd1_run / "out" / "model.safetensors"
    before = validation_loss(load_pipeline(tiny_models["sd1"]), "sd1", tiny_models["dataset_img"])
    pipe = single_file_pipeline(checkpoint, "sd1")
    after = validation_loss(pipe, "sd1", tiny_models["dataset_img"])
    assert after < before * 0.97, (before, after)
    ours = load_model(checkpoint)
    assert ours.family == "sd1"
    for name, module in (("unet", ours.unet), ("text_encoder", ours.text.encoders[0]), ("vae", ours.vae.vae)):
        assert same_tensors(module.state_dict(), getattr(pipe, name).state_dict()), name


@pytest.mark.slow
def test_checkpoint_unet_and_text_encoder_are_exactly_the_trained_ones(sd1_run, tiny_models):
    from diffusers import UNet2DConditionModel

    trained = load_file(str(sd1_run / "out" / "model-state" / "trained.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd1"], subfolder="unet")
    base_output = unet_outputs(unet)
    unet.load_state_dict({key.removeprefix("unet."): value for key, value in trained.items()
                          if key.startswith("unet.")})
    pipe = single_file_pipeline(sd1_run / "out" / "model.safetensors", "sd1")
    saved_output = unet_outputs(pipe.unet)
    assert torch.equal(saved_output, unet_outputs(unet))
    assert not torch.allclose(saved_output, base_output)  # the UNet did train
    text = {key.removeprefix("text_encoder."): value for key, value in trained.items()
            if key.startswith("text_encoder.")}
    assert same_tensors(text, pipe.text_encoder.state_dict())


@pytest.mark.slow
def test_text_encoder_stops_after_the_given_step_while_the_unet_goes_on(sd1_run, tiny_models):
    out = sd1_run / "out"
    files = {step: out / f"model-step{step:08d}.safetensors" for step in (5, 10, 15, 20, 25)}
    files[30] = out / "model.safetensors"
    text = {step: tensors_with_prefix(path, SD1_TEXT) for step, path in files.items()}
    base = tensors_with_prefix(Path(tiny_models["sd1_ckpt"]), SD1_TEXT)
    assert not same_tensors(text[5], {key: base[key] for key in text[5]})  # it trained from the start...
    assert not same_tensors(text[5], text[10])  # ...through step 10...
    for step in (15, 20, 25, 30):
        assert same_tensors(text[step], text[10]), step  # ...and not after it
    assert not same_tensors(tensors_with_prefix(files[10], UNET), tensors_with_prefix(files[30], UNET))


@pytest.mark.slow
def test_checkpoint_metadata_describes_a_full_dreambooth_model(sd1_run):
    with safe_open(str(sd1_run / "out" / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["ss_steps"] == "30" and metadata["ss_prior_loss_weight"] == "0.5"
    assert not [key for key in metadata if key.startswith("ss_network")]
    assert set(json.loads(metadata[EMBEDDED_CONFIGS_KEY])) >= {"unet", "vae", "text_encoder", "scheduler"}
    assert "F32" in dtypes and "F16" not in dtypes  # save_precision = float
    start = next(event for event in events_of(sd1_run / "out") if event["type"] == "start")
    assert start["method"] == "dreambooth" and start["num_reg_images"] > 0


@pytest.mark.slow
def test_resume_after_the_text_encoder_stop_keeps_it_stopped(sd1_run, tiny_models, tmp_path):
    """Resumed from step 15 (five steps past the stop), the run ends with the uninterrupted run's weights."""
    config = dreambooth_config(tmp_path, tiny_models, "sd1",
                               training={"max_train_steps": 30, "stop_text_encoder_training": 10},
                               saving={"resume": str(sd1_run / "out" / "model-step00000015-state")})
    train_here(config)
    steps = [event["step"] for event in events_of(tmp_path / "out") if event["type"] == "progress"]
    assert steps == list(range(16, 31))
    expected = load_file(str(sd1_run / "out" / "model.safetensors"))
    actual = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert same_tensors({k: v for k, v in actual.items() if k.startswith(SD1_TEXT)},
                        tensors_with_prefix(sd1_run / "out" / "model-step00000010.safetensors", SD1_TEXT))


@pytest.mark.slow
def test_sdxl_dreambooth_learns_and_saves_in_half_precision(tiny_models, tmp_path):
    from engine.models.loading import load_model

    config = dreambooth_config(tmp_path, tiny_models, "sdxl", training={"max_train_steps": 12},
                               saving={"save_precision": "fp16"})
    train_here(config)
    checkpoint = tmp_path / "out" / "model.safetensors"
    with safe_open(str(checkpoint), "pt") as handle:
        metadata = handle.metadata()
        float_dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()} - {"I64"}  # noqa: SIM118
    assert float_dtypes == {"F16"}
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    before = validation_loss(load_pipeline(tiny_models["sdxl"]), "sdxl", tiny_models["dataset_img"])
    pipe = single_file_pipeline(checkpoint, "sdxl").to(torch.float32)
    after = validation_loss(pipe, "sdxl", tiny_models["dataset_img"])
    assert after < before * 0.97, (before, after)
    ours = load_model(checkpoint)
    assert ours.family == "sdxl"
    assert same_tensors(ours.text.encoders[1].state_dict(), pipe.text_encoder_2.state_dict())
    assert same_tensors(ours.unet.state_dict(), pipe.unet.state_dict())


@pytest.mark.slow
def test_stopped_text_encoder_stays_as_it_is_under_data_parallelism(tiny_models, tmp_path):
    """With two processes the stopped text encoder gets no gradient at all: an averaged zero one would still move it
    through the optimizer's momentum."""
    from engine.config.io import load_config
    from engine.rundir.launch import launch_command

    config = dreambooth_config(tmp_path, tiny_models, "sd1", launch={"num_processes": 2, "multi_gpu": True,
                                                                     "main_process_port": 29531},
                               dataset={"reg_data_dir": "", "general": {"caption_extension": ".tags"}},
                               training={"max_train_steps": 4, "stop_text_encoder_training": 2},
                               optimizer={"optimizer_type": "SGDNesterov", "learning_rate": 0.05},
                               saving={"save_every_n_steps": 2})
    result = subprocess.run(launch_command(load_config(config), config), cwd=REPO, env=engine_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    start = next(event for event in events_of(tmp_path / "out") if event["type"] == "start")
    assert start["config"]["processes"] == 2
    halfway, last = tmp_path / "out" / "model-step00000002.safetensors", tmp_path / "out" / "model.safetensors"
    assert same_tensors(tensors_with_prefix(halfway, SD1_TEXT), tensors_with_prefix(last, SD1_TEXT))
    assert not same_tensors(tensors_with_prefix(halfway, UNET), tensors_with_prefix(last, UNET))


def write_finetune_metadata(image_dir: Path, target: Path) -> None:
    """sd-scripts' fine-tuning metadata: image stem -> caption and tags."""
    metadata = {path.stem: {"caption": path.with_suffix(".txt").read_text(encoding="utf-8").strip(),
                            "tags": "shape, flat colour"}
                for path in sorted(image_dir.iterdir()) if path.suffix in (".png", ".jpg")}
    target.write_text(json.dumps(metadata, indent=2), encoding="utf-8")


@pytest.mark.slow
def test_finetune_from_metadata_saves_a_diffusers_folder(tiny_models, tmp_path):
    """A fraction of the run as the text-encoder stop, and a diffusers_safetensors folder as the output."""
    from diffusers import DiffusionPipeline

    image_dir = next(path for path in Path(tiny_models["dataset_img"]).iterdir() if path.is_dir())
    write_finetune_metadata(image_dir, tmp_path / "meta.json")
    subset = {"image_dir": str(image_dir), "metadata_file": str(tmp_path / "meta.json"), "num_repeats": 2}
    config = write_config(tmp_path / "config.toml", tiny_models, "sd1", method="finetune",
                          dataset={"train_data_dir": "", "datasets": [{"subsets": [subset]}]},
                          training={"max_train_steps": 6, "stop_text_encoder_training": 0.5},
                          optimizer={"learning_rate": 1e-3, "lr_scheduler": "constant"},
                          saving={"output_name": "tuned", "save_model_as": "diffusers_safetensors",
                                  "save_every_n_steps": 3, "save_state_on_train_end": True},
                          sampling={"sample_every_n_steps": 6, "sample_prompts": ["sks dog --w 64 --h 64 --s 2"]})
    train_here(config)
    out = tmp_path / "out"
    assert [event["step"] for event in events_of(out) if event["type"] == "sample"] == [6]
    assert (out / "tuned" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [path for path in out.iterdir() if path.name.startswith(".")]  # no temporary folder left behind
    pipe = DiffusionPipeline.from_pretrained(str(out / "tuned"), local_files_only=True)
    halfway = DiffusionPipeline.from_pretrained(str(out / "tuned-step00000003"), local_files_only=True)
    base = load_pipeline(tiny_models["sd1"])
    trained = load_file(str(out / "tuned-state" / "trained.safetensors"))
    assert same_tensors({key.removeprefix("unet."): value for key, value in trained.items()
                         if key.startswith("unet.")}, pipe.unet.state_dict())
    # 0.5 of 6 steps: the text encoder learns in steps 1-3 and is the same at step 3 and at the end.
    assert same_tensors(pipe.text_encoder.state_dict(), halfway.text_encoder.state_dict())
    assert not same_tensors(pipe.text_encoder.state_dict(), base.text_encoder.state_dict())
    assert not same_tensors(pipe.unet.state_dict(), halfway.unet.state_dict())


def full_model_method(loaded, tmp_path: Path, **sections):
    """The method as the trainer creates it, on an already loaded model (no training)."""
    from engine.config.io import deep_merge, default_config_dict
    from engine.config.schema import RunConfig
    from engine.train.methods import create_method

    data = deep_merge(default_config_dict(), {"method": "dreambooth", **sections})
    return create_method(RunConfig.model_validate(data, context={"check_packages": False}), loaded, tmp_path)


def test_ckpt_and_diffusers_formats_write_copies_in_save_precision(tiny_models, tmp_path):
    """Saving casts copies: the training weights stay float32 and unchanged; both files load back."""
    from diffusers import DiffusionPipeline

    from engine.models.loading import load_model

    model = load_model(tiny_models["sd1"])
    original = {key: value.clone() for key, value in model.unet.state_dict().items()}
    paths = {}
    for save_as in ("ckpt", "diffusers"):
        method = full_model_method(model, tmp_path, saving={"save_model_as": save_as, "save_precision": "bf16"})
        paths[save_as] = method.save(tmp_path / f"model_{save_as}", {"ss_steps": "7", "ss_epoch": "1"})
    assert same_tensors(model.unet.state_dict(), original)
    assert paths["ckpt"].name == "model_ckpt.ckpt"
    stored = torch.load(paths["ckpt"], map_location="cpu", weights_only=True)
    assert stored["global_step"] == 7 and stored["epoch"] == 1
    assert {value.dtype for value in stored["state_dict"].values() if value.is_floating_point()} == {torch.bfloat16}
    rounded = {key: value.to(torch.bfloat16).float() for key, value in original.items()}
    assert same_tensors(load_model(paths["ckpt"]).unet.state_dict(), rounded)
    unet_file = torch.load(paths["diffusers"] / "unet" / "diffusion_pytorch_model.bin", map_location="cpu",
                           weights_only=True)
    assert {value.dtype for value in unet_file.values()} == {torch.bfloat16}
    pipe = DiffusionPipeline.from_pretrained(str(paths["diffusers"]), local_files_only=True)
    assert same_tensors({key: value.float() for key, value in pipe.unet.state_dict().items()}, rounded)


def test_sd2_v_prediction_checkpoint_keeps_its_prediction_type_and_open_clip_encoder(tiny_models, tmp_path):
    from engine.models.loading import load_model

    model = load_model(tiny_models["sd2"])
    method = full_model_method(model, tmp_path, model={"v_parameterization": True},
                               saving={"save_precision": "float"})
    path = method.save(tmp_path / "v_model", {})
    reloaded = load_model(path)
    assert reloaded.family == "sd2" and reloaded.scheduler_config["prediction_type"] == "v_prediction"
    assert same_tensors(reloaded.text.encoders[0].state_dict(), model.text.encoders[0].state_dict())
    pipe = single_file_pipeline(path, "sd2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert same_tensors(pipe.text_encoder.state_dict(), model.text.encoders[0].state_dict())
