"""The LoRA tools (`python -m engine lora inspect|merge|resize|extract`) on the tiny SD1 model.

Results are checked against the maths, not against earlier runs: a merged model must compute what the base model
computes with the LoRA applied through ``create_lora_network``; a merged, resized or extracted LoRA must change the
outputs exactly as its sources do (or keep the fraction of each change the SVD says it keeps); and diffusers'
``load_lora_weights`` must read an extracted file into the same outputs as the fine-tuned model.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UNet2DConditionModel
from lora_cli import run_cli, run_json
from safetensors.torch import load_file, save_file
from torch import nn

from engine.models.loading import load_model
from engine.models.text_encoders import load_text_encoders
from engine.networks.lora import LoRANetwork, create_lora_network
from engine.networks.network_file import read_network_file, save_network_file
from engine.rundir.event_reader import read_events

TAGS = {"10_sks dog": {"sks": 5, "dog": 5, "grass": 2}, "1_dog": {"dog": 3, "sky": 1}}
# (dim, alpha, conv_dim, conv_alpha, seed) of the two LoRAs the tests make.
LORA_A = (4, 2.0, 2, 1.0, 1)
LORA_B = (2, 1.0, 1, 0.5, 2)


# --- helpers -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tiny_models) -> tuple[UNet2DConditionModel, list[nn.Module]]:
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd1"], subfolder="unet").eval()
    return unet, load_text_encoders(tiny_models["sd1"]).encoders


def fresh(sd1) -> tuple[UNet2DConditionModel, list[nn.Module]]:
    return copy.deepcopy(sd1)


def make_lora(sd1, path: Path, spec: tuple, **metadata: str) -> LoRANetwork:
    """A LoCon with random lora_up (a trained-looking file) saved with kohya keys and ss_* metadata."""
    dim, alpha, conv_dim, conv_alpha, seed = spec
    unet, encoders = fresh(sd1)
    network = create_lora_network(unet, encoders, "sd1", dim=dim, alpha=alpha, conv_dim=conv_dim,
                                  conv_alpha=conv_alpha)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.3)
    base = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": f"{alpha:g}",
            "ss_base_model_version": "sd_v1", "ss_output_name": path.stem, "ss_steps": "120", "ss_epoch": "3",
            "ss_learning_rate": "0.0001", "ss_optimizer": "torch.optim.AdamW(weight_decay=0.01)",
            "ss_tag_frequency": json.dumps(TAGS),
            "ss_dataset_dirs": json.dumps({"10_sks dog": {"n_repeats": 10, "img_count": 5}}),
            "modelspec.title": f"{path.stem} title"}
    save_network_file(path, network.kohya_state_dict(), {**base, **metadata}, save_as="safetensors")
    return network


@pytest.fixture(scope="module")
def loras(sd1, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    paths = {"a": folder / "a.safetensors", "b": folder / "b.safetensors"}
    make_lora(sd1, paths["a"], LORA_A)
    make_lora(sd1, paths["b"], LORA_B)
    return paths


def unet_inputs(unet: UNet2DConditionModel) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    args = (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 5, config.cross_attention_dim, generator=generator))
    if config.addition_embed_type != "text_time":
        return args, {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim  # SDXL
    return args, {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=generator),
                                        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)}}


TOKENS = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(5))


def outputs(unet: UNet2DConditionModel, encoders: list[nn.Module]) -> tuple[torch.Tensor, ...]:
    """The UNet's output and each text encoder's last hidden state, on fixed inputs."""
    args, kwargs = unet_inputs(unet)
    with torch.no_grad():
        return unet(*args, **kwargs).sample, *(encoder(TOKENS).last_hidden_state for encoder in encoders)


def with_loras(sd1, files: list[tuple[Path, tuple[int, int], float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the base model with each file applied through create_lora_network: (path, (dim, conv_dim), ratio)."""
    unet, encoders = fresh(sd1)
    for path, (dim, conv_dim), ratio in files:
        network = create_lora_network(unet, encoders, "sd1", dim=dim, alpha=1, conv_dim=conv_dim, multiplier=ratio)
        network.load_kohya_state_dict(read_network_file(path)[0])
        network.apply_to()
    return outputs(unet, encoders)


def assert_close(ours: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...], tolerance: float) -> None:
    for mine, theirs in zip(ours, reference, strict=True):
        assert (mine - theirs).abs().max() <= tolerance


