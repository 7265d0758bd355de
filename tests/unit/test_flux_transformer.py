"""engine.models.flux.transformer: our FLUX.1 / Chroma transformer against diffusers, its key layout and options.

diffusers' own BFL converters (``convert_flux_transformer_checkpoint_to_diffusers``, the Chroma one) map our state
dict into ``FluxTransformer2DModel`` / ``ChromaTransformer2DModel``, so the comparison rests on their reading of the
BFL layout, not on a mapping written here. Those converters hard-code FLUX's full widths (3072 hidden, 12288 MLP)
for one thing only, splitting ``single_blocks.N.linear1`` into Q, K, V and the MLP input; for that tensor the test
hands them a zero-width stand-in and splits the real one itself by the spec §1.6 rule (rows hidden, hidden, hidden,
mlp). Everything else, including the final layer's (shift, scale) -> (scale, shift) swap, is diffusers' code.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.models.flux.params import (  # noqa: E402
    CHROMA,
    FLUX_DEV,
    FLUX_SCHNELL,
    FluxParams,
    params_from_state_dict,
)
from engine.models.flux.transformer import Flux  # noqa: E402

TINY_DEV = FluxParams(
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(4, 14, 14),
)
TINY_SCHNELL = replace(TINY_DEV, guidance_embed=False)
# Chroma has no vector input, so vec_in_dim keeps its default (params_from_state_dict cannot read it back).
TINY_CHROMA = replace(TINY_SCHNELL, vec_in_dim=768, chroma=True, approximator_hidden=32, approximator_depth=2)

BATCH, GRID, TEXT = 2, (3, 4), 7


def _random_model(params: FluxParams, seed: int = 0) -> Flux:
    """A model with every weight random (norm scales around 1), so no term of the forward pass is a no-op."""
    model = Flux(params).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator) * 0.1
            tensor.copy_(1 + noise if name.endswith(".scale") else noise)
    return model


def _inputs(params: FluxParams, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows, cols = GRID
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return dict(
        img=torch.randn(BATCH, rows * cols, params.in_channels, generator=generator),
        img_ids=img_ids.reshape(1, rows * cols, 3).repeat(BATCH, 1, 1),
        txt=torch.randn(BATCH, TEXT, params.context_in_dim, generator=generator),
        txt_ids=torch.zeros(BATCH, TEXT, 3),
        timesteps=torch.tensor([0.3, 0.85]),
        y=torch.randn(BATCH, params.vec_in_dim, generator=generator),
        guidance=torch.tensor([3.5, 1.0]),
    )


def _diffusers_state_dict(model: Flux, converter: Callable[..., dict]) -> dict[str, torch.Tensor]:
    checkpoint = {key: value.clone() for key, value in model.state_dict().items()}
    params = model.params
    sizes = [params.hidden_size] * 3 + [params.mlp_hidden]
    linear1 = {}
    for index in range(params.depth_single_blocks):
        for suffix, stand_in in (("weight", (21504, 0)), ("bias", (21504,))):
            key = f"single_blocks.{index}.linear1.{suffix}"
            linear1[key] = checkpoint[key]
            checkpoint[key] = torch.zeros(stand_in)
    converted = converter(checkpoint)
    for index in range(params.depth_single_blocks):
        prefix = f"single_transformer_blocks.{index}."
        for suffix in ("weight", "bias"):
            q, k, v, mlp = linear1[f"single_blocks.{index}.linear1.{suffix}"].split(sizes)
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            for name, part in zip(names, (q, k, v, mlp), strict=True):
                converted[f"{prefix}{name}.{suffix}"] = part
    return converted


def _tiny_diffusers_config(params: FluxParams) -> dict:
    return dict(
        patch_size=1,
        in_channels=params.in_channels,
        num_layers=params.depth,
        num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim,
        axes_dims_rope=params.axes_dim,
    )


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("params", [TINY_DEV, TINY_SCHNELL], ids=["dev", "schnell"])
def test_flux_matches_diffusers(params: FluxParams) -> None:
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    model = _random_model(params)
    theirs = FluxTransformer2DModel(
        **_tiny_diffusers_config(params),
        pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed,
    ).eval()
    theirs.load_state_dict(_diffusers_state_dict(model, convert_flux_transformer_checkpoint_to_diffusers), strict=True)
    inputs = _inputs(params)
    guidance = inputs["guidance"] if params.guidance_embed else None
    with torch.no_grad():
        ours = model(**{**inputs, "guidance": guidance})
        # diffusers multiplies timestep and guidance by 1000 inside, as we do, and takes ids without a batch axis.
        reference = theirs(
            hidden_states=inputs["img"],
            encoder_hidden_states=inputs["txt"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
            img_ids=inputs["img_ids"][0],
            txt_ids=inputs["txt_ids"][0],
            guidance=guidance,
            return_dict=False,
        )[0]
    _assert_close(ours, reference)


def _chroma_reference(model: Flux):
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    params = model.params
    theirs = ChromaTransformer2DModel(
        **_tiny_diffusers_config(params),
        approximator_num_channels=params.approximator_in_dim,
        approximator_hidden_dim=params.approximator_hidden,
        approximator_layers=params.approximator_depth,
    ).eval()
    converted = _diffusers_state_dict(model, convert_chroma_transformer_checkpoint_to_diffusers)
    theirs.load_state_dict(converted, strict=True)
    return theirs


def _run_chroma_reference(theirs, inputs: dict[str, torch.Tensor], text_tokens: int) -> torch.Tensor:
    """diffusers' Chroma on the first ``text_tokens`` text tokens, unmasked (it always uses guidance 0)."""
    with torch.no_grad():
        return theirs(
            hidden_states=inputs["img"],
            encoder_hidden_states=inputs["txt"][:, :text_tokens],
            timestep=inputs["timesteps"],
            img_ids=inputs["img_ids"][0],
            txt_ids=inputs["txt_ids"][0, :text_tokens],
            return_dict=False,
        )[0]


