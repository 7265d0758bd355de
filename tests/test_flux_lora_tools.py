"""The LoRA tools (`python -m engine lora inspect|merge|resize|extract`) on FLUX.1 / Chroma LoRAs and BFL files.

Checked against the maths and against the LoRA network the trainer uses (engine.networks.lora), on the tiny FLUX
files of tests/flux_tiny.py: a model merged with a LoRA must compute what the base model computes with the LoRA
applied through ``create_lora_network`` (transformer, CLIP-L and T5); merged and resized LoRAs must change the
layers as their sources do (or within the SVD's error); an extracted LoRA must recover a known low-rank change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from lora_cli import run_cli, run_json
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.models.flux.params import params_from_state_dict
from engine.models.flux.text_encoders import load_clip_l, load_t5xxl
from engine.models.flux.transformer import Flux
from engine.networks.lora import LoRANetwork, create_lora_network
from engine.networks.lora_names import unet_targets
from engine.networks.network_file import read_network_file, save_network_file
from tests.flux_tiny import tiny_flux_files, write_tiny_diffusers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

FLUX_METADATA = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                 "modelspec.architecture": "flux-1-dev/lora", "ss_model_type": "flux"}
CLIP_TOKENS = torch.tensor([[0, 320, 1125, 539, 2]])
T5_TOKENS = torch.tensor([[5, 7, 9, 11, 1]])
ALL_TEXT = {"train_t5xxl": "True"}  # with CLIP-L, which trains by default


# --- helpers -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev() -> dict[str, Path]:
    return tiny_flux_files("dev")


@pytest.fixture(scope="module")
def chroma() -> dict[str, Path]:
    return tiny_flux_files("chroma")


def flux_from_file(path: Path, prefix: str = "") -> Flux:
    state = {key.removeprefix(prefix): value for key, value in load_file(str(path)).items()}
    model = Flux(params_from_state_dict({key: tuple(value.shape) for key, value in state.items()}))
    model.load_state_dict(state, strict=True)
    return model.eval()


def models(files: dict[str, Path], chroma_model: bool = False) -> tuple[Flux, list[torch.nn.Module]]:
    """The transformer and text encoders of the tiny files, freshly loaded (float32)."""
    encoders = [load_t5xxl(files["t5xxl"])] if chroma_model else [load_clip_l(files["clip_l"]),
                                                                    load_t5xxl(files["t5xxl"])]
    return flux_from_file(files["model"]), [encoder.eval() for encoder in encoders]


def make_lora(files: dict[str, Path], path: Path, *, dim: int, alpha: float, seed: int, family: str = "flux1",
              network_args: dict | None = None, metadata: dict | None = None, text: bool = True) -> LoRANetwork:
    """A FLUX LoRA with random lora_up (a trained-looking file), saved with kohya keys; ``text``: with
    text-encoder modules."""
    transformer, encoders = models(files, family == "chroma")
    network = create_lora_network(transformer, encoders, family, dim=dim, alpha=alpha, train_text_encoder=text,
                                  network_args=network_args if network_args is not None else ALL_TEXT)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            for up in lora.lora_up.modules():
                if isinstance(up, torch.nn.Linear):
                    up.weight.copy_(torch.randn(up.weight.shape, generator=generator) * 0.3)
    save_network_file(path, network.kohya_state_dict(), dict(FLUX_METADATA if metadata is None else metadata),
                      save_as="safetensors")
    return network


def loaded_network(files: dict[str, Path], path: Path, *, dim: int, multiplier: float = 1.0,
                   chroma_model: bool = False, on: tuple[Flux, list] | None = None) -> tuple[LoRANetwork, tuple]:
    """A network read from a LoRA file (alpha per module from the file), built on ``on`` or fresh models."""
    transformer, encoders = on or models(files, chroma_model)
    family = "chroma" if chroma_model else "flux1"
    network = create_lora_network(transformer, encoders, family, dim=dim, alpha=1.0, network_args=ALL_TEXT,
                                  multiplier=multiplier)
    network.load_kohya_state_dict(load_file(str(path)))
    return network, (transformer, encoders)


def flux_inputs(transformer: Flux) -> dict[str, torch.Tensor]:
    params = transformer.params
    generator = torch.Generator().manual_seed(7)
    tokens, text = 16, 6
    ids = torch.zeros(1, tokens, 3)
    ids[0, :, 1], ids[0, :, 2] = torch.arange(tokens) // 4, torch.arange(tokens) % 4
    inputs = {"img": torch.randn(1, tokens, params.in_channels, generator=generator), "img_ids": ids,
              "txt": torch.randn(1, text, params.context_in_dim, generator=generator),
              "txt_ids": torch.zeros(1, text, 3), "timesteps": torch.tensor([0.6])}
    if not params.chroma:
        inputs["y"] = torch.randn(1, params.vec_in_dim, generator=generator)
    if params.guidance_embed:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


@torch.no_grad()
def outputs(transformer: Flux, encoders: list[torch.nn.Module]) -> list[torch.Tensor]:
    """The transformer's output and each text encoder's last hidden state on fixed inputs."""
    tokens = [CLIP_TOKENS, T5_TOKENS][-len(encoders):]
    return [transformer(**flux_inputs(transformer)),
            *(encoder(ids).last_hidden_state for encoder, ids in zip(encoders, tokens, strict=True))]


def assert_close(found: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-5) -> None:
    for got, want in zip(found, expected, strict=True):
        assert torch.allclose(got, want, atol=atol, rtol=0), float((got - want).abs().max())


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each module's alpha/rank * up @ down from a file."""
    tensors, _ = read_network_file(path)
    names = {key.partition(".")[0] for key in tensors}
    result = {}
    for name in names:
        up, down = tensors[f"{name}.lora_up.weight"].float(), tensors[f"{name}.lora_down.weight"].float()
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
        result[name] = up @ down * (alpha / down.shape[0])
    return result