def spec_delta(network: LoRANetwork) -> dict[str, torch.Tensor]:
    """Each module's change by spec §5.2's formulas (3x3 conv through conv2d), not the tools' flattened product."""
    deltas = {}
    for lora in network.all_loras():
        down, up = lora.lora_down.weight.detach(), lora.lora_up.weight.detach()
        if down.dim() == 4 and down.shape[2:] != (1, 1):
            delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        elif down.dim() == 4:
            delta = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            delta = up @ down
        deltas[lora.lora_name] = delta * lora.scale
    return deltas


def file_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each module's alpha/rank * up @ down from a saved file, through a network built from its shapes."""
    tensors = load_file(str(path))
    deltas = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up, alpha = tensors[f"{name}.lora_up.weight"], float(tensors[f"{name}.alpha"])
            deltas[name] = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * alpha / len(down)
    return deltas


# --- inspect -----------------------------------------------------------------------------------------------------


def test_inspect_reports_counts_ranks_alphas_metadata_and_norms(sd1, tmp_path, capsys):
    path = tmp_path / "made.safetensors"
    network = make_lora(sd1, path, LORA_A)
    code, report = run_json(capsys, "inspect", path)
    assert code == 0 and report["ok"] and report["format"] == "kohya LoCon"
    counts = network.module_count()
    assert report["modules"] == {"unet": counts["unet"], "te": counts["text_encoder"]}
    conv = [lora for lora in network.all_loras() if lora.lora_down.weight.dim() == 4
            and lora.lora_down.weight.shape[2:] != (1, 1)]
    linear = len(network.all_loras()) - len(conv)
    assert report["ranks"] == {"4": linear, "2": len(conv)} and report["conv_ranks"] == {"2": len(conv)}
    assert report["alphas"] == {"2": linear, "1": len(conv)} and report["conv_modules"] == len(conv)
    assert report["base_model"].startswith("sd_v1")
    assert report["training"]["ss_steps"] == "120" and report["training"]["modelspec.title"] == "made title"
    assert report["top_tags"] == [["dog", 8], ["sks", 5], ["grass", 2], ["sky", 1]]
    assert report["dataset_dirs"] == {"10_sks dog": {"n_repeats": 10, "img_count": 5}}
    norms = {name: float(delta.norm()) for name, delta in spec_delta(network).items()}
    assert report["norms"]["min"] == pytest.approx(min(norms.values()), rel=1e-5)
    assert report["norms"]["max"] == pytest.approx(max(norms.values()), rel=1e-5)
    assert report["norms"]["median"] == pytest.approx(sorted(norms.values())[len(norms) // 2], rel=1e-5)
    assert report["norms"]["max_module"] == max(norms, key=norms.get)
    assert report["unknown_keys"] == [] and report["errors"] == []

    code, text, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "format: kohya LoCon" in text and f"(unet {counts['unet']}, te" in text


def test_inspect_names_the_module_with_nan_and_exits_2(loras, tmp_path, capsys):
    tensors, metadata = read_network_file(loras["a"])
    broken = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    tensors[f"{broken}.lora_up.weight"][0, 0] = float("nan")
    tensors["lora_unet_stray.weight"] = torch.ones(2)
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path), metadata)
    code, text, _ = run_cli(capsys, "inspect", path)
    assert code == 2 and broken in text and "NaN or inf" in text
    code, report = run_json(capsys, "inspect", path)
    assert code == 2 and not report["ok"] and report["unknown_keys"] == ["lora_unet_stray.weight"]
    assert [error for error in report["errors"] if broken in error]
    # The tools that change files refuse it, naming the module.
    code, _, err = run_cli(capsys, "resize", path, "-o", tmp_path / "out.safetensors", "--rank", 2)
    assert code == 2 and broken in err and not (tmp_path / "out.safetensors").exists()


def test_inspect_rejects_a_random_safetensors_file(tmp_path, capsys):
    path = tmp_path / "random.safetensors"
    save_file({"model.layer.weight": torch.randn(4, 4), "other": torch.randn(3)}, str(path))
    code, report = run_json(capsys, "inspect", path)
    assert code == 2 and report["format"] == "unknown" and report["errors"]