def test_chroma_matches_diffusers() -> None:
    model = _random_model(TINY_CHROMA)
    theirs = _chroma_reference(model)
    inputs = {**_inputs(TINY_CHROMA), "y": None, "guidance": None}
    with torch.no_grad():
        ours = model(**inputs)
    _assert_close(ours, _run_chroma_reference(theirs, inputs, TEXT))


def test_chroma_text_window_matches_diffusers_on_the_truncated_text() -> None:
    """With a mask, Chroma keeps each sample's tokens plus one padding token (spec §3.4 point 4).

    Sample 0 has 3 real tokens and sample 1 has 5: each must equal diffusers run on its own first 4 and 6 tokens,
    although the batch carries 6 (the longest window) and sample 0 masks the rest.
    """
    model = _random_model(TINY_CHROMA)
    theirs = _chroma_reference(model)
    inputs = {**_inputs(TINY_CHROMA), "y": None, "guidance": None}
    mask = torch.zeros(BATCH, TEXT, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :5] = True
    with torch.no_grad():
        ours = model(**inputs, txt_mask=mask)
    for sample, window in ((0, 4), (1, 6)):
        single = {key: value[sample : sample + 1] for key, value in inputs.items() if value is not None}
        _assert_close(ours[sample : sample + 1], _run_chroma_reference(theirs, single, window))


def _shapes(params: FluxParams) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Flux(params)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    "params",
    [
        FLUX_DEV,
        FLUX_SCHNELL,
        CHROMA,
        TINY_DEV,
        TINY_SCHNELL,
        TINY_CHROMA,
        replace(FLUX_DEV, depth=8, depth_single_blocks=20),
        replace(CHROMA, depth=3, depth_single_blocks=0),
        replace(TINY_SCHNELL, depth=0, depth_single_blocks=3),
    ],
    ids=[
        "dev",
        "schnell",
        "chroma",
        "tiny-dev",
        "tiny-schnell",
        "tiny-chroma",
        "pruned",
        "chroma-no-single",
        "no-double",
    ],
)
def test_params_from_state_dict_round_trips(params: FluxParams) -> None:
    assert params_from_state_dict(_shapes(params)) == params


