"""DyLoRA (engine.networks.dylora) as sd-scripts' networks/dylora.py trains it, and the plain LoRA file it saves.

The file is checked by diffusers itself (``load_lora_weights`` must give the outputs our network gives in eval mode)
and by a tiny SD1 run through ``python -m engine train``, which also checks that ``ss_mixed_precision`` records the
precision that ran (issue 14).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from train_helpers import events_of, load_models, load_pipeline, train_here, validation_loss, write_config

from engine.networks.dylora import DyLoRAModule, DyLoRANetwork, create_dylora_network


def make_network(tiny_models, family: str, **options) -> tuple[DyLoRANetwork, nn.Module, list[nn.Module]]:
    unet, encoders = load_models(tiny_models, family)
    options = {"dim": 4, "alpha": 2.0, **options}
    return create_dylora_network(unet, encoders, family, **options), unet, encoders


def randomize_up(network: DyLoRANetwork, seed: int = 1, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            for column in lora.lora_up:
                column.copy_(torch.randn(column.shape, generator=generator) * std)


def unet_inputs(unet: nn.Module, batch: int = 2) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    args = (torch.randn(batch, 4, 8, 8, generator=generator), torch.tensor([10, 500][:batch]),
            torch.randn(batch, 5, config.cross_attention_dim, generator=generator))
    kwargs = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}
    return args, kwargs


@torch.no_grad()
def unet_output(unet: nn.Module, inputs: tuple[tuple, dict]) -> torch.Tensor:
    return unet(*inputs[0], **inputs[1]).sample


# --- the maths ---------------------------------------------------------------------------------------------------

def test_training_forward_is_sd_scripts_and_trains_one_unit_of_ranks():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    module = DyLoRAModule("lora_test", layer, lora_dim=8, alpha=4.0, unit=2)
    with torch.no_grad():
        for column in module.lora_up:
            column.normal_()
    down = torch.cat(tuple(module.lora_down)).detach().clone()
    up = torch.cat(tuple(module.lora_up), dim=1).detach().clone()
    x = torch.randn(3, 6)
    plain = layer(x).detach()
    module.apply_to()
    module.train()
    starts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        drawn = int(torch.randint(0, 8, ()).item())
        start = drawn - drawn % 2
        starts.add(start)
        torch.manual_seed(seed)
        module.zero_grad(set_to_none=True)
        out = layer(x)
        # sd-scripts: every rank, scaled by alpha/rank * sqrt(rank / (start + unit))
        expected = plain + (x @ down.T @ up.T) * (4.0 / 8) * math.sqrt(8 / (start + 2))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        out.sum().backward()
        with_grad = [index for index, row in enumerate(module.lora_down) if row.grad is not None]
        assert with_grad == [start, start + 1]
        assert [index for index, column in enumerate(module.lora_up) if column.grad is not None] == with_grad
    assert starts == {0, 2, 4, 6}  # every block gets its turn
    module.eval()  # sampling uses what the saved file holds: every rank at alpha/rank
    torch.testing.assert_close(layer(x), plain + (x @ down.T @ up.T) * 0.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unit", [1, 2])
def test_gradient_checkpointing_recomputes_with_the_same_ranks(tiny_models, unit):
    network, unet, _ = make_network(tiny_models, "sd1", conv_dim=4, conv_alpha=2.0, network_args={"unit": unit})
    unet.requires_grad_(False).train()
    randomize_up(network)
    network.apply_to()
    network.train()
    inputs = unet_inputs(unet)

    def gradients() -> dict[str, torch.Tensor | None]:
        network.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        unet(*inputs[0], **inputs[1]).sample.square().mean().backward()
        return {f"{lora.lora_name}.{name}": param.grad for lora in network.unet_loras
                for name, param in lora.named_parameters()}

    plain = gradients()
    unet.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert sum(grad is not None for grad in plain.values()) == unit * 2 * len(network.unet_loras)
    for name, grad in plain.items():
        assert (grad is None) == (checkpointed[name] is None), name
        if grad is not None:
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


# --- files -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("conv_dim", [0, 4], ids=["linear", "conv"])
def test_diffusers_load_lora_weights_gives_the_sampled_outputs(tiny_models, tmp_path, family, conv_dim):
    network, unet, encoders = make_network(tiny_models, family, conv_dim=conv_dim, conv_alpha=2.0)
    randomize_up(network)
    inputs, ids = unet_inputs(unet), torch.arange(1, 13).repeat(2, 1)
    base = unet_output(unet, inputs)
    network.apply_to()
    network.eval()
    ours = unet_output(unet, inputs)
    with torch.no_grad():
        text_ours = [encoder(ids).last_hidden_state for encoder in encoders]
    path = tmp_path / "dylora.safetensors"
    save_file(network.kohya_state_dict(), str(path))

    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    pipe.load_lora_weights(str(path))
    pipe_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    theirs = unet_output(pipe.unet, inputs)
    with torch.no_grad():
        text_theirs = [encoder(ids).last_hidden_state for encoder in pipe_encoders]
    assert (ours - base).abs().max() > 0.05
    assert (ours - theirs).abs().max() <= 1e-5
    for mine, reference in zip(text_ours, text_theirs, strict=True):
        assert (mine - reference).abs().max() <= 1e-5
    wrapped = [sum(hasattr(module, "lora_A") for module in model.modules()) for model in [pipe.unet, *pipe_encoders]]
    assert wrapped == list(network.module_count().values())


def test_files_load_back_and_a_file_of_another_rank_is_refused_by_name(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1")
    randomize_up(network)
    saved = network.kohya_state_dict()
    again, _, _ = make_network(tiny_models, "sd1")
    again.load_kohya_state_dict(saved)
    for key, value in again.kohya_state_dict().items():
        assert torch.equal(value, saved[key]), key
    other, _, _ = make_network(tiny_models, "sd1", dim=8, alpha=2.0)
    with pytest.raises(ValueError, match=r"lora_down\.weight has shape \(4, .*set network_dim"):
        other.load_kohya_state_dict(saved)


def test_loraplus_puts_the_up_ranks_in_their_own_group(tiny_models):
    network, _, _ = make_network(tiny_models, "sd1", network_args={"loraplus_lr_ratio": 8})
    groups = {group["name"]: group for group in network.prepare_optimizer_params(1e-4, [5e-5])}
    ups = {id(column) for lora in network.unet_loras for column in lora.lora_up}
    assert {id(param) for param in groups["unet_loraplus"]["params"]} == ups
    assert groups["unet_loraplus"]["lr"] == pytest.approx(8e-4) and groups["unet"]["lr"] == 1e-4


@pytest.mark.parametrize(("options", "message"), [
    ({"network_args": {"unit": 3}}, r"unit = 3 does not divide network\.network_dim = 4"),
    ({"dropout": 0.1}, r"network\.network_dropout has no effect with network_type = 'dylora'"),
    ({"conv_dim": 2}, r"network\.conv_dim = 2 must be 0 or network_dim \(4\)"),
    ({"network_args": {"rank_dropout": 0.1}}, r"network_args\.rank_dropout: sd-scripts' DyLoRA has no dropouts"),
])
def test_settings_sd_scripts_dylora_lacks_are_errors_naming_them(tiny_models, options, message):
    with pytest.raises(ValueError, match=message):
        make_network(tiny_models, "sd1", **options)


# --- a run ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dylora_run(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dylora_run")
    config = write_config(
        folder / "config.toml", tiny_models, "sd1",
        network={"network_type": "dylora", "network_dim": 4, "network_alpha": 4.0, "network_args": {"unit": 2}},
        training={"max_train_steps": 24, "mixed_precision": "fp16"},  # fp16 autocast and loss scaling, on a CPU too
        optimizer={"learning_rate": 5e-3, "lr_scheduler": "constant"},
    )
    train_here(config)
    return folder


@pytest.mark.slow
def test_a_dylora_run_learns_and_its_file_loads_in_diffusers(dylora_run, tiny_models):
    path = dylora_run / "out" / "lora.safetensors"
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    assert metadata["ss_network_module"] == "networks.dylora"
    assert json.loads(metadata["ss_network_args"])["unit"] == "2"
    before = validation_loss(load_pipeline(tiny_models["sd1"]), "sd1", tiny_models["dataset_img"])
    pipe = load_pipeline(tiny_models["sd1"])
    pipe.load_lora_weights(str(path))
    after = validation_loss(pipe, "sd1", tiny_models["dataset_img"])
    assert after < before, (before, after)


@pytest.mark.slow
def test_ss_mixed_precision_records_the_precision_that_ran(dylora_run):
    start = next(event for event in events_of(dylora_run / "out") if event["type"] == "start")
    ran = start["config"]["mixed_precision"]
    with safe_open(str(dylora_run / "out" / "lora.safetensors"), "pt") as handle:
        recorded = handle.metadata()["ss_mixed_precision"]
    assert recorded == ran == "fp16"  # the CPU trains fp16 too (engine.train.precision)