def test_inspect_knows_lycoris_and_embeddings(tmp_path, capsys):
    loha = {f"lora_unet_mid_block_attentions_0_proj_in.{part}": torch.randn(shape) for part, shape in
            (("hada_w1_a", (8, 3)), ("hada_w1_b", (3, 8)), ("hada_w2_a", (8, 3)), ("hada_w2_b", (3, 8)))}
    loha["lora_unet_mid_block_attentions_0_proj_in.alpha"] = torch.tensor(1.5)
    save_file(loha, str(tmp_path / "loha.safetensors"))
    code, report = run_json(capsys, "inspect", tmp_path / "loha.safetensors")
    assert code == 0 and report["format"] == "LyCORIS LoHa"
    assert report["modules"] == {"unet": 1} and report["ranks"] == {"3": 1} and report["alphas"] == {"1.5": 1}
    save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "ti.safetensors"))
    code, report = run_json(capsys, "inspect", tmp_path / "ti.safetensors")
    assert code == 0 and report["format"] == "Textual Inversion" and report["embedding"] == {"emb_params": [2, 768]}
    assert report["base_model"].startswith("sd_v1")


# --- merge -------------------------------------------------------------------------------------------------------


def test_merge_into_a_single_file_model_equals_the_lora_applied(sd1, loras, tiny_models, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    code, report = run_json(capsys, "merge", "--into-model", tiny_models["sd1_ckpt"], "-o", out, f"{loras['a']}:0.7")
    assert code == 0 and report["family"] == "sd1" and out.is_file()
    assert report["loras"][0]["ratio"] == 0.7 and set(report["loras"][0]["modules"]) == {"unet", "te"}
    merged = load_model(out)
    ours = outputs(merged.unet, merged.text.encoders)
    reference = with_loras(sd1, [(loras["a"], (4, 2), 0.7)])
    unet, encoders = fresh(sd1)
    base = outputs(unet, encoders)
    assert all((mine - plain).abs().max() > 0.01 for mine, plain in zip(ours, base, strict=True))
    assert_close(ours, reference, 1e-5)
    metadata = read_network_file(out)[1]
    assert metadata["modelspec.merged_from"] == f"{Path(tiny_models['sd1_ckpt']).name}, a.safetensors:0.7"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_merge_into_a_diffusers_folder_keeps_family_and_prediction(tiny_models, tmp_path, capsys, family):
    unet = UNet2DConditionModel.from_pretrained(tiny_models[family], subfolder="unet").eval()
    encoders = load_text_encoders(tiny_models[family]).encoders
    network = create_lora_network(unet, encoders, family, dim=4, alpha=2, conv_dim=2, conv_alpha=1, multiplier=0.6)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lora in network.all_loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.3)
    path = save_network_file(tmp_path / "lora.safetensors", network.kohya_state_dict(), {}, save_as="safetensors")
    out = tmp_path / "merged.safetensors"
    assert run_cli(capsys, "merge", "--into-model", tiny_models[family], "-o", out, f"{path}:0.6")[0] == 0
    merged = load_model(out)
    scheduler = json.loads((Path(tiny_models[family]) / "scheduler" / "scheduler_config.json").read_text())
    assert merged.family == family
    assert merged.scheduler_config["prediction_type"] == scheduler["prediction_type"]
    network.apply_to()
    assert_close(outputs(merged.unet, merged.text.encoders), outputs(unet, encoders), 1e-5)


def test_merge_two_loras_equals_both_applied_then_inspect(sd1, loras, tmp_path, capsys):
    out = tmp_path / "ab.safetensors"
    code, report = run_json(capsys, "merge", "-o", out, f"{loras['a']}:0.8", f"{loras['b']}:-0.5")
    assert code == 0 and report["method"] == "concatenate"
    combined = with_loras(sd1, [(out, (6, 3), 1.0)])  # ranks add up: 4 + 2, and 2 + 1 for 3x3 convs
    both = with_loras(sd1, [(loras["a"], (4, 2), 0.8), (loras["b"], (2, 1), -0.5)])
    assert_close(combined, both, 1e-5)

    code, inspected = run_json(capsys, "inspect", out)
    assert code == 0 and inspected["format"] == "kohya LoCon" and set(inspected["ranks"]) == {"6", "3"}
    assert set(inspected["alphas"]) == {"6", "3"}  # alpha = rank: the ratios and scales are in lora_up
    merged_from = inspected["training"]["modelspec.merged_from"]
    assert merged_from == "a.safetensors:0.8, b.safetensors:-0.5"
    assert inspected["base_model"].startswith("sd_v1")

    # --svd at the concatenated rank is the same change, re-factored.
    svd_out = tmp_path / "ab-svd.safetensors"
    code, report = run_json(capsys, "merge", "-o", svd_out, "--svd", 6, "--conv-rank", 3, f"{loras['a']}:0.8",
                            f"{loras['b']}:-0.5")
    assert code == 0 and report["method"] == "svd" and report["retained"]["min"] == pytest.approx(1.0)
    assert_close(with_loras(sd1, [(svd_out, (6, 3), 1.0)]), both, 1e-5)


