"""The LoRA tools (`python -m engine lora inspect|merge|resize|extract`) on SD3 / SD3.5 LoRAs and SAI single files.

Checked against the maths and against the LoRA network the trainer uses (engine.networks.lora), on tiny SD3 files
written here from the real architectures (MMDiT(tiny_params(variant)) under ``model.diffusion_model.``, a VAE stand-in
under ``first_stage_model.``, tiny CLIP-L / CLIP-G / T5 inside under ``text_encoders.*.transformer.`` or as separate
files): a model merged with a LoRA must compute what the base model computes with the LoRA applied through
``create_lora_network`` (MMDiT, CLIP-L, CLIP-G and T5); merged and resized LoRAs must change the layers as their
sources do (or within the SVD's error); an extracted LoRA must recover a known low-rank change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402
from lora_cli import run_cli, run_json  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel  # noqa: E402

from engine.models.sd3.mmdit import MMDiT  # noqa: E402
from engine.models.sd3.params import params_from_state_dict, tiny_params  # noqa: E402
from engine.networks.lora import LoRANetwork, create_lora_network  # noqa: E402
from engine.networks.lora_names import unet_targets  # noqa: E402
from engine.networks.network_file import read_network_file, save_network_file  # noqa: E402

SAI = "model.diffusion_model."
EMBEDDED = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
            "t5xxl": "text_encoders.t5xxl.transformer."}
ENCODERS = ("clip_l", "clip_g", "t5xxl")
TOKENS = torch.tensor([[0, 32, 45, 77, 2]])
ALL_TEXT = {"train_t5xxl": "True", "emb_dims": "[2,2,2,2,2,2]"}


def metadata_for(variant: str) -> dict[str, str]:
    architecture = {"medium": "stable-diffusion-3-medium", "5-medium": "stable-diffusion-3-5-medium",
                    "5-large": "stable-diffusion-3-5-large"}[variant]
    return {"ss_network_module": "networks.lora_sd3", "ss_base_model_version": variant,
            "modelspec.architecture": f"{architecture}/lora"}


# --- tiny SD3 files -------------------------------------------------------------------------------------------------

def text_encoder(name: str) -> nn.Module:
    """Tiny CLIP-L (2 layers), CLIP-G (3 layers, pad 0) and T5 with their own seeds."""
    torch.manual_seed({"clip_l": 1, "clip_g": 2, "t5xxl": 3}[name])
    if name == "t5xxl":
        return T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                       feed_forward_proj="gated-gelu")).eval()
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2 if name == "clip_l" else 3,
        num_attention_heads=2, projection_dim=32, pad_token_id=1 if name == "clip_l" else 0)).eval()


def plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone().contiguous() for key, value in state.items()}  # T5 ties shared weights


def write_sd3(folder: Path, variant: str, *, embedded: bool) -> dict[str, Path]:
    """A SAI single file (MMDiT + VAE stand-in, text encoders inside when ``embedded``) and separate encoder files."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    mmdit = MMDiT(tiny_params(variant))
    state = {SAI + key: value for key, value in plain(mmdit.state_dict()).items()}
    state["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3)
    files = {}
    for name in ENCODERS:
        weights = plain(text_encoder(name).state_dict())
        files[name] = folder / f"{name}.safetensors"
        save_file(weights, str(files[name]))
        if embedded:
            state.update({EMBEDDED[name] + key: value for key, value in weights.items()})
    files["model"] = folder / f"sd3_{variant}.safetensors"
    save_file(state, str(files["model"]))
    return files


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict[str, Path]:
    return write_sd3(tmp_path_factory.mktemp("sd35l"), "5-large", embedded=True)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> dict[str, Path]:
    return write_sd3(tmp_path_factory.mktemp("sd35m"), "5-medium", embedded=False)


def mmdit_from_file(path: Path) -> MMDiT:
    state = {key.removeprefix(SAI): value for key, value in load_file(str(path)).items() if key.startswith(SAI)}
    model = MMDiT(params_from_state_dict({key: tuple(value.shape) for key, value in state.items()}))
    model.load_state_dict(state, strict=True)
    return model.eval()


def encoder_from(path: Path, name: str, prefix: str = "") -> nn.Module:
    model = text_encoder(name)
    state = {key.removeprefix(prefix): value for key, value in load_file(str(path)).items() if key.startswith(prefix)}
    model.load_state_dict(state, strict=False)  # T5's tied encoder.embed_tokens may be absent
    return model.eval()


def models(files: dict[str, Path]) -> tuple[MMDiT, list[nn.Module]]:
    """The MMDiT and the three text encoders of the tiny files, freshly loaded (float32)."""
    return mmdit_from_file(files["model"]), [encoder_from(files[name], name) for name in ENCODERS]


def make_lora(files: dict[str, Path], path: Path, *, dim: int, alpha: float, seed: int,
              network_args: dict | None = None, metadata: dict | None = None, text: bool = True) -> LoRANetwork:
    """An SD3 LoRA with random lora_up (a trained-looking file), saved with kohya keys."""
    mmdit, encoders = models(files)
    network = create_lora_network(mmdit, encoders, "sd3", dim=dim, alpha=alpha, train_text_encoder=text,
                                  network_args=network_args if network_args is not None else ALL_TEXT)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            for up in lora.lora_up.modules():
                if isinstance(up, (nn.Linear, nn.Conv2d)):
                    up.weight.copy_(torch.randn(up.weight.shape, generator=generator) * 0.3)
    variant = params_from_state_dict({key.removeprefix(SAI): tuple(value.shape) for key, value in
                                      load_file(str(files["model"])).items() if key.startswith(SAI)}).variant
    save_network_file(path, network.kohya_state_dict(), dict(metadata_for(variant) if metadata is None else metadata),
                      save_as="safetensors")
    return network


def loaded_network(files: dict[str, Path], path: Path, *, dim: int, multiplier: float = 1.0,
                   on: tuple[MMDiT, list] | None = None, args: dict | None = None) -> tuple[LoRANetwork, tuple]:
    mmdit, encoders = on or models(files)
    network = create_lora_network(mmdit, encoders, "sd3", dim=dim, alpha=1.0, multiplier=multiplier,
                                  network_args=ALL_TEXT if args is None else args)
    network.load_kohya_state_dict(load_file(str(path)))
    return network, (mmdit, encoders)


def mmdit_inputs(model: MMDiT) -> dict[str, torch.Tensor]:
    params = model.params
    generator = torch.Generator().manual_seed(7)
    return {"x": torch.randn(1, 16, 8, 8, generator=generator), "t": torch.tensor([600.0]),
            "y": torch.randn(1, params.adm_in_channels, generator=generator),
            "context": torch.randn(1, 6, params.context_in_dim, generator=generator)}


@torch.no_grad()
def outputs(mmdit: MMDiT, encoders: list[nn.Module]) -> list[torch.Tensor]:
    return [mmdit(**mmdit_inputs(mmdit)), *(encoder(TOKENS).last_hidden_state for encoder in encoders)]


def assert_close(found: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-5) -> None:
    for got, want in zip(found, expected, strict=True):
        assert torch.allclose(got, want, atol=atol, rtol=0), float((got - want).abs().max())


def deltas(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_network_file(path)
    result = {}
    for name in {key.partition(".")[0] for key in tensors}:
        up, down = tensors[f"{name}.lora_up.weight"].float(), tensors[f"{name}.lora_down.weight"].float()
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
        result[name] = up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0])
    return result


