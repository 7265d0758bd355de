"""FLUX.1 / Chroma full fine-tuning (engine.train.method_full_flux) and the fused Adafactor pass (fused_backward).

The saved files are read back by other code than ours where it exists: the BFL single file by safetensors and our
loader, the diffusers folder by diffusers' own FluxPipeline / ChromaPipeline.from_pretrained (offline), whose
transformer must compute what our Flux computes. The fused Adafactor step is compared with transformers' unfused
Adafactor on the same gradients.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import copy  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from flux_tiny import tiny_flux_files  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from safetensors import safe_open  # noqa: E402

from engine.config.schema import RunConfig  # noqa: E402
from engine.models.families import FAMILY_INFO  # noqa: E402
from engine.train.fused_backward import FusedBackward, copy_stochastic_  # noqa: E402
from engine.train.method_full import FULL_MODEL_METHODS, FullModelMethod, full_model_method  # noqa: E402
from engine.train.method_full_flux import FluxFullModelMethod  # noqa: E402
from engine.train.setup import RunInputError  # noqa: E402

FAMILIES = {"dev": "flux1", "schnell": "flux1", "chroma": "chroma"}
ARCHITECTURES = {"dev": "flux-1-dev", "schnell": "flux-1-schnell", "chroma": "chroma"}
IMPLEMENTATIONS = {"dev": "https://github.com/black-forest-labs/flux",
                   "schnell": "https://github.com/black-forest-labs/flux",
                   "chroma": "https://huggingface.co/lodestones/Chroma"}
# What the trainer hands save(): a LoRA key (must go), the architecture sd-scripts would write (must be replaced).
RUN_METADATA = {"ss_network_dim": "4", "ss_steps": "7", "modelspec.architecture": "flux-1-dev",
                "modelspec.title": "tiny"}


def _config_dict(variant: str, **sections: dict[str, Any]) -> dict[str, Any]:
    files = tiny_flux_files(variant)
    family = FAMILIES[variant]
    config: dict[str, Any] = {
        "method": "dreambooth",
        "model": {"model_family": family, "pretrained_model_name_or_path": str(files["model"]),
                  "clip_l": str(files["clip_l"]) if family == "flux1" else "", "t5xxl": str(files["t5xxl"]),
                  "ae": str(files["ae"]), "tokenizer_cache_dir": str(files["t5_tokenizer"]),
                  "apply_t5_attn_mask": family == "chroma"},
        "dataset": {"train_data_dir": str(files["model"].parent)},
        "optimizer": {"learning_rate": 1e-5, "unet_lr": 2e-5},
        "training": {"mixed_precision": "bf16"},
        "flow": {"guidance_scale": 0.0 if family == "chroma" else 3.5},
    }
    for key, values in sections.items():
        config[key] = {**config.get(key, {}), **values}
    return config


def _config(variant: str, **sections: dict[str, Any]) -> RunConfig:
    return RunConfig.model_validate(_config_dict(variant, **sections))


def _load(location: Path, variant: str) -> Any:
    from engine.models.flux.loading import load_flux_model

    files = tiny_flux_files(variant)
    return load_flux_model(location, family=FAMILIES[variant],
                           clip_l=files["clip_l"] if variant != "chroma" else None, t5xxl=files["t5xxl"],
                           ae=files["ae"], tokenizer_cache_dir=files["t5_tokenizer"])


@pytest.fixture(scope="module", params=["dev", "schnell", "chroma"])
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def trained(variant):
    """The tiny model with every transformer weight moved, as after training (the files must hold these)."""
    model = _load(tiny_flux_files(variant)["model"], variant)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return model


def _save(model: Any, variant: str, folder: Path, save_model_as: str, precision: str) -> Path:
    config = _config(variant, saving={"save_model_as": save_model_as, "save_precision": precision})
    method = full_model_method(config, model, folder)
    assert isinstance(method, FluxFullModelMethod)
    return method.save(folder / "model", dict(RUN_METADATA))


# --- the BFL single file -------------------------------------------------------------------------------------


def test_single_file_holds_the_bare_transformer_in_save_precision(variant, trained, tmp_path) -> None:
    path = _save(trained, variant, tmp_path, "safetensors", "bf16")
    assert path == tmp_path / "model.safetensors"
    ours = trained.unet.state_dict()
    with safe_open(str(path), "pt") as saved:
        assert set(saved.keys()) == set(ours)  # BFL keys, no model.diffusion_model. prefix
        for key in ours:
            tensor = saved.get_tensor(key)
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, ours[key].to(torch.bfloat16)), key
        metadata = saved.metadata()
    assert metadata["modelspec.architecture"] == ARCHITECTURES[variant]
    assert metadata["modelspec.implementation"] == IMPLEMENTATIONS[variant]
    assert metadata["modelspec.title"] == "tiny" and metadata["ss_steps"] == "7"
    assert not any(key.startswith("ss_network_") for key in metadata)
    assert [entry.name for entry in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left


@pytest.mark.parametrize("save_model_as", ["safetensors", "diffusers"])
def test_the_free_space_check_sizes_what_the_save_writes(trained, variant, save_model_as, tmp_path) -> None:
    from engine.train.save_checks import save_bytes

    config = _config(variant, saving={"save_model_as": save_model_as, "save_precision": "bf16"})
    method = full_model_method(config, trained, tmp_path)
    expected = save_bytes(method, method.trained_state(), None, "bf16")
    written = method.save(tmp_path / "model", dict(RUN_METADATA))
    files = [written] if written.is_file() else [path for path in written.rglob("*.safetensors")]
    weights = sum(path.stat().st_size for path in files)
    assert expected <= weights < expected * 1.1  # the files add their headers


def test_single_file_loads_back_with_the_saved_weights(variant, trained, tmp_path) -> None:
    from engine.models.flux.loading import detect_flux_file

    path = _save(trained, variant, tmp_path, "safetensors", "bf16")
    assert detect_flux_file(path) == FAMILIES[variant]
    loaded = _load(path, variant)
    assert loaded.scheduler_config["variant"] == variant
    assert loaded.unet.params == trained.unet.params
    reloaded = loaded.unet.state_dict()
    for key, tensor in trained.unet.state_dict().items():
        assert torch.equal(reloaded[key], tensor.to(torch.bfloat16).float()), key


# --- the diffusers folder ------------------------------------------------------------------------------------


def _inputs(params: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    rows, cols, text, batch = 3, 4, 7, 2
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return dict(img=torch.randn(batch, rows * cols, params.in_channels, generator=generator),
                img_ids=img_ids.reshape(1, rows * cols, 3).repeat(batch, 1, 1),
                txt=torch.randn(batch, text, params.context_in_dim, generator=generator),
                txt_ids=torch.zeros(batch, text, 3), timesteps=torch.tensor([0.3, 0.85]),
                y=torch.randn(batch, params.vec_in_dim, generator=generator), guidance=torch.tensor([3.5, 1.0]))


def _diffusers_output(transformer: Any, params: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    extra: dict[str, Any] = {}
    if not params.chroma:
        extra = {"pooled_projections": inputs["y"], "guidance": inputs["guidance"] if params.guidance_embed else None}
    return transformer(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                       timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0],
                       return_dict=False, **extra)[0]


def test_diffusers_folder_loads_in_diffusers_and_computes_the_same(variant, trained, tmp_path) -> None:
    import diffusers

    folder = _save(trained, variant, tmp_path, "diffusers_safetensors", "float")
    assert folder == tmp_path / "model" and folder.is_dir()
    assert [entry.name for entry in tmp_path.iterdir()] == ["model"]
    pipeline_class = diffusers.ChromaPipeline if variant == "chroma" else diffusers.FluxPipeline
    pipeline = pipeline_class.from_pretrained(str(folder), local_files_only=True)
    assert list((folder / "transformer").glob("*.safetensors"))
    params = trained.unet.params
    inputs = _inputs(params)
    with torch.no_grad():
        ours = trained.unet(**{**inputs, "y": None if params.chroma else inputs["y"],
                               "guidance": inputs["guidance"] if params.guidance_embed else None})
        theirs = _diffusers_output(pipeline.transformer.eval(), params, inputs)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5
    # The frozen parts are the run's own.
    assert pipeline.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipeline.vae.config.scaling_factor == pytest.approx(0.3611)
    assert pipeline.vae.config.latent_channels == 16
    _assert_same_weights(pipeline.vae, trained.vae.vae)
    encoder_names = ["text_encoder"] if variant == "chroma" else ["text_encoder", "text_encoder_2"]
    for name, encoder in zip(encoder_names, trained.text.encoders, strict=True):
        _assert_same_weights(getattr(pipeline, name), encoder)
    assert type(pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipeline.scheduler.config.use_dynamic_shifting == (variant != "schnell")
    prompt_ids = pipeline.tokenizer("a photo of sks").input_ids
    assert prompt_ids == trained.text.tokenizers[0]("a photo of sks").input_ids


def _assert_same_weights(theirs: torch.nn.Module, ours: torch.nn.Module) -> None:
    mine = ours.state_dict()
    for key, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, mine[key].float()), key


def test_diffusers_folder_loads_back_in_our_loader(trained, variant, tmp_path) -> None:
    folder = _save(trained, variant, tmp_path, "diffusers", "float")
    # "diffusers" writes safetensors too: FLUX loaders read no .bin shards.
    assert list((folder / "transformer").glob("*.safetensors")) and not list(folder.rglob("*.bin"))
    from engine.models.flux.loading import load_flux_model

    loaded = load_flux_model(folder, family=FAMILIES[variant])
    assert loaded.scheduler_config["variant"] == variant
    reloaded = loaded.unet.state_dict()
    for key, tensor in trained.unet.state_dict().items():
        assert torch.equal(reloaded[key], tensor), key


def test_a_later_save_replaces_the_folder(tmp_path) -> None:
    model = _load(tiny_flux_files("schnell")["model"], "schnell")
    _save(model, "schnell", tmp_path, "diffusers_safetensors", "bf16")
    with torch.no_grad():
        model.unet.img_in.bias.add_(1.0)
    folder = _save(model, "schnell", tmp_path, "diffusers_safetensors", "bf16")
    from diffusers import FluxTransformer2DModel

    saved = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), local_files_only=True,
                                                   torch_dtype=torch.bfloat16)
    for shard in (folder / "transformer").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as stored:
            names = stored.keys()
            assert {stored.get_slice(name).get_dtype() for name in names} == {"BF16"}
    assert torch.equal(saved.x_embedder.bias, model.unet.img_in.bias.to(torch.bfloat16))
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["model"]


# --- what trains, what is refused ----------------------------------------------------------------------------


def test_only_the_transformer_trains_at_unet_lr(variant, trained) -> None:
    method = full_model_method(_config(variant), trained, Path("."))
    groups = method.param_groups()
    assert [(group["name"], group["lr"]) for group in groups] == [("transformer", 2e-5)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in trained.unet.parameters()}
    assert method.trains_unet and method.trains_text_encoders == [False] * len(trained.text.encoders)
    assert method.trainable_modules() == [trained.unet]
    state = method.trained_state()
    assert state and all(key.startswith("transformer.") for key in state)
    method.load_trained_state(state)


def test_learning_rate_is_used_when_unet_lr_is_empty(trained) -> None:
    method = full_model_method(_config("dev", optimizer={"unet_lr": None}), trained, Path("."))
    assert [group["lr"] for group in method.param_groups()] == [1e-5]


@pytest.mark.parametrize(("section", "values", "field"), [
    ("optimizer", {"text_encoder_lr": 1e-6}, "optimizer.text_encoder_lr"),
    ("training", {"stop_text_encoder_training": 5}, "training.stop_text_encoder_training"),
    ("saving", {"save_model_as": "ckpt"}, "saving.save_model_as"),
])
def test_text_encoder_training_and_ckpt_are_refused(trained, section, values, field) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        _config("dev", **{section: values})
    # A config that skipped validation meets the same refusal when the run starts, not after the training.
    config = _config("dev")
    unchecked = config.model_copy(update={section: getattr(config, section).model_copy(update=values)})
    with pytest.raises(RunInputError) as refused:
        full_model_method(unchecked, trained, Path("."))
    assert refused.value.where == field


def test_a_frozen_transformer_is_refused(trained) -> None:
    with pytest.raises(RunInputError) as refused:
        full_model_method(_config("dev", optimizer={"unet_lr": 0.0}), trained, Path("."))
    assert refused.value.where == "optimizer.unet_lr"


def test_every_loader_has_a_full_model_method() -> None:
    import importlib

    for info in FAMILY_INFO.values():
        module, name = FULL_MODEL_METHODS[info.loader]
        method_class = getattr(importlib.import_module(module), name)
        assert issubclass(method_class, FullModelMethod)
    assert FULL_MODEL_METHODS["ldm"] == ("engine.train.method_full", "FullModelMethod")


# --- fused Adafactor -----------------------------------------------------------------------------------------

ADAFACTOR_MANUAL = {"relative_step": False, "scale_parameter": False, "warmup_init": False}


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4),
                               torch.nn.LayerNorm(4)).to(dtype)


def _adafactor(net: torch.nn.Module, **options: Any) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    groups = [{"params": list(net[0].parameters()), "lr": 1e-2},
              {"params": [*net[2].parameters(), *net[3].parameters()], "lr": 3e-3}]
    if options.get("relative_step", True):
        groups = [{"params": group["params"]} for group in groups]
    return Adafactor(groups, lr=None if options.get("relative_step", True) else 1e-2, **options)


def _loss(net: torch.nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(5, 8, generator=generator).to(next(net.parameters()).dtype)
    return (net(inputs).float() - 0.5).square().mean()


def _clip_each(net: torch.nn.Module, max_norm: float) -> None:
    for parameter in net.parameters():
        torch.nn.utils.clip_grad_norm_([parameter], max_norm)


@pytest.mark.parametrize("options", [ADAFACTOR_MANUAL, {}, {"relative_step": False, "beta1": 0.9,
                                                             "weight_decay": 0.01}],
                         ids=["manual_lr", "relative_step", "first_moment"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_fused_adafactor_equals_the_unfused_step(options, max_grad_norm) -> None:
    unfused_net, fused_net = _net(), _net()
    unfused, fused = _adafactor(unfused_net, **options), _adafactor(fused_net, **options)
    hooks = FusedBackward(fused, max_grad_norm=max_grad_norm)
    for step in range(4):
        _loss(unfused_net, step).backward()
        if max_grad_norm:
            _clip_each(unfused_net, max_grad_norm)  # the fused pass clips per tensor (spec §6.2)
        unfused.step()
        unfused.zero_grad(set_to_none=True)
        _loss(fused_net, step).backward()  # the hooks step and free every gradient
        assert all(parameter.grad is None for parameter in fused_net.parameters())
        for ours, reference in zip(fused_net.parameters(), unfused_net.parameters(), strict=True):
            assert torch.equal(ours, reference)
    assert fused.state_dict()["state"].keys() == unfused.state_dict()["state"].keys()
    hooks.remove()


def test_fused_pass_follows_the_groups_after_a_resume() -> None:
    """load_state_dict replaces the group dicts; a changed learning rate must still reach the fused steps."""
    unfused_net, fused_net = _net(), _net()
    unfused, fused = _adafactor(unfused_net, **ADAFACTOR_MANUAL), _adafactor(fused_net, **ADAFACTOR_MANUAL)
    FusedBackward(fused, max_grad_norm=0.0)
    _loss(unfused_net, 0).backward()
    unfused.step()
    unfused.zero_grad(set_to_none=True)
    _loss(fused_net, 0).backward()
    fused.load_state_dict(copy.deepcopy(fused.state_dict()))
    for optimizer in (unfused, fused):
        optimizer.param_groups[1]["lr"] = 5e-2  # what the schedule does between steps
    _loss(unfused_net, 1).backward()
    unfused.step()
    _loss(fused_net, 1).backward()
    for ours, reference in zip(fused_net.parameters(), unfused_net.parameters(), strict=True):
        assert torch.equal(ours, reference)


def test_fused_bf16_weights_round_stochastically_from_the_float32_update() -> None:
    """bf16 weights get the float32 Adafactor update rounded down or up: at most one bf16 step from it."""
    fused_net = _net(dtype=torch.bfloat16)
    twin = copy.deepcopy(fused_net)  # gives the gradients the float32 reference steps on
    reference_net = copy.deepcopy(fused_net).float()
    reference_opt, fused_opt = _adafactor(reference_net, **ADAFACTOR_MANUAL), _adafactor(fused_net, **ADAFACTOR_MANUAL)
    FusedBackward(fused_opt, max_grad_norm=0.0)
    _loss(twin, 0).backward()
    for reference, source in zip(reference_net.parameters(), twin.parameters(), strict=True):
        reference.grad = source.grad.float()
    reference_opt.step()
    torch.manual_seed(7)
    _loss(fused_net, 0).backward()
    nearest_differs = 0
    for ours, reference in zip(fused_net.parameters(), reference_net.parameters(), strict=True):
        assert ours.dtype == torch.bfloat16 and ours.grad is None
        assert ((ours.float() - reference).abs() <= _bf16_spacing(reference.detach())).all()
        nearest_differs += int((ours != reference.detach().to(torch.bfloat16)).sum())
    assert nearest_differs > 0  # some weights rounded the other way than round-to-nearest would


def _bf16_spacing(values: torch.Tensor) -> torch.Tensor:
    """The gap between consecutive bf16 numbers around each value."""
    exponent = torch.frexp(values.float()).exponent
    return torch.ldexp(torch.ones_like(values), exponent - 8)


def test_stochastic_rounding_is_unbiased() -> None:
    torch.manual_seed(3)
    value = torch.tensor(1.0 + 0.3 * 2 ** -7)  # 30% of the way from 1.0 to the next bf16 number, 1 + 2^-7
    low, high = torch.tensor(1.0), torch.tensor(1.0 + 2 ** -7)
    source = value.repeat(20000)
    target = torch.empty(20000, dtype=torch.bfloat16)
    copy_stochastic_(target, source)
    values = set(target.float().tolist())
    assert values <= {low.item(), high.item()}
    assert abs(target.float().mean().item() - value.item()) < 2e-5
    negative = torch.empty(20000, dtype=torch.bfloat16)
    copy_stochastic_(negative, -source)
    assert abs(negative.float().mean().item() + value.item()) < 2e-5


def test_fused_pass_refuses_other_optimizers() -> None:
    net = _net()
    with pytest.raises(ValueError, match="optimizer.fused_backward_pass"):
        FusedBackward(torch.optim.AdamW(net.parameters()), max_grad_norm=0.0)


@pytest.mark.parametrize(("sections", "field"), [
    ({"optimizer": {"fused_backward_pass": True}}, "optimizer.fused_backward_pass"),
    ({"optimizer": {"fused_backward_pass": True, "optimizer_type": "Adafactor"},
      "training": {"gradient_accumulation_steps": 2}}, "training.gradient_accumulation_steps"),
    ({"optimizer": {"fused_backward_pass": True, "optimizer_type": "Adafactor"},
      "training": {"mixed_precision": "fp16"}}, "training.mixed_precision"),
])
def test_config_rules_for_the_fused_pass(sections, field) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        _config("schnell", **sections)
    config = _config("schnell", optimizer={"fused_backward_pass": True, "optimizer_type": "Adafactor"})
    assert config.optimizer.fused_backward_pass


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dreambooth_trains_the_transformer_through_the_cli(tiny_models, tmp_path) -> None:
    """A short FLUX.1 dev DreamBooth run: the saved BFL file differs from the base only by training, names dev."""
    from safetensors.torch import load_file
    from train_helpers import train_here, write_config

    files = tiny_flux_files("dev")
    config = write_config(
        tmp_path / "config.toml", {"flux1": files["model"], "dataset_img": tiny_models["dataset_img"]}, "flux1",
        method="dreambooth",
        model={"v_parameterization": False, "clip_l": str(files["clip_l"]), "t5xxl": str(files["t5xxl"]),
               "ae": str(files["ae"]), "tokenizer_cache_dir": str(files["t5_tokenizer"])},
        flow={"guidance_scale": 1.0}, dataset={"general": {"bucket_reso_steps": 16}},
        optimizer={"learning_rate": 1e-3}, training={"max_train_steps": 4, "cache_latents": True},
        saving={"output_name": "model", "save_model_as": "safetensors"})
    train_here(config)
    saved_path = tmp_path / "out" / "model.safetensors"
    saved, base = load_file(str(saved_path)), load_file(str(files["model"]))
    assert saved.keys() == base.keys()
    assert any(not torch.equal(saved[key], base[key]) for key in base)
    with safe_open(str(saved_path), "pt") as stored:
        metadata = stored.metadata()
    assert metadata["modelspec.architecture"] == "flux-1-dev"
    assert metadata["ss_steps"] == "4" and not any(key.startswith("ss_network_") for key in metadata)