def test_params_from_state_dict_names_the_missing_key() -> None:
    shapes = {f"model.diffusion_model.{key}": shape for key, shape in _shapes(TINY_DEV).items()}
    with pytest.raises(ValueError, match=r"no 'img_in.weight'.*model\.diffusion_model\."):
        params_from_state_dict(shapes)


def _expected_dev_keys() -> dict[str, tuple[int, ...]]:
    """Spec §1.2's table for flux1-dev.safetensors, written out independently of the model code."""
    h, mlp = 3072, 12288
    linears = {
        "img_in": (h, 64),
        "txt_in": (h, 4096),
        "time_in.in_layer": (h, 256),
        "time_in.out_layer": (h, h),
        "vector_in.in_layer": (h, 768),
        "vector_in.out_layer": (h, h),
        "guidance_in.in_layer": (h, 256),
        "guidance_in.out_layer": (h, h),
        "final_layer.linear": (64, h),
        "final_layer.adaLN_modulation.1": (2 * h, h),
    }
    scales = {}
    for n in range(19):
        for stream in ("img", "txt"):
            block = f"double_blocks.{n}.{stream}"
            linears |= {
                f"{block}_mod.lin": (6 * h, h),
                f"{block}_attn.qkv": (3 * h, h),
                f"{block}_attn.proj": (h, h),
                f"{block}_mlp.0": (mlp, h),
                f"{block}_mlp.2": (h, mlp),
            }
            scales |= {f"{block}_attn.norm.query_norm.scale": (128,), f"{block}_attn.norm.key_norm.scale": (128,)}
    for n in range(38):
        block = f"single_blocks.{n}"
        linears |= {
            f"{block}.linear1": (3 * h + mlp, h),
            f"{block}.linear2": (h, h + mlp),
            f"{block}.modulation.lin": (3 * h, h),
        }
        scales |= {f"{block}.norm.query_norm.scale": (128,), f"{block}.norm.key_norm.scale": (128,)}
    expected = dict(scales)
    for name, shape in linears.items():
        expected[f"{name}.weight"] = shape
        expected[f"{name}.bias"] = shape[:1]
    return expected


def test_real_size_dev_has_the_reference_keys_and_size() -> None:
    with torch.device("meta"):
        model = Flux(FLUX_DEV)
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == _expected_dev_keys()
    assert len(model.double_blocks) == 19 and len(model.single_blocks) == 38
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.9e9, rel=0.01)


def test_real_size_chroma_has_the_approximator_and_no_modulation_layers() -> None:
    shapes = _shapes(CHROMA)
    assert shapes["distilled_guidance_layer.in_proj.weight"] == (5120, 64)
    assert shapes["distilled_guidance_layer.layers.4.out_layer.weight"] == (5120, 5120)
    assert shapes["distilled_guidance_layer.norms.4.scale"] == (5120,)
    assert shapes["distilled_guidance_layer.out_proj.weight"] == (3072, 5120)
    assert CHROMA.modulation_slots == 344
    dropped = ("time_in.", "vector_in.", "guidance_in.", "_mod.lin.", "modulation.lin.", "adaLN_modulation")
    assert not [key for key in shapes if any(part in key for part in dropped)]
    assert set(shapes) - set(_shapes(FLUX_DEV)) == {key for key in shapes if key.startswith("distilled_guidance_")}