# --- resize ------------------------------------------------------------------------------------------------------


def test_resize_to_full_rank_reproduces_the_outputs(sd1, loras, tmp_path, capsys):
    out = tmp_path / "full.safetensors"
    code, report = run_json(capsys, "resize", loras["a"], "-o", out, "--rank", 4, "--conv-rank", 2)
    assert code == 0 and report["retained"]["min"] == pytest.approx(1.0)
    assert_close(with_loras(sd1, [(out, (4, 2), 1.0)]), with_loras(sd1, [(loras["a"], (4, 2), 1.0)]), 1e-5)
    metadata = read_network_file(out)[1]
    assert metadata["ss_output_name"] == "a" and metadata["ss_steps"] == "120"  # the training record is kept
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}


def test_resize_to_a_lower_rank_reports_the_kept_fraction(loras, tmp_path, capsys):
    out = tmp_path / "low.safetensors"
    code, report = run_json(capsys, "resize", loras["a"], "-o", out, "--rank", 2, "--conv-rank", 1)
    assert code == 0
    before, after = file_deltas(loras["a"]), file_deltas(out)
    kept = {}
    for name, delta in before.items():
        values = torch.linalg.svdvals(delta.flatten(1).double())
        rank = 1 if delta.dim() == 4 and delta.shape[2:] != (1, 1) else 2
        kept[name] = math.sqrt(float(values[:rank].square().sum() / values.square().sum()))
        # The best rank-r approximation (Eckart-Young): the remaining error holds the cut singular values.
        error = float((delta - after[name]).double().norm())
        assert error == pytest.approx(float(values[rank:].square().sum().sqrt()), rel=1e-4, abs=1e-7)
    assert report["retained"]["min"] == pytest.approx(min(kept.values()), rel=1e-5)
    assert report["retained"]["mean"] == pytest.approx(sum(kept.values()) / len(kept), rel=1e-5)
    assert report["retained"]["min"] < 1

    code, inspected = run_json(capsys, "inspect", out)
    assert code == 0 and set(inspected["ranks"]) == {"2", "1"}
    # Each module keeps its scale (alpha/rank): alpha 2 at rank 4 becomes alpha 1 at rank 2.
    assert set(inspected["alphas"]) == {"1", "0.5"}
    assert inspected["training"]["ss_network_dim"] == "2" and "resized" in inspected["training"]["ss_training_comment"]

    code, report = run_json(capsys, "resize", loras["a"], "-o", tmp_path / "fro.safetensors", "--sv-fro", 0.9)
    assert code == 0 and report["retained"]["min"] >= 0.9


