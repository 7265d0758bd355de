"""engine.models.sd3.mmdit: our SD3 / SD3.5 MMDiT against diffusers' SD3Transformer2DModel, its SAI key layout,
sizes read back from shapes, and the training options (checkpointing, position-window crop, scaled tables).

The weights reach diffusers through our converter (engine.models.sd3.convert); test_sd3_convert.py checks that
converter against diffusers' own single-file converter, so the output comparison here does not rest on a mapping
only we wrote.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.models.sd3.convert import diffusers_config, sai_to_diffusers  # noqa: E402
from engine.models.sd3.mmdit import DismantledBlock, MMDiT  # noqa: E402
from engine.models.sd3.params import (  # noqa: E402
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_MEDIUM,
    VARIANTS,
    SD3Params,
    params_from_state_dict,
    sd3_variant_of,
    tiny_params,
)
from engine.models.sd3.pos_embed import ScaledPosEmbeds, crop_window, scaled_sincos_pos_embed, sincos_pos_embed  # noqa: E402

BATCH, LATENT, TEXT = 2, (8, 12), 7  # 8 x 12 latents = 4 x 6 patches: not square, so rows and columns differ


def _random_model(params: SD3Params, seed: int = 0) -> MMDiT:
    """A model with every weight random (qk-norm weights around 1), so no term of the forward pass is a no-op."""
    torch.manual_seed(seed)
    model = MMDiT(params)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if ".ln_" in name:
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.normal_(0.0, 0.05)
    return model


def _inputs(params: SD3Params, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(BATCH, params.in_channels, *LATENT, generator=generator),
        "t": torch.tensor([37.0, 871.0]),
        "y": torch.randn(BATCH, params.adm_in_channels, generator=generator),
        "context": torch.randn(BATCH, TEXT, params.context_in_dim, generator=generator),
    }


def _expected_keys(params: SD3Params) -> set[str]:
    """SAI's key set by spec §8.1's rules, written out independently of the model code."""
    keys = {"pos_embed"}
    for linear in ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
                   "context_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1"):
        keys |= {f"{linear}.weight", f"{linear}.bias"}
    for i in range(params.depth):
        for stream in ("context_block", "x_block"):
            pre_only = stream == "context_block" and i == params.depth - 1
            base = f"joint_blocks.{i}.{stream}"
            linears = ["adaLN_modulation.1", "attn.qkv"] + ([] if pre_only else ["attn.proj", "mlp.fc1", "mlp.fc2"])
            attentions = ["attn"]
            if stream == "x_block" and i in params.attn2_layers:
                linears += ["attn2.qkv", "attn2.proj"]
                attentions.append("attn2")
            keys |= {f"{base}.{linear}.{part}" for linear in linears for part in ("weight", "bias")}
            if params.qk_norm:
                keys |= {f"{base}.{attn}.{norm}.weight" for attn in attentions for norm in ("ln_q", "ln_k")}
    return keys


# ------------------------------------------------------------------------------------------------ layout and sizes


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_are_sais_and_sizes_read_back(variant):
    params = tiny_params(variant)
    state = MMDiT(params).state_dict()
    assert set(state) == _expected_keys(params)
    hidden = params.hidden_size
    last = f"joint_blocks.{params.depth - 1}"
    assert state[f"{last}.context_block.adaLN_modulation.1.weight"].shape == (2 * hidden, hidden)
    assert state["joint_blocks.0.context_block.adaLN_modulation.1.weight"].shape == (6 * hidden, hidden)
    x_mods = 9 if variant == "5-medium" else 6
    assert state["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (x_mods * hidden, hidden)
    assert state["pos_embed"].shape == (1, params.pos_embed_max_size**2, hidden)
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    assert params_from_state_dict(shapes) == params
    assert sd3_variant_of(shapes) == variant == params.variant


@pytest.mark.parametrize("params, variant, billions", [
    (SD3_MEDIUM, "medium", 2.03), (SD35_MEDIUM, "5-medium", 2.24), (SD35_LARGE, "5-large", 8.06)])
def test_real_sizes_build_on_the_meta_device(params, variant, billions):
    with torch.device("meta"):
        model = MMDiT(params)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert params_from_state_dict(shapes) == params and params.variant == variant
    assert shapes["pos_embed"] == (1, params.pos_embed_max_size**2, params.hidden_size)
    count = sum(parameter.numel() for parameter in model.parameters()) / 1e9
    assert count == pytest.approx(billions, abs=0.01)


def test_reading_sizes_names_what_is_wrong():
    shapes = {key: tuple(t.shape) for key, t in MMDiT(tiny_params("medium")).state_dict().items()}
    with pytest.raises(ValueError, match="prefix"):
        params_from_state_dict({f"model.diffusion_model.{key}": shape for key, shape in shapes.items()})
    with pytest.raises(ValueError, match="joint blocks"):
        params_from_state_dict({key: shape for key, shape in shapes.items() if not key.startswith("joint_blocks.1.")})
    with pytest.raises(ValueError, match="diffusers_to_sai"):
        params_from_state_dict({"transformer_blocks.0.attn.to_q.weight": (128, 128)})
    with pytest.raises(ValueError, match="variant"):
        tiny_params("large")


def test_lora_targets_are_the_dismantled_blocks_linears():
    """Every nn.Linear under a DismantledBlock: kohya's lora_sd3 targets (spec §8.6)."""
    model = MMDiT(tiny_params("5-medium"))
    names = {f"{block_name}.{name}" for block_name, block in model.named_modules()
             if isinstance(block, DismantledBlock)
             for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
    assert "joint_blocks.0.x_block.attn2.qkv" in names and "joint_blocks.1.context_block.attn.qkv" in names
    assert "joint_blocks.1.context_block.attn.proj" not in names
    pattern = re.compile(r"^joint_blocks\.\d\.(context|x)_block\.(attn2?\.(qkv|proj)|mlp\.fc[12]|adaLN_modulation\.1)$")
    assert all(pattern.match(name) for name in names)
    assert len(names) == 5 + 7 + 5 + 2  # block 0: context 5, x 7 (attn2); block 1: x 5, pre-only context 2


# ---------------------------------------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_equals_diffusers(variant):
    from diffusers import SD3Transformer2DModel

    params = tiny_params(variant)
    model = _random_model(params)
    reference = SD3Transformer2DModel(**diffusers_config(params))
    converted, unused = sai_to_diffusers(model.state_dict())
    assert unused == []
    reference.load_state_dict(converted, strict=True)
    inputs = _inputs(params)
    with torch.no_grad():
        ours = model(**inputs)
        theirs = reference(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"],
                           pooled_projections=inputs["y"], timestep=inputs["t"]).sample
    assert ours.shape == inputs["x"].shape
    assert ours.abs().mean() > 0.1  # a real signal, not a near-zero output that trivially matches
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_position_table_is_diffusers(variant):
    from diffusers import SD3Transformer2DModel
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    params = tiny_params(variant)
    reference = SD3Transformer2DModel(**diffusers_config(params))
    assert torch.equal(MMDiT(params).pos_embed, reference.pos_embed.pos_embed)
    table = get_2d_sincos_pos_embed(96, 10, base_size=64, output_type="pt").float()[None]
    assert torch.equal(sincos_pos_embed(96, 10), table)


# ----------------------------------------------------------------------------------------------- training options


def test_gradient_checkpointing_gives_the_same_gradients():
    params = tiny_params("5-medium")
    model = _random_model(params)
    inputs = _inputs(params)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(**inputs).square().mean().backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    plain = gradients()
    model.enable_gradient_checkpointing()
    checkpointed = gradients()
    model.enable_gradient_checkpointing(cpu_offload=True)
    offloaded = gradients()
    model.disable_gradient_checkpointing()
    assert not model.gradient_checkpointing
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(offloaded[name], grad, rtol=0, atol=1e-6)


def test_random_crop_moves_the_window_only_when_asked():
    params = tiny_params("5-medium")
    model = _random_model(params)
    inputs = _inputs(params)
    centred = model(**inputs).detach()

    state = torch.get_rng_state()
    model.pos_emb_random_crop_rate = 0.0
    assert torch.equal(model(**inputs).detach(), centred)
    assert torch.equal(torch.get_rng_state(), state)  # rate 0: no draw at all

    model.pos_emb_random_crop_rate = 1.0
    torch.manual_seed(3)
    cropped = model(**inputs).detach()
    assert not torch.allclose(cropped, centred, atol=1e-4)
    torch.manual_seed(3)
    assert torch.equal(model(**inputs).detach(), cropped)  # the window comes from torch's global RNG
    with torch.no_grad():  # sampling and validation see the centred window
        assert torch.allclose(model(**inputs), centred, atol=1e-6)

    model.pos_emb_generator = torch.Generator().manual_seed(5)  # a trainer's own generator: resumable draws
    state = torch.get_rng_state()
    first = model(**inputs).detach()
    assert torch.equal(torch.get_rng_state(), state)
    model.pos_emb_generator = torch.Generator().manual_seed(5)
    assert torch.equal(model(**inputs).detach(), first)


def test_scaled_pos_embed_is_used_in_training_passes():
    params = tiny_params("5-medium")
    model = _random_model(params)
    inputs = _inputs(params)
    normal = model(**inputs).detach()
    model.enable_scaled_pos_embed([8, 12, 16])  # latent sizes: 4, 6 and 8 patches a side
    scaled = model(**inputs).detach()
    assert not torch.allclose(scaled, normal, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(model(**inputs), normal, atol=1e-6)
    model.disable_scaled_pos_embed()
    assert torch.allclose(model(**inputs).detach(), normal, atol=1e-6)


def test_scaled_tables_are_chosen_by_area_and_centre_on_the_base_range():
    tables = ScaledPosEmbeds(hidden=64, patch_size=2, latent_sizes=[16, 8, 12, 12])
    assert tables.area_bounds == [((16 + 36) // 2, 4), ((36 + 64) // 2, 6), (144, 8)]
    assert tables.patched_size_for(4, 6) == 4 and tables.patched_size_for(5, 6) == 6
    with pytest.raises(ValueError, match="enable_scaled_pos_embed"):
        tables.patched_size_for(13, 12)
    table, grid = tables.table(4, 4, torch.device("cpu"), torch.float32)
    assert grid == 6 and table.shape == (1, 36, 64)
    wide, grid = tables.table(2, 12, torch.device("cpu"), torch.float32)  # wider than the 1.5x table
    assert grid == 12 and wide.shape == (1, 144, 64)
    # The centred window of a table built for s patches has coordinates 0 .. 16 (s - 1) / s, whatever s is.
    for size, grid in ((4, 6), (8, 12)):
        centre = crop_window(scaled_sincos_pos_embed(64, grid, size), grid, ((grid - size) // 2,) * 2, size, size)
        torch.testing.assert_close(centre, sincos_pos_embed(64, size, base_size=16), rtol=0, atol=1e-5)


def test_bad_inputs_are_named():
    model = MMDiT(tiny_params("medium"))
    inputs = _inputs(model.params)
    with pytest.raises(ValueError, match="multiple of 2"):
        model(**{**inputs, "x": inputs["x"][:, :, :7]})
    with pytest.raises(ValueError, match="position table"):
        model(**{**inputs, "x": torch.zeros(1, 16, 34, 8)})


def test_runs_in_bfloat16():
    params = tiny_params("5-large")
    model = _random_model(params).to(torch.bfloat16)
    inputs = {key: value.to(torch.bfloat16) if key != "t" else value for key, value in _inputs(params).items()}
    with torch.no_grad():
        out = model(**inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