@pytest.mark.parametrize("params", [TINY_DEV, TINY_CHROMA], ids=["dev", "chroma"])
def test_masked_text_tokens_do_not_reach_the_image(params: FluxParams) -> None:
    model = _random_model(params)
    inputs = _inputs(params)
    if params.chroma:
        inputs |= {"y": None, "guidance": None}
    mask = torch.ones(BATCH, TEXT, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 2:] = False
    # Chroma still attends to the first padding token, so only the ones past it may change.
    first_free = 1 if params.chroma else 0
    changed = inputs["txt"].clone()
    changed[0, 4 + first_free :] += 5.0
    changed[1, 2 + first_free :] -= 3.0
    with torch.no_grad():
        before = model(**inputs, txt_mask=mask)
        after = model(**{**inputs, "txt": changed}, txt_mask=mask)
        unmasked = model(**{**inputs, "txt": changed})
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert (unmasked - before).abs().max() > 1e-3  # without the mask the padding does reach the image


def _loss_and_grads(model: Flux, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    img = inputs["img"].clone().requires_grad_(True)
    loss = model(**{**inputs, "img": img}).square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads | {"<img>": img.grad}


@pytest.mark.parametrize("params", [TINY_DEV, TINY_CHROMA], ids=["dev", "chroma"])
@pytest.mark.parametrize("cpu_offload", [False, True], ids=["checkpointing", "cpu-offload"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(params: FluxParams, cpu_offload: bool) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _random_model(params).train().to(device)
    inputs = {key: value.to(device) for key, value in _inputs(params).items()}
    if params.chroma:  # Chroma is trained with the text mask (and its text window); FLUX.1 by default without
        mask = torch.ones(BATCH, TEXT, dtype=torch.bool, device=device)
        mask[1, 3:] = False
        inputs |= {"y": None, "guidance": None, "txt_mask": mask}
    loss, grads = _loss_and_grads(model, inputs)
    model.enable_gradient_checkpointing(cpu_offload=cpu_offload)
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, inputs)
    model.disable_gradient_checkpointing()
    assert torch.equal(checkpointed_loss, loss)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(checkpointed_grads[name], grad), name
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if "double_blocks.0" in name)


def test_checkpointing_is_skipped_without_gradients() -> None:
    model = _random_model(TINY_DEV)
    inputs = _inputs(TINY_DEV)
    with torch.no_grad():
        plain = model(**inputs)
        model.enable_gradient_checkpointing(cpu_offload=True)
        checkpointed = model(**inputs)
    assert torch.equal(plain, checkpointed)


def test_missing_conditioning_is_named() -> None:
    model = _random_model(TINY_DEV)
    inputs = _inputs(TINY_DEV)
    with pytest.raises(ValueError, match="guidance"):
        model(**{**inputs, "guidance": None})
    with pytest.raises(ValueError, match="CLIP-L pooled"):
        model(**{**inputs, "y": None})


def test_params_reject_inconsistent_sizes() -> None:
    with pytest.raises(ValueError, match="axes_dim"):
        replace(TINY_DEV, axes_dim=(16, 56, 56))
    with pytest.raises(ValueError, match="guidance_embed=False"):
        replace(TINY_DEV, chroma=True)


def test_model_properties_follow_the_weights() -> None:
    model = Flux(TINY_SCHNELL).to(torch.float16)
    assert model.dtype == torch.float16 and model.device == torch.device("cpu")
    assert model.params is TINY_SCHNELL


@pytest.mark.parametrize("params", [TINY_DEV, TINY_CHROMA], ids=["dev", "chroma"])
def test_bfloat16_model_runs_in_bfloat16(params: FluxParams) -> None:
    """Timesteps stay float32 (the sinusoid needs it) while weights and tokens are bf16; RoPE and norms widen inside."""
    model = _random_model(params)
    inputs = _inputs(params)
    if params.chroma:
        inputs |= {"y": None, "guidance": None}
    half = {
        key: value.bfloat16() if key in ("img", "txt", "y") and value is not None else value
        for key, value in inputs.items()
    }
    with torch.no_grad():
        wide = model(**inputs)
        narrow = model.to(torch.bfloat16)(**half)
    assert narrow.dtype == torch.bfloat16
    assert (narrow.float() - wide).abs().max() < 0.1