# --- extract -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_extract_reproduces_a_merged_lora_and_loads_in_diffusers(sd1, loras, tiny_models, tmp_path, capsys):
    tuned = tmp_path / "tuned.safetensors"
    assert run_cli(capsys, "merge", "--into-model", tiny_models["sd1_ckpt"], "-o", tuned, f"{loras['a']}:0.7")[0] == 0
    out = tmp_path / "extracted.safetensors"
    code, report = run_json(capsys, "extract", "--base", tiny_models["sd1"], "--tuned", tuned, "-o", out,
                            "--rank", 4, "--conv-rank", 2)
    assert code == 0 and report["skipped"] == {} and report["retained"]["min"] == pytest.approx(1.0, abs=1e-4)

    network = create_lora_network(*fresh(sd1), "sd1", dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    network.load_kohya_state_dict(read_network_file(loras["a"])[0])
    expected, extracted = spec_delta(network), file_deltas(out)
    assert set(extracted) == set(expected)  # the same modules create_lora_network targets
    for name, delta in expected.items():
        assert (extracted[name] - 0.7 * delta).abs().max() <= 1e-5, name
    metadata = read_network_file(out)[1]
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_dim"] == "4" and json.loads(metadata["ss_network_args"])["conv_dim"] == "2"

    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd1"])
    pipe.load_lora_weights(str(out))
    merged = load_model(tuned)
    assert_close(outputs(pipe.unet, [pipe.text_encoder]), outputs(merged.unet, merged.text.encoders), 1e-5)


def test_extract_leaves_out_an_unchanged_text_encoder(tiny_models, tmp_path, capsys):
    out = tmp_path / "none.safetensors"
    code, report = run_json(capsys, "extract", "--base", tiny_models["sd1"], "--tuned", tiny_models["sd1_ckpt"],
                            "-o", out, "--rank", 2)
    assert code == 0 and set(report["skipped"]) == {"te"} and set(report["modules"]) == {"unet"}
    assert all(not delta.any() for delta in file_deltas(out).values())  # identical models: nothing to extract


# --- refusals ----------------------------------------------------------------------------------------------------


def test_tools_refuse_to_overwrite_and_name_the_file(loras, tiny_models, tmp_path, capsys):
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    commands = [
        ("resize", loras["a"], "-o", existing, "--rank", 2),
        ("merge", "-o", existing, loras["a"], loras["b"]),
        ("merge", "--into-model", tiny_models["sd1_ckpt"], "-o", existing, loras["a"]),
        ("extract", "--base", tiny_models["sd1"], "--tuned", tiny_models["sd1_ckpt"], "-o", existing, "--rank", 2),
    ]
    for command in commands:
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and str(existing) in err and "already exists" in err, command
    assert existing.read_bytes() == b"keep me"
    before = loras["a"].read_bytes()
    code, _, err = run_cli(capsys, "resize", loras["a"], "-o", loras["a"], "--rank", 2)
    assert code == 2 and "is one of the inputs" in err and loras["a"].read_bytes() == before


def test_each_tool_reports_in_its_done_event(loras, tmp_path, capsys):
    """With --events the report is the `done` event's fields (what the GUI reads), the same as the JSON printed."""
    events = tmp_path / "events.jsonl"
    out = tmp_path / "small.safetensors"
    code, printed = run_json(capsys, "resize", loras["a"], "-o", out, "--rank", 2, "--events", events)
    assert code == 0 and out.is_file()
    start, done = read_events(events)
    assert start["type"] == "start" and (start["task"], start["tool"]) == ("lora", "resize")
    assert done["type"] == "done" and (done["task"], done["tool"], done["ok"]) == ("lora", "resize", True)
    assert {key: value for key, value in done.items() if key not in ("type", "time", "task", "tool")} == printed
    assert done["output"] == str(out) and done["ranks_after"]

    # A refusal: an `error` event with the engine's message, and a `done` without a report that repeats it.
    code, _, err = run_cli(capsys, "inspect", tmp_path / "missing.safetensors", "--events", events)
    error, done = read_events(events)[-2:]
    assert code == 2 and error["type"] == "error" and error["message"] in err
    assert done == {**done, "task": "lora", "tool": "inspect", "ok": False, "error": error["message"]}


def test_merge_refuses_loras_of_different_base_models(sd1, loras, tmp_path, capsys):
    other = tmp_path / "sd2-ish.safetensors"
    make_lora(sd1, other, LORA_B, ss_base_model_version="sd_v2")
    code, _, err = run_cli(capsys, "merge", "-o", tmp_path / "out.safetensors", loras["a"], other)
    assert code == 2 and "sd2-ish.safetensors is sd_v2" in err and not (tmp_path / "out.safetensors").exists()


def test_tools_refuse_what_they_cannot_change_faithfully(loras, tiny_models, tmp_path, capsys):
    tensors, metadata = read_network_file(loras["a"])
    tensors["lora_unet_mid_block_attentions_0_proj_in.dora_scale"] = torch.ones(1, 8)
    dora = tmp_path / "dora.safetensors"
    save_file(tensors, str(dora), metadata)
    code, _, err = run_cli(capsys, "merge", "-o", tmp_path / "out.safetensors", dora)
    assert code == 2 and "dora_scale" in err and "not plain kohya LoRA weights" in err
    code, _, err = run_cli(capsys, "resize", tiny_models["sd1_ckpt"], "-o", tmp_path / "out.safetensors", "--rank", 2)
    assert code == 2 and "whole SD1.x model checkpoint" in err
    assert not (tmp_path / "out.safetensors").exists()