# --- inspect -------------------------------------------------------------------------------------------------------


def test_inspect_counts_flux_modules_per_block_kind(dev, tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    network = make_lora(dev, path, dim=4, alpha=2.0, seed=1)
    parts = dict(network.parts())
    code, report = run_json(capsys, "inspect", path)
    assert code == 0 and report["ok"] and report["format"] == "kohya LoRA"
    # tiny model: 2 double blocks x 10 Linears, 2 single blocks x 3 (spec 5.1); CLIP-L and T5 as the network has
    assert report["modules"] == {"double": 20, "single": 6, "te1": len(parts["text_encoder1"]),
                                 "te3": len(parts["text_encoder2"])}
    assert report["family"] == "flux1" and report["base_model"].startswith("flux1")
    total = sum(report["modules"].values())
    assert report["ranks"] == {"4": total} and report["alphas"] == {"2": total} and report["split_qkv"] == {}
    assert report["training"]["ss_network_module"] == "networks.lora_flux"
    code, text, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "(double 20, single 6, te1" in text and "family: flux1" in text


def test_inspect_tells_flux1_and_chroma_by_metadata_else_says_flux(dev, tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"
    make_lora(dev, bare, dim=2, alpha=1.0, seed=2, metadata={})
    code, report = run_json(capsys, "inspect", bare)
    assert code == 0 and report["family"] == "flux"
    assert report["base_model"] == "flux (flux1 or chroma; guessed from the module names)"
    labelled = tmp_path / "labelled.safetensors"
    tensors, _ = read_network_file(bare)
    save_file(tensors, str(labelled), metadata={"modelspec.architecture": "chroma/lora"})
    code, report = run_json(capsys, "inspect", labelled)
    assert code == 0 and report["family"] == "chroma"


def test_inspect_reports_split_qkv_modules(dev, tmp_path, capsys):
    path = tmp_path / "split.safetensors"
    make_lora(dev, path, dim=2, alpha=1.0, seed=3, network_args={"split_qkv": "True"}, metadata={})
    code, report = run_json(capsys, "inspect", path)
    # img_attn.qkv and txt_attn.qkv of 2 double blocks in 3 parts; linear1 of 2 single blocks in 4
    assert code == 0 and report["split_qkv"] == {"3": 4, "4": 2}
    assert report["ranks"] == {"2": sum(report["modules"].values()) - 6, "6": 4, "8": 2}
    assert any("1/3 or 1/4 of the trained strength" in warning for warning in report["warnings"])


def test_inspect_of_a_flux_model_says_it_is_a_base_model(dev, capsys):
    code, report = run_json(capsys, "inspect", dev["model"])
    assert code == 2 and report["format"] == "unknown"
    assert "a whole FLUX.1/Chroma transformer (a base model, not a LoRA)" in report["errors"][0]


# --- merge into one LoRA and resize ---------------------------------------------------------------------------------


def test_merged_lora_applies_as_both_sources(dev, tmp_path, capsys):
    first, second, merged = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "ab.safetensors"
    make_lora(dev, first, dim=4, alpha=2.0, seed=4)
    make_lora(dev, second, dim=2, alpha=1.0, seed=5)
    code, report = run_json(capsys, "merge", f"{first}:0.7", second, "-o", merged)
    assert code == 0 and report["method"] == "concatenate"
    assert report["ranks"] == {"6": sum(report["modules"].values())}
    net_a, models_ab = loaded_network(dev, first, dim=4, multiplier=0.7)
    net_b, _ = loaded_network(dev, second, dim=2, on=models_ab)
    net_a.apply_to()
    net_b.apply_to()
    both = outputs(*models_ab)
    net_merged, models_merged = loaded_network(dev, merged, dim=6)
    net_merged.apply_to()
    assert_close(outputs(*models_merged), both)
    _, metadata = read_network_file(merged)
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_base_model_version"] == "flux1"
    assert metadata["ss_model_type"] == "flux"


def test_merge_refuses_a_flux_lora_with_an_sd_lora(dev, tmp_path, capsys):
    flux = tmp_path / "flux.safetensors"
    make_lora(dev, flux, dim=2, alpha=1.0, seed=6, metadata={})
    sd = tmp_path / "sd.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(4, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}, str(sd))
    code, _, err = run_cli(capsys, "merge", flux, sd, "-o", tmp_path / "x.safetensors")
    assert code == 2 and "different model families" in err and "flux.safetensors: flux" in err
    assert not (tmp_path / "x.safetensors").exists()
    # a LoRA of text-encoder modules only says nothing about the denoiser: it merges with either
    text_only = tmp_path / "text.safetensors"
    tensors, _ = read_network_file(flux)
    save_file({key: value for key, value in tensors.items() if key.startswith("lora_te")}, str(text_only))
    code, report = run_json(capsys, "merge", flux, text_only, "-o", tmp_path / "y.safetensors")
    assert code == 0 and report["modules"]["te1"] > 0


def test_resize_keeps_each_change_within_the_svd_error(dev, tmp_path, capsys):
    source, small = tmp_path / "r4.safetensors", tmp_path / "r2.safetensors"
    make_lora(dev, source, dim=4, alpha=2.0, seed=8)
    code, report = run_json(capsys, "resize", source, "-o", small, "--rank", 2)
    assert code == 0 and report["ranks_after"] == {"2": sum(report["ranks_before"].values())}
    before, after = deltas(source), deltas(small)
    assert before.keys() == after.keys()
    for name, delta in before.items():
        singular = torch.linalg.svdvals(delta.double())
        best_error = float(singular[2:].square().sum().sqrt())  # Eckart-Young: the best rank-2 error
        error = float(torch.linalg.matrix_norm(after[name].double() - delta.double()))
        assert error == pytest.approx(best_error, rel=1e-4, abs=1e-6), name
    _, metadata = read_network_file(small)
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_network_dim"] == "2"


def test_resize_of_a_split_qkv_file_is_a_plain_lora(dev, tmp_path, capsys):
    source, small = tmp_path / "split.safetensors", tmp_path / "split_r1.safetensors"
    network = make_lora(dev, source, dim=2, alpha=1.0, seed=9, network_args={"split_qkv": "True"}, metadata={
        **FLUX_METADATA, "ss_network_args": json.dumps({"split_qkv": "True"}), "atelier_split_qkv_alpha": "x"})
    assert network.options.flux.split_qkv
    code, _ = run_json(capsys, "resize", source, "-o", small, "--rank", 2)
    assert code == 0
    _, metadata = read_network_file(small)
    assert "atelier_split_qkv_alpha" not in metadata and "split_qkv" not in metadata.get("ss_network_args", "")


# --- merge into a checkpoint ---------------------------------------------------------------------------------------


def test_merged_checkpoint_computes_the_lora_applied(dev, tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    make_lora(dev, lora, dim=4, alpha=2.0, seed=10)
    out, clip_out, t5_out = tmp_path / "merged.safetensors", tmp_path / "clip.safetensors", tmp_path / "t5.safetensors"
    code, report = run_json(capsys, "merge", f"{lora}:0.8", "-o", out, "--into-model", dev["model"],
                            "--clip-l", dev["clip_l"], "--clip-l-save-to", clip_out,
                            "--t5xxl", dev["t5xxl"], "--t5xxl-save-to", t5_out)
    assert code == 0 and report["family"] == "flux1", report
    assert report["components"] == {"clip-l": str(clip_out), "t5xxl": str(t5_out)}
    network, applied = loaded_network(dev, lora, dim=4, multiplier=0.8)
    network.apply_to()
    expected = outputs(*applied)
    merged = (flux_from_file(out), [load_clip_l(clip_out).eval(), load_t5xxl(t5_out).eval()])
    assert_close(outputs(*merged), expected)
    base_outputs = outputs(*models(dev))
    assert all(not torch.allclose(got, base) for got, base in zip(expected, base_outputs, strict=True))
    with safe_open(str(out), "pt") as merged_file, safe_open(str(dev["model"]), "pt") as base_file:
        assert set(merged_file.keys()) == set(base_file.keys())
        metadata = merged_file.metadata()
    assert metadata["modelspec.architecture"] == "flux-1-dev" and "modelspec.prediction_type" not in metadata
    assert metadata["modelspec.merged_from"] == f"{dev['model'].name}, style.safetensors:0.8"


def test_merge_into_a_prefixed_checkpoint_keeps_its_keys(dev, tmp_path, capsys):
    """ComfyUI's all-in-one files prefix the transformer with model.diffusion_model. (spec 1.2)."""
    prefixed = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{key}": value for key, value in load_file(str(dev["model"])).items()},
              str(prefixed))
    lora = tmp_path / "unet_only.safetensors"
    make_lora(dev, lora, dim=2, alpha=1.0, seed=11, text=False)
    transformer, encoders = models(dev)
    network = create_lora_network(transformer, encoders, "flux1", dim=2, alpha=1.0, train_text_encoder=False)
    network.load_kohya_state_dict(load_file(str(lora)))
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(capsys, "merge", lora, "-o", out, "--into-model", prefixed, "--save-precision", "bf16")
    assert code == 0, err
    network.apply_to()
    expected = transformer(**flux_inputs(transformer)).detach()
    merged = load_file(str(out))
    assert all(key.startswith("model.diffusion_model.") and value.dtype == torch.bfloat16
               for key, value in merged.items())
    got = flux_from_file(out, "model.diffusion_model.").float()
    assert torch.allclose(got(**flux_inputs(got)).detach(), expected, atol=0.05)  # bf16 weights


def test_merge_into_checkpoint_names_the_missing_text_encoder_option(dev, tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    make_lora(dev, lora, dim=2, alpha=1.0, seed=12)
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(capsys, "merge", lora, "-o", out, "--into-model", dev["model"])
    assert code == 2 and "CLIP-L module(s)" in err and "--clip-l" in err and "--clip-l-save-to" in err
    code, _, err = run_cli(capsys, "merge", lora, "-o", out, "--into-model", dev["model"], "--clip-l", dev["clip_l"],
                           "--t5xxl", dev["t5xxl"], "--t5xxl-save-to", tmp_path / "t5.safetensors")
    assert code == 2 and "give --clip-l-save-to too" in err
    assert not out.exists() and not (tmp_path / "t5.safetensors").exists()


def test_merge_into_checkpoint_never_overwrites(dev, tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    make_lora(dev, lora, dim=2, alpha=1.0, seed=13, text=False)
    code, _, err = run_cli(capsys, "merge", lora, "-o", dev["model"], "--into-model", dev["model"])
    assert code == 2 and "is one of the inputs" in err
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    code, _, err = run_cli(capsys, "merge", lora, "-o", existing, "--into-model", dev["model"])
    assert code == 2 and "already exists" in err and existing.read_bytes() == b"keep"
    code, _, err = run_cli(capsys, "merge", lora, "-o", tmp_path / "m.safetensors", "--into-model", dev["model"],
                           "--clip-l", dev["clip_l"], "--clip-l-save-to", dev["clip_l"])
    assert code == 2 and "is one of the inputs" in err


def test_merge_into_a_diffusers_folder_asks_for_the_bfl_file(dev, tmp_path, capsys):
    folder = write_tiny_diffusers(dev, tmp_path / "pipeline", "dev")
    lora = tmp_path / "style.safetensors"
    make_lora(dev, lora, dim=2, alpha=1.0, seed=16, text=False)
    code, _, err = run_cli(capsys, "merge", lora, "-o", tmp_path / "m.safetensors", "--into-model", folder)
    assert code == 2 and "is a folder" in err and "BFL transformer file" in err


def test_chroma_merge_refuses_clip_l_and_merges_t5(chroma, tmp_path, capsys):
    lora = tmp_path / "chroma.safetensors"
    make_lora(chroma, lora, dim=2, alpha=1.0, seed=14, family="chroma",
              metadata={"ss_base_model_version": "chroma", "ss_network_module": "networks.lora_flux"})
    out, t5_out = tmp_path / "merged.safetensors", tmp_path / "t5.safetensors"
    code, _, err = run_cli(capsys, "merge", lora, "-o", out, "--into-model", chroma["model"], "--clip-l",
                           chroma["clip_l"], "--clip-l-save-to", tmp_path / "clip.safetensors")
    assert code == 2 and "a chroma model has no such text encoder" in err
    code, report = run_json(capsys, "merge", lora, "-o", out, "--into-model", chroma["model"],
                            "--t5xxl", chroma["t5xxl"], "--t5xxl-save-to", t5_out)
    assert code == 0 and report["family"] == "chroma" and set(report["loras"][0]["modules"]) == {"double", "single",
                                                                                                 "te3"}
    network, applied = loaded_network(chroma, lora, dim=2, chroma_model=True)
    network.apply_to()
    assert_close(outputs(flux_from_file(out), [load_t5xxl(t5_out).eval()]), outputs(*applied))
    with safe_open(str(out), "pt") as merged:
        assert merged.metadata()["modelspec.architecture"] == "chroma"


# --- extract -------------------------------------------------------------------------------------------------------


def test_extract_recovers_a_known_low_rank_change(dev, tmp_path, capsys):
    base_state = load_file(str(dev["model"]))
    transformer, encoders = models(dev)
    targets = unet_targets(transformer, "flux1", include_conv_blocks=False)
    paths = {id(module): path for path, module in transformer.named_modules()}
    generator = torch.Generator().manual_seed(15)
    tuned_state, known = dict(base_state), {}
    for target in targets:
        key = f"{paths[id(target.module)]}.weight"
        out_features, in_features = base_state[key].shape
        change = torch.randn(out_features, 2, generator=generator) @ torch.randn(2, in_features, generator=generator)
        known[target.name] = change * 0.01
        tuned_state[key] = base_state[key] + known[target.name]
    tuned = tmp_path / "tuned.safetensors"
    save_file(tuned_state, str(tuned))
    out = tmp_path / "extracted.safetensors"
    code, report = run_json(capsys, "extract", "--base", dev["model"], "--tuned", tuned, "-o", out, "--dim", 4)
    assert code == 0 and report["family"] == "flux1" and report["modules"] == {"double": 20, "single": 6}
    assert report["retained"]["min"] == pytest.approx(1.0, abs=1e-6)
    extracted = deltas(out)
    assert extracted.keys() == known.keys()
    for name, change in known.items():
        assert torch.allclose(extracted[name], change, atol=1e-6), name
    network = create_lora_network(transformer, encoders, "flux1", dim=4, alpha=4.0, train_text_encoder=False)
    network.load_kohya_state_dict(load_file(str(out)))
    network.apply_to()
    expected = flux_from_file(tuned)
    assert torch.allclose(transformer(**flux_inputs(transformer)), expected(**flux_inputs(expected)), atol=1e-5)
    _, metadata = read_network_file(out)
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora" and metadata["ss_network_dim"] == "4"
    # sd-scripts' --clamp_quantile: up and down clipped at the 0.99 quantile of their values together
    plain, clamped = tmp_path / "plain.safetensors", tmp_path / "clamped.safetensors"
    assert run_json(capsys, "extract", "--base", dev["model"], "--tuned", tuned, "-o", plain, "--rank", 2)[0] == 0
    code, _ = run_json(capsys, "extract", "--base", dev["model"], "--tuned", tuned, "-o", clamped, "--rank", 2,
                       "--clamp-quantile", 0.99)
    assert code == 0
    unclipped, clipped = read_network_file(plain)[0], read_network_file(clamped)[0]
    for name in known:
        up, down = (unclipped[f"{name}.lora_{part}.weight"] for part in ("up", "down"))
        high = float(torch.quantile(torch.cat([up.flatten(), down.flatten()]).double(), 0.99))
        assert torch.allclose(clipped[f"{name}.lora_up.weight"], up.clamp(-high, high))
        assert torch.allclose(clipped[f"{name}.lora_down.weight"], down.clamp(-high, high))


def test_extract_refuses_models_of_two_families(dev, chroma, tmp_path, capsys):
    code, _, err = run_cli(capsys, "extract", "--base", dev["model"], "--tuned", chroma["model"], "-o",
                           tmp_path / "x.safetensors", "--rank", 2)
    assert code == 2 and "extract needs two models of one family" in err