# --- inspect -------------------------------------------------------------------------------------------------------

def test_inspect_shows_family_variant_and_parts(large, tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    network = make_lora(large, path, dim=4, alpha=2.0, seed=1)
    parts = dict(network.parts())
    code, report = run_json(capsys, "inspect", path)
    assert code == 0 and report["ok"] and report["format"] == "kohya LoCon"  # the patch conv is 2x2
    # tiny 5-large: 2 joint blocks (10 + 7 Linears), 8 emb_dims layers, CLIP-L, CLIP-G and T5 as the network has
    assert report["modules"] == {"joint": 17, "unet": 8, "te1": len(parts["text_encoder1"]),
                                 "te2": len(parts["text_encoder2"]), "te3": len(parts["text_encoder3"])}
    assert report["family"] == "sd3" and report["variant"] == "5-large"
    assert report["base_model"] == "5-large (metadata ss_base_model_version)"
    assert report["training"]["ss_network_module"] == "networks.lora_sd3"
    assert report["conv_modules"] == 1 and report["split_qkv"] == {}
    code, text, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "family: sd3 (5-large)" in text and "(joint 17, unet 8, te1" in text


def test_inspect_without_metadata_guesses_from_the_names(large, medium, tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"
    make_lora(large, bare, dim=2, alpha=1.0, seed=2, metadata={}, network_args={}, text=False)
    code, report = run_json(capsys, "inspect", bare)
    assert code == 0 and report["family"] == "sd3" and report["variant"] == ""
    assert report["base_model"] == "sd3 (guessed from the module names)"
    attn2 = tmp_path / "attn2.safetensors"
    make_lora(medium, attn2, dim=2, alpha=1.0, seed=3, metadata={}, network_args={}, text=False)
    code, report = run_json(capsys, "inspect", attn2)
    assert code == 0 and report["variant"] == "5-medium"  # only SD3.5 medium has attn2
    labelled = tmp_path / "labelled.safetensors"
    save_file(read_network_file(bare)[0], str(labelled),
              metadata={"modelspec.architecture": "stable-diffusion-3-medium/lora"})
    code, report = run_json(capsys, "inspect", labelled)
    assert code == 0 and report["family"] == "sd3" and report["variant"] == "medium"


def test_inspect_reports_split_qkv_modules(medium, tmp_path, capsys):
    path = tmp_path / "split.safetensors"
    make_lora(medium, path, dim=2, alpha=1.0, seed=4, network_args={"split_qkv": "True"}, metadata={},
              text=False)
    code, report = run_json(capsys, "inspect", path)
    # context and x attn.qkv of 2 joint blocks, and block 0's attn2.qkv, each in 3 parts
    assert code == 0 and report["split_qkv"] == {"3": 5}
    assert report["ranks"] == {"2": 19 - 5, "6": 5}


def test_inspect_of_an_sd3_model_says_it_is_a_base_model(large, capsys):
    code, report = run_json(capsys, "inspect", large["model"])
    assert code == 2 and report["format"] == "unknown"
    assert "a whole SD3/SD3.5 model (a base model, not a LoRA)" in report["errors"][0]


# --- merge into one LoRA and resize ---------------------------------------------------------------------------------

def test_merged_lora_applies_as_both_sources(large, tmp_path, capsys):
    first, second, merged = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "ab.safetensors"
    make_lora(large, first, dim=4, alpha=2.0, seed=5)
    make_lora(large, second, dim=2, alpha=1.0, seed=6)
    code, report = run_json(capsys, "merge", f"{first}:0.7", second, "-o", merged)
    assert code == 0 and report["method"] == "concatenate"
    net_a, models_ab = loaded_network(large, first, dim=4, multiplier=0.7)
    net_b, _ = loaded_network(large, second, dim=2, on=models_ab)
    net_a.apply_to()
    net_b.apply_to()
    both = outputs(*models_ab)
    # ranks add up: 4 + 2 in the blocks and text encoders, 2 + 2 in the emb_dims layers
    net_merged, models_merged = loaded_network(large, merged, dim=6, args={"train_t5xxl": "True",
                                                                           "emb_dims": "[4,4,4,4,4,4]"})
    net_merged.apply_to()
    assert_close(outputs(*models_merged), both)
    _, metadata = read_network_file(merged)
    assert metadata["ss_network_module"] == "networks.lora_sd3" and metadata["ss_base_model_version"] == "5-large"
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"


def test_merge_refuses_an_sd3_lora_with_a_flux_lora(large, tmp_path, capsys):
    sd3 = tmp_path / "sd3.safetensors"
    make_lora(large, sd3, dim=2, alpha=1.0, seed=7, metadata={}, text=False, network_args={})
    flux = tmp_path / "flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 4),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(12, 2),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0)}, str(flux))
    code, _, err = run_cli(capsys, "merge", sd3, flux, "-o", tmp_path / "x.safetensors")
    assert code == 2 and "different model families" in err and "sd3.safetensors: sd3" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_resize_keeps_each_change_within_the_svd_error(large, tmp_path, capsys):
    source, small = tmp_path / "r4.safetensors", tmp_path / "r2.safetensors"
    make_lora(large, source, dim=4, alpha=2.0, seed=8)
    code, report = run_json(capsys, "resize", source, "-o", small, "--rank", 2)
    assert code == 0 and report["ranks_after"] == {"2": sum(report["ranks_before"].values())}
    before, after = deltas(source), deltas(small)
    assert before.keys() == after.keys() and "lora_unet_x_embedder_proj" in before
    for name, delta in before.items():
        singular = torch.linalg.svdvals(delta.double())
        best_error = float(singular[2:].square().sum().sqrt())  # Eckart-Young: the best rank-2 error
        error = float(torch.linalg.matrix_norm(after[name].double() - delta.double()))
        assert error == pytest.approx(best_error, rel=1e-4, abs=1e-6), name
    _, metadata = read_network_file(small)
    assert metadata["ss_network_module"] == "networks.lora_sd3" and metadata["ss_network_dim"] == "2"
    assert metadata["ss_base_model_version"] == "5-large"


# --- merge into a checkpoint ---------------------------------------------------------------------------------------

def test_merge_into_an_all_in_one_file_computes_the_lora_applied(large, tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    make_lora(large, lora, dim=4, alpha=2.0, seed=9)
    out = tmp_path / "merged.safetensors"
    code, report = run_json(capsys, "merge", f"{lora}:0.8", "-o", out, "--into-model", large["model"])
    assert code == 0 and report["family"] == "sd3", report
    assert report["components"] == {} and set(report["loras"][0]["modules"]) == {"joint", "unet", "te1", "te2",
                                                                                 "te3"}
    network, applied = loaded_network(large, lora, dim=4, multiplier=0.8)
    network.apply_to()
    expected = outputs(*applied)
    merged = (mmdit_from_file(out), [encoder_from(out, name, EMBEDDED[name]) for name in ENCODERS])
    assert_close(outputs(*merged), expected)
    base_outputs = outputs(*models(large))
    assert all(not torch.allclose(got, base) for got, base in zip(expected, base_outputs, strict=True))
    with safe_open(str(out), "pt") as merged_file, safe_open(str(large["model"]), "pt") as base_file:
        assert list(merged_file.keys()) == list(base_file.keys())  # model.diffusion_model.*, text_encoders.*, VAE
        assert torch.equal(merged_file.get_tensor("first_stage_model.decoder.conv_in.weight"),
                           base_file.get_tensor("first_stage_model.decoder.conv_in.weight"))
        metadata = merged_file.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-large"
    assert "modelspec.prediction_type" not in metadata
    assert metadata["modelspec.merged_from"] == f"{large['model'].name}, style.safetensors:0.8"


def test_merge_into_a_transformer_file_with_separate_text_encoders(medium, tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    make_lora(medium, lora, dim=2, alpha=1.0, seed=10)
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(capsys, "merge", lora, "-o", out, "--into-model", medium["model"], "--clip-l",
                           medium["clip_l"], "--clip-l-save-to", tmp_path / "l.safetensors")
    assert code == 2 and "CLIP-G module(s)" in err and "--clip-g" in err and "--clip-g-save-to" in err
    assert not out.exists()
    saved = {name: tmp_path / f"{name}_merged.safetensors" for name in ENCODERS}
    code, report = run_json(capsys, "merge", lora, "-o", out, "--into-model", medium["model"],
                            *(arg for name in ENCODERS for arg in (f"--{name.replace('_', '-')}", medium[name],
                                                                    f"--{name.replace('_', '-')}-save-to",
                                                                    saved[name])),
                            "--save-precision", "float")
    assert code == 0, report
    assert report["components"] == {"clip-l": str(saved["clip_l"]), "clip-g": str(saved["clip_g"]),
                                    "t5xxl": str(saved["t5xxl"])}
    network, applied = loaded_network(medium, lora, dim=2, args={"train_t5xxl": "True", "emb_dims": [2] * 6})
    network.apply_to()
    merged = (mmdit_from_file(out), [encoder_from(saved[name], name) for name in ENCODERS])
    assert_close(outputs(*merged), outputs(*applied))
    with safe_open(str(out), "pt") as merged_file:
        assert merged_file.metadata()["modelspec.architecture"] == "stable-diffusion-3-5-medium"


# --- extract -------------------------------------------------------------------------------------------------------

def test_extract_recovers_a_known_low_rank_change(medium, tmp_path, capsys):
    base_state = load_file(str(medium["model"]))
    mmdit, encoders = models(medium)
    targets = unet_targets(mmdit, "sd3", include_conv_blocks=False)
    paths = {id(module): path for path, module in mmdit.named_modules()}
    generator = torch.Generator().manual_seed(11)
    tuned_state, known = dict(base_state), {}
    for target in targets:
        key = f"{SAI}{paths[id(target.module)]}.weight"
        out_features, in_features = base_state[key].shape
        change = torch.randn(out_features, 2, generator=generator) @ torch.randn(2, in_features, generator=generator)
        known[target.name] = change * 0.01
        tuned_state[key] = base_state[key] + known[target.name]
    tuned = tmp_path / "tuned.safetensors"
    save_file(tuned_state, str(tuned))
    out = tmp_path / "extracted.safetensors"
    code, report = run_json(capsys, "extract", "--base", medium["model"], "--tuned", tuned, "-o", out, "--dim", 4)
    assert code == 0 and report["family"] == "sd3" and report["modules"] == {"joint": 19}, report
    assert report["retained"]["min"] == pytest.approx(1.0, abs=1e-6)
    extracted = deltas(out)
    assert extracted.keys() == known.keys()
    for name, change in known.items():
        assert torch.allclose(extracted[name], change, atol=1e-6), name
    network = create_lora_network(mmdit, encoders, "sd3", dim=4, alpha=4.0, train_text_encoder=False)
    network.load_kohya_state_dict(load_file(str(out)))
    network.apply_to()
    expected = mmdit_from_file(tuned)
    assert torch.allclose(mmdit(**mmdit_inputs(mmdit)), expected(**mmdit_inputs(expected)), atol=1e-5)
    _, metadata = read_network_file(out)
    assert metadata["ss_network_module"] == "networks.lora_sd3" and metadata["ss_base_model_version"] == "5-medium"
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert "modelspec.prediction_type" not in metadata
    assert json.loads(metadata.get("ss_network_args", "{}")) == {}


def test_extract_refuses_two_variants(large, medium, tmp_path, capsys):
    code, _, err = run_cli(capsys, "extract", "--base", medium["model"], "--tuned", large["model"], "-o",
                           tmp_path / "x.safetensors", "--rank", 2)
    assert code == 2 and "differ" in err
