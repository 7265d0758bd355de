"""The kohya LoRA and LyCORIS networks on a tiny FLUX.1 transformer: split_qkv's merged files, loading them back,
and LyCORIS modules under the LoRA's names (engine.networks.lora, lycoris_network; spec §5.3, appendix A.2).

The alpha convention of split_qkv files is checked the way every other loader reads them: a plain LoRA (one pair
per fused layer, ``scale = alpha / lora_down rows``, which is ComfyUI's and diffusers' rule) loaded with the merged
file must compute exactly what the split network computed while training.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from engine.models.flux.params import FluxParams
from engine.models.flux.transformer import Flux
from engine.networks.lora import LoRANetwork, create_lora_network
from engine.networks.lora_modules import SplitLoRAModule
from engine.networks.lycoris_network import create_lycoris_network

TINY = FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                  axes_dim=(4, 14, 14))
RANK = 4


@pytest.fixture(scope="module")
def flux() -> Flux:
    torch.manual_seed(0)
    model = Flux(TINY).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def inputs(batch: int = 2, tokens: int = 16, text: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"img": torch.randn(batch, tokens, 64, generator=generator), "img_ids": torch.zeros(batch, tokens, 3),
            "txt": torch.randn(batch, text, 32, generator=generator), "txt_ids": torch.zeros(batch, text, 3),
            "timesteps": torch.tensor([0.3, 0.8]), "y": torch.randn(batch, 32, generator=generator),
            "guidance": torch.tensor([3.5, 3.5])}


def output(model: Flux, network: LoRANetwork) -> torch.Tensor:
    network.apply_to()
    try:
        with torch.no_grad():
            return model(**inputs())
    finally:
        network.restore()


def randomize(network: LoRANetwork, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def network(model: Flux, alpha: float = 2.0, **args) -> LoRANetwork:
    return create_lora_network(model, [nn.Module(), nn.Module()], "flux1", dim=RANK, alpha=alpha,
                               train_text_encoder=False, network_args=args or None)


def test_split_modules_and_merged_shapes(flux):
    split = network(flux, split_qkv="true")
    kinds = {lora.lora_name: lora for lora in split.unet_loras if isinstance(lora, SplitLoRAModule)}
    assert sorted(kinds) == sorted([f"lora_unet_double_blocks_{i}_{side}_attn_qkv" for i in range(2)
                                    for side in ("img", "txt")] + [f"lora_unet_single_blocks_{i}_linear1"
                                                                   for i in range(2)])
    assert kinds["lora_unet_single_blocks_0_linear1"].parts == (64, 64, 64, 256)
    saved = split.kohya_state_dict()
    assert saved["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * RANK, 64)
    assert saved["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (192, 3 * RANK)
    assert saved["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape == (4 * RANK, 64)
    assert saved["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (448, 4 * RANK)
    # alpha x parts, so that alpha / rows (every loader's scale) is the trained alpha / rank (A.2)
    assert float(saved["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3 * 2.0
    assert float(saved["lora_unet_single_blocks_1_linear1.alpha"]) == 4 * 2.0
    assert float(saved["lora_unet_single_blocks_1_linear2.alpha"]) == 2.0
    assert not any(".lora_down.0" in key for key in saved)
    up = saved["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert torch.count_nonzero(up[:64, RANK:]) == 0  # block-diagonal (all zero before training, still the shape)


def test_merged_file_reproduces_training_in_a_plain_loader(flux, tmp_path):
    split = network(flux, split_qkv=True)
    randomize(split)
    trained = output(flux, split)
    baseline = output(flux, network(flux))
    assert not torch.allclose(trained, baseline)
    path = tmp_path / "split.safetensors"
    save_file(split.kohya_state_dict(), str(path))
    # a loader without split_qkv: ranks 3r / 4r on the fused layers, scale alpha / rows
    plain = network(flux, network_reg_dims=f"attn_qkv={3 * RANK},linear1={4 * RANK}")
    plain.load_kohya_state_dict(load_file(str(path)))
    torch.testing.assert_close(output(flux, plain), trained, rtol=1e-5, atol=1e-5)


def test_split_round_trip(flux, tmp_path):
    split = network(flux, split_qkv=True)
    randomize(split, seed=7)
    with torch.no_grad():
        for name, parameter in split.named_parameters():
            if "lora_down" in name:
                parameter.add_(0.01)
    path = tmp_path / "split.safetensors"
    save_file(split.kohya_state_dict(), str(path))
    again = network(flux, split_qkv=True)
    again.load_kohya_state_dict(load_file(str(path)))
    assert again.state_dict().keys() == split.state_dict().keys()
    for key, value in split.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(output(flux, again), output(flux, split), rtol=0, atol=0)
    assert again.kohya_state_dict().keys() == split.kohya_state_dict().keys()


def test_a_full_rank_file_is_not_split(flux):
    plain = network(flux, network_reg_dims=f"attn_qkv={3 * RANK},linear1={4 * RANK}")
    randomize(plain)
    with pytest.raises(ValueError, match="not block-diagonal.*remove split_qkv"):
        network(flux, split_qkv=True).load_kohya_state_dict(plain.kohya_state_dict())
    with pytest.raises(ValueError, match=r"lora_unet_double_blocks_0_img_attn_qkv\.lora_down\.weight has shape"):
        network(flux, split_qkv=True).load_kohya_state_dict(network(flux).kohya_state_dict())


def test_split_network_trains_every_part(flux):
    split = network(flux, split_qkv=True)
    randomize(split)
    split.train()
    split.apply_to()
    try:
        flux(**inputs()).square().mean().backward()
    finally:
        split.restore()
    module = split.unet_loras[1]
    assert isinstance(module, SplitLoRAModule)
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for layer in module.lora_down)
    groups = split.prepare_optimizer_params(1e-4, [0.0, 0.0])
    assert sum(len(group["params"]) for group in groups) == len(list(split.parameters()))


# --- LyCORIS --------------------------------------------------------------------------------------------------

def encoders() -> list[nn.Module]:
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                 feed_forward_proj="gated-gelu"))
    return [clip, t5]


@pytest.mark.parametrize(("algo", "suffix"), [("lokr", "lokr_w1"), ("loha", "hada_w1_a")])
def test_lycoris_uses_the_lora_modules_and_names(flux, algo, suffix):
    pytest.importorskip("lycoris")
    text = encoders()
    lora = create_lora_network(flux, text, "flux1", dim=RANK, alpha=1.0, network_args={"train_t5xxl": True})
    lycoris = create_lycoris_network(flux, text, "flux1", algo=algo, dim=RANK, alpha=1.0,
                                     network_args={"train_t5xxl": "true"})
    names = sorted(module.lora_name for module in lycoris.all_loras())
    assert names == sorted(module.lora_name for module in lora.all_loras())
    assert len(lycoris.unet_loras) == 2 * 10 + 2 * 3
    assert any(name.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q") for name in names)
    saved = lycoris.kohya_state_dict()
    assert f"lora_unet_double_blocks_0_img_attn_qkv.{suffix}" in saved
    assert f"lora_unet_single_blocks_1_linear1.{suffix}" in saved
    assert not any("final_layer" in key for key in saved)
    without_t5 = create_lycoris_network(flux, text, "flux1", algo=algo, dim=RANK, alpha=1.0)
    assert without_t5.text_encoder_loras[1] == [] and len(without_t5.text_encoder_loras[0]) == 12


def test_lycoris_refuses_lora_only_flux_args(flux):
    pytest.importorskip("lycoris")
    with pytest.raises(ValueError, match=r"network\.network_args\.split_qkv is an option of the FLUX LoRA"):
        create_lycoris_network(flux, encoders(), "flux1", algo="lokr", dim=RANK, alpha=1.0,
                               network_args={"split_qkv": "true"})
