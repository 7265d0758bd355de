"""`python -m engine lora convert`: FLUX.1 and SD3 LoRAs between kohya's names and diffusers' (PEFT) names.

Checked by what diffusers computes with the converted files: a kohya LoRA made by our network code on the tiny
FLUX.1 / SD3 / SD3.5 models, converted to diffusers names, loads into diffusers' own pipelines and transformers
(``FluxPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights``, ``load_lora_adapter``) with no LoRA warning, and
their transformer (and CLIP) outputs equal the engine's with the LoRA applied (<= 1e-5). Back to kohya, every module
changes its layer as before (round trip); a file in the format of diffusers' training scripts (PEFT LoraConfig with
its own alpha, q/k/v with different A) converts to kohya names whose merged weights compute what diffusers computes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402
from flux_tiny import tiny_flux_files  # noqa: E402
from lora_cli import run_cli, run_json  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from sd3_tiny import tiny_clip_g, tiny_clip_l, tiny_mmdit, tiny_sd3_files, tiny_t5, write_tiny_sd3_diffusers  # noqa: E402

from engine.networks.lora import LoRANetwork, create_lora_network  # noqa: E402
from engine.networks.network_file import save_network_file  # noqa: E402
from engine.networks.tools.convert_lora import CONVERSION_KEY  # noqa: E402
from engine.networks.tools.lora_file import LoRAWeights, parse_kohya  # noqa: E402

RANK, ALPHA = 4, 3.0  # scale 0.75: not a power of two, so the baked-in scale is really checked
FLUX_METADATA = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                 "modelspec.architecture": "flux-1-dev/lora", "ss_output_name": "tiny-flux-style"}
SD3_ARGS = {"emb_dims": "[4,4,4,4,4,4]", "train_t5xxl": "True"}
TOLERANCE = 1e-5
LOADER_LOGGERS = ("diffusers", "peft", "transformers")


# --- helpers -------------------------------------------------------------------------------------------------------


def randomize(network: LoRANetwork, seed: int = 1) -> None:
    """Non-zero lora_up weights, as after training (a fresh network changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def save_kohya(network: LoRANetwork, path: Path, metadata: dict[str, str]) -> Path:
    return save_network_file(path, network.kohya_state_dict(), metadata, save_as="safetensors")


def kohya_modules(path: Path) -> dict[str, LoRAWeights]:
    modules, unknown, problems = parse_kohya(load_file(str(path)))
    assert not unknown and not problems
    return modules


def file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


@contextmanager
def loader_messages() -> Iterator[list[str]]:
    """Every warning diffusers, PEFT and transformers log or raise meanwhile (diffusers' loggers do not
    propagate, so a handler goes on each)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in LOADER_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(item.message) for item in caught]
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def lora_warnings(messages: list[str]) -> list[str]:
    """The messages about the LoRA's keys (unexpected, missing or unloaded ones)."""
    words = ("lora", "adapter", "keys", "unexpected", "missing")
    return [message for message in messages if any(word in message.lower() for word in words)]


def assert_same_effect(before: dict[str, LoRAWeights], after: dict[str, LoRAWeights]) -> None:
    """Each module changes its layer by the same alpha/rank * up @ down (its rank may differ)."""
    assert sorted(before) == sorted(after)
    for name, weights in before.items():
        assert (weights.delta() - after[name].delta()).abs().max() <= 1e-6, name


# --- FLUX.1 --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux() -> dict[str, Any]:
    """The tiny FLUX.1 dev model as the engine loads it, copies of its text encoders for diffusers (PEFT wraps the
    layers it loads into), and fixed transformer inputs."""
    from engine.models.loading import load_model
    from engine.train import flow

    files = tiny_flux_files("dev")
    model = load_model(files["model"], family="flux1", clip_l=files["clip_l"], t5xxl=files["t5xxl"], ae=files["ae"],
                       tokenizer_cache_dir=files["t5_tokenizer"])
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    inputs = {"img": flow.pack_latents(latents), "img_ids": flow.image_ids(2, (8, 8)),
              "txt": torch.randn(2, 8, 32, generator=generator), "txt_ids": flow.text_ids(2, 8),
              "timesteps": torch.tensor([0.3, 0.9]), "y": torch.randn(2, 32, generator=generator),
              "guidance": torch.tensor([3.5, 3.5])}
    return {"files": files, "model": model, "inputs": inputs}


def flux_network(model: Any, **args: str) -> LoRANetwork:
    """A FLUX.1 LoRA on everything our code trains: double and single blocks, in_dims layers, CLIP-L and T5."""
    network = create_lora_network(model.unet, list(model.text.encoders), "flux1", dim=RANK, alpha=ALPHA,
                                  network_args={"train_t5xxl": "True", "in_dims": "[4,4,4,4,4]", **args})
    randomize(network)
    return network


def engine_flux_output(transformer: Any, network: LoRANetwork | None, inputs: dict[str, torch.Tensor]
                       ) -> torch.Tensor:
    if network is not None:
        network.apply_to()
    try:
        with torch.no_grad():
            return transformer(**inputs)
    finally:
        if network is not None:
            network.restore()


def diffusers_flux_output(transformer: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                           pooled_projections=inputs["y"], timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0],
                           txt_ids=inputs["txt_ids"][0], guidance=inputs["guidance"]).sample


def flux_pipeline(model: Any) -> Any:
    """diffusers' FluxPipeline holding the same weights as the engine's model (copies: PEFT wraps layers)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from engine.train.method_full_flux import diffusers_transformer

    transformer = diffusers_transformer(copy.deepcopy(model.unet), None)
    clip, t5 = (copy.deepcopy(encoder) for encoder in model.text.encoders)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=model.vae.vae, text_encoder=clip,
                        tokenizer=model.text.tokenizers[0], text_encoder_2=t5, tokenizer_2=model.text.tokenizers[1],
                        transformer=transformer)


def test_flux_lora_in_diffusers_names_loads_in_flux_pipeline_with_the_engines_output(flux, tmp_path, capsys):
    model, inputs = flux["model"], flux["inputs"]
    network = flux_network(model)
    kohya = save_kohya(network, tmp_path / "style.safetensors", FLUX_METADATA)
    code, report = run_json(capsys, "convert", kohya, "--to", "diffusers")
    assert code == 0, report
    converted = tmp_path / "style_diffusers.safetensors"
    assert report["output"] == str(converted) and report["family"] == "flux1"
    t5_modules = sum(1 for name in kohya_modules(kohya) if name.startswith("lora_te3_"))
    assert t5_modules > 0 and report["dropped"] == {"lora_te3": t5_modules}
    assert "diffusers loads no LoRA into T5" in report["notes"][0]
    keys = load_file(str(converted))
    assert keys and all(key.startswith(("transformer.", "text_encoder.")) for key in keys)
    assert all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys)
    metadata = file_metadata(converted)
    assert metadata["ss_output_name"] == "tiny-flux-style"  # training records kept
    assert json.loads(metadata[CONVERSION_KEY])["dropped"] == {"lora_te3": t5_modules}

    pipe = flux_pipeline(model)
    with loader_messages() as messages:
        pipe.load_lora_weights(str(converted))
    assert not lora_warnings(messages), messages
    ours = engine_flux_output(model.unet, network, inputs)
    theirs = diffusers_flux_output(pipe.transformer, inputs)
    assert (ours - theirs).abs().max() <= TOLERANCE
    assert (ours - engine_flux_output(model.unet, None, inputs)).abs().max() > 1e-3  # the LoRA changes the output

    tokens = pipe.tokenizer(["sks dog", "a red square"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    network.apply_to()
    try:
        with torch.no_grad():
            ours_pooled = model.text.encoders[0](tokens).pooler_output
    finally:
        network.restore()
    with torch.no_grad():
        theirs_pooled = pipe.text_encoder(tokens).pooler_output
    assert (ours_pooled - theirs_pooled).abs().max() <= TOLERANCE  # CLIP-L's LoRA loaded as well


def test_flux_split_qkv_lora_converts_exactly_both_ways(flux, tmp_path):
    """split_qkv files (block-diagonal lora_up, spec §5.3): each q/k/v/MLP part gets its own rank block in
    diffusers names; back in kohya names every module changes its layer as before."""
    from engine.networks.tools.convert_lora import convert_lora
    from engine.train.method_full_flux import diffusers_transformer

    model, inputs = flux["model"], flux["inputs"]
    network = flux_network(model, split_qkv="True")
    kohya = save_kohya(network, tmp_path / "split.safetensors", FLUX_METADATA)
    diffusers_file = Path(convert_lora(kohya, "diffusers").output)
    tensors = load_file(str(diffusers_file))
    assert {tensor.shape[0] for key, tensor in tensors.items() if key.endswith("lora_A.weight")} == {RANK}
    transformer = diffusers_transformer(copy.deepcopy(model.unet), None)
    with loader_messages() as messages:
        transformer.load_lora_adapter(str(diffusers_file), prefix="transformer")
    assert not lora_warnings(messages), messages
    ours = engine_flux_output(model.unet, network, inputs)
    assert (ours - diffusers_flux_output(transformer, inputs)).abs().max() <= TOLERANCE

    report = convert_lora(diffusers_file, "kohya")
    back = Path(report.output)
    assert back == tmp_path / "split_diffusers_kohya.safetensors" and report.family == "flux1"
    before = {name: weights for name, weights in kohya_modules(kohya).items() if not name.startswith("lora_te3_")}
    after = kohya_modules(back)
    assert_same_effect(before, after)
    assert {after[name].rank for name in after if name.endswith(("_qkv", "_linear1"))} == {3 * RANK, 4 * RANK}
    assert file_metadata(back)["ss_network_module"] == "networks.lora_flux"


@pytest.mark.parametrize("alpha", [2.0, ALPHA])
def test_chroma_bf16_lora_converts_exactly(flux, tmp_path, alpha):
    """Chroma (BFL names, no modulation layers, a T5-only text side) in bf16: ChromaTransformer2DModel computes what
    the engine computes with the same bf16 LoRA. Scale 0.5 bakes into bf16 exactly, so the file stays bf16; 0.75
    would round, so those modules are written in float32 and the report says so."""
    from flux_tiny import tiny_transformer

    from engine.networks.tools.convert_lora import convert_lora
    from engine.train.method_full_flux import diffusers_transformer

    chroma = tiny_transformer("chroma")
    for parameter in chroma.parameters():
        parameter.requires_grad_(False)
    network = create_lora_network(chroma, [torch.nn.Module()], "chroma", dim=RANK, alpha=alpha,
                                  train_text_encoder=False)
    randomize(network)
    kohya = save_network_file(tmp_path / "chroma.safetensors", network.kohya_state_dict(torch.bfloat16),
                              {"ss_base_model_version": "chroma"}, save_as="safetensors")
    network.load_kohya_state_dict(load_file(str(kohya)))  # the engine applies what the file holds (bf16-rounded)
    report = convert_lora(kohya, "diffusers")
    assert report.family == "chroma"
    exact_in_bf16 = alpha / RANK == 0.5
    dtypes = {tensor.dtype for tensor in load_file(report.output).values()}
    assert dtypes == ({torch.bfloat16} if exact_in_bf16 else {torch.float32})
    assert report.widened == (0 if exact_in_bf16 else len(network.unet_loras))
    assert exact_in_bf16 or "written in float32, not bfloat16" in report.warnings[0]
    transformer = diffusers_transformer(copy.deepcopy(chroma), None)
    with loader_messages() as messages:
        transformer.load_lora_adapter(report.output, prefix="transformer")
    assert not lora_warnings(messages), messages
    inputs = {key: value for key, value in flux["inputs"].items() if key not in ("y", "guidance")}
    ours = engine_flux_output(chroma, network, inputs)
    with torch.no_grad():
        theirs = transformer(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                             timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0],
                             txt_ids=inputs["txt_ids"][0]).sample
    assert (ours - theirs).abs().max() <= TOLERANCE
    assert_same_effect(kohya_modules(kohya), kohya_modules(Path(convert_lora(report.output, "kohya").output)))


# --- SD3 / SD3.5 ---------------------------------------------------------------------------------------------------


def sd3_inputs(params: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"x": torch.randn(2, 16, 8, 8, generator=generator), "t": torch.tensor([300.0, 800.0]),
            "y": torch.randn(2, params.adm_in_channels, generator=generator),
            "context": torch.randn(2, 6, params.context_in_dim, generator=generator)}


def engine_sd3_output(mmdit: Any, network: LoRANetwork | None, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if network is not None:
        network.apply_to()
    try:
        with torch.no_grad():
            return mmdit(**inputs)
    finally:
        if network is not None:
            network.restore()


def diffusers_sd3_output(transformer: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"],
                           pooled_projections=inputs["y"], timestep=inputs["t"]).sample


def sd3_transformer(mmdit: Any) -> Any:
    """diffusers' SD3Transformer2DModel with the MMDiT's weights (engine.models.sd3.convert)."""
    from diffusers import SD3Transformer2DModel

    from engine.models.sd3.convert import diffusers_config, sai_to_diffusers

    transformer = SD3Transformer2DModel(**diffusers_config(mmdit.params))
    state, unused = sai_to_diffusers(mmdit.state_dict())
    assert not unused
    transformer.load_state_dict(state, strict=True)
    return transformer.eval()


def sd3_network(mmdit: Any, encoders: list[Any], **args: str) -> LoRANetwork:
    """An SD3 LoRA on every joint-block Linear, the emb_dims layers, CLIP-L, CLIP-G and T5."""
    network = create_lora_network(mmdit, encoders, "sd3", dim=RANK, alpha=ALPHA, train_text_encoder=True,
                                  network_args={**SD3_ARGS, **args})
    randomize(network)
    return network


@pytest.mark.parametrize(("variant", "split"), [("medium", False), ("5-medium", False), ("5-large", False),
                                                ("5-medium", True)])
def test_sd3_lora_in_diffusers_names_loads_in_sd3_transformer_and_round_trips(variant, split, tmp_path):
    from engine.networks.tools.convert_lora import convert_lora

    mmdit = tiny_mmdit(variant)
    for parameter in mmdit.parameters():
        parameter.requires_grad_(False)
    network = sd3_network(mmdit, [tiny_clip_l(), tiny_clip_g(), tiny_t5()], **({"split_qkv": "True"} if split else {}))
    names = [lora.lora_name for lora in network.unet_loras]
    # the names the reference gives (spec §8.6): lora_unet_ + SAI path, the last context block's adaLN among them
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1" in names
    assert ("lora_unet_joint_blocks_0_x_block_attn2_qkv" in names) == (variant == "5-medium")
    kohya = save_kohya(network, tmp_path / f"sd3-{variant}.safetensors", {"ss_base_model_version": variant})
    report = convert_lora(kohya, "diffusers")
    assert report.family == "sd3" and report.dropped == {"lora_te3": 14}
    assert report.modules_out["text_encoder"] == 12 and report.modules_out["text_encoder_2"] == 18

    transformer = sd3_transformer(mmdit)
    with loader_messages() as messages:
        transformer.load_lora_adapter(report.output, prefix="transformer")
    assert not lora_warnings(messages), messages
    inputs = sd3_inputs(mmdit.params)
    ours = engine_sd3_output(mmdit, network, inputs)
    assert (ours - diffusers_sd3_output(transformer, inputs)).abs().max() <= TOLERANCE
    assert (ours - engine_sd3_output(mmdit, None, inputs)).abs().max() > 1e-3

    back = Path(convert_lora(report.output, "kohya").output)
    before = {name: weights for name, weights in kohya_modules(kohya).items() if not name.startswith("lora_te3_")}
    assert_same_effect(before, kohya_modules(back))


def test_sd3_lora_in_diffusers_names_loads_in_stable_diffusion_3_pipeline(tmp_path, capsys):
    """The issue's check: the converted file loads through StableDiffusion3Pipeline.load_lora_weights on a
    pipeline folder of the tiny SD3.5 medium files, and its transformer, CLIP-L and CLIP-G compute what the
    engine's loaded model computes with the kohya LoRA applied."""
    from diffusers import StableDiffusion3Pipeline

    from engine.models.sd3.loading import load_sd3_model

    files = tiny_sd3_files("5-medium")
    loaded = load_sd3_model(files["model"], clip_l=files["clip_l"], clip_g=files["clip_g"], t5xxl=files["t5xxl"],
                            tokenizer_cache_dir=files["t5_tokenizer"])
    network = sd3_network(loaded.unet, list(loaded.text.encoders))
    kohya = save_kohya(network, tmp_path / "sd35m-style.safetensors",
                       {"ss_base_model_version": "5-medium", "ss_network_module": "networks.lora_sd3",
                        "modelspec.architecture": "stable-diffusion-3-5-medium/lora"})
    code, report = run_json(capsys, "convert", kohya, "--to", "diffusers", "-o", tmp_path / "for-diffusers.safetensors")
    assert code == 0, report
    pipe = StableDiffusion3Pipeline.from_pretrained(str(write_tiny_sd3_diffusers(files, tmp_path / "pipe")),
                                                    local_files_only=True)
    with loader_messages() as messages:
        pipe.load_lora_weights(report["output"])
    assert not lora_warnings(messages), messages

    inputs = sd3_inputs(loaded.unet.params)
    ours = engine_sd3_output(loaded.unet, network, inputs)
    assert (ours - diffusers_sd3_output(pipe.transformer, inputs)).abs().max() <= TOLERANCE
    tokens = pipe.tokenizer(["sks dog", "a red square"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    for index, theirs_encoder in enumerate((pipe.text_encoder, pipe.text_encoder_2)):
        network.apply_to()
        try:
            with torch.no_grad():
                ours_out = loaded.text.encoders[index](tokens, output_hidden_states=True)
        finally:
            network.restore()
        with torch.no_grad():
            theirs_out = theirs_encoder(tokens, output_hidden_states=True)
        assert (ours_out.text_embeds - theirs_out.text_embeds).abs().max() <= TOLERANCE
        assert (ours_out.hidden_states[-2] - theirs_out.hidden_states[-2]).abs().max() <= TOLERANCE


def merged_mmdit(mmdit: Any, kohya: dict[str, LoRAWeights]) -> Any:
    """A copy of the MMDiT with each kohya module's change added to its layer (W += alpha/rank * up @ down)."""
    merged = copy.deepcopy(mmdit)
    layers = {f"lora_unet_{path.replace('.', '_')}": module for path, module in merged.named_modules()}
    with torch.no_grad():
        for name, weights in kohya.items():
            layers[name].weight += weights.delta()
    return merged


def test_diffusers_training_script_lora_to_kohya_names(tmp_path, capsys):
    """What diffusers' SD3 training script saves (PEFT LoraConfig with lora_alpha 8 at rank 4 in the file's
    lora_adapter_metadata; q, k and v with their own A) converts to kohya names that compute diffusers' output."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    mmdit = tiny_mmdit("medium")
    transformer = sd3_transformer(mmdit)
    config = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                        "add_v_proj", "to_add_out", "ff.net.2", "norm1_context.linear"])
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                               transformer_lora_adapter_metadata=config.to_dict())
    saved = tmp_path / "pytorch_lora_weights.safetensors"
    # nothing in these names is SD3's alone (FLUX.1's double blocks have them too) and there is no ss_ metadata
    code, out, err = run_cli(capsys, "convert", saved, "--to", "kohya")
    assert code == 2 and "pass --family" in err
    code, report = run_json(capsys, "convert", saved, "--to", "kohya", "--family", "sd3")
    assert code == 0, report
    kohya = kohya_modules(Path(report["output"]))
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv"].rank == 3 * RANK  # three A's, block-diagonal B
    assert kohya["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"].rank == RANK  # last block: swapped
    inputs = sd3_inputs(mmdit.params)
    theirs = diffusers_sd3_output(transformer, inputs)
    ours = engine_sd3_output(merged_mmdit(mmdit, kohya), None, inputs)
    assert (ours - theirs).abs().max() <= TOLERANCE
    assert (ours - engine_sd3_output(mmdit, None, inputs)).abs().max() > 1e-3
    assert file_metadata(Path(report["output"]))["ss_network_module"] == "networks.lora_sd3"


# --- refusals, names and the Tools tab -----------------------------------------------------------------------------


@pytest.fixture
def small_sd3_lora(tmp_path) -> Path:
    mmdit = tiny_mmdit("medium")
    network = create_lora_network(mmdit, [torch.nn.Module()] * 3, "sd3", dim=RANK, alpha=ALPHA,
                                  train_text_encoder=False)
    randomize(network)
    return save_kohya(network, tmp_path / "small.safetensors", {"ss_base_model_version": "medium"})


def test_never_overwrites_unless_asked(small_sd3_lora, tmp_path, capsys):
    code, report = run_json(capsys, "convert", small_sd3_lora, "--to", "diffusers")
    assert code == 0
    output = Path(report["output"])
    first = output.stat().st_mtime_ns
    code, out, err = run_cli(capsys, "convert", small_sd3_lora, "--to", "diffusers")
    assert code == 2 and f"{output} already exists" in err and "--overwrite" in err
    assert output.stat().st_mtime_ns == first
    code, report = run_json(capsys, "convert", small_sd3_lora, "--to", "diffusers", "--overwrite")
    assert code == 0 and report["output"] == str(output)
    code, out, err = run_cli(capsys, "convert", small_sd3_lora, "--to", "diffusers", "-o", small_sd3_lora,
                             "--overwrite")
    assert code == 2 and "is the input" in err
    code, out, err = run_cli(capsys, "convert", small_sd3_lora, "--to", "kohya")
    assert code == 2 and "convert it --to diffusers instead" in err
    code, out, err = run_cli(capsys, "convert", output, "--to", "diffusers", "-o", tmp_path / "again.safetensors")
    assert code == 2 and "already has diffusers/PEFT names" in err
    code, out, _ = run_cli(capsys, "convert", small_sd3_lora, "--to", "diffusers", "-o", tmp_path / "x.safetensors")
    assert code == 0 and "sd3, from metadata" in out and "wrote" in out  # the text report


def test_lokr_and_sd_loras_are_refused(tmp_path, capsys):
    lokr = tmp_path / "lokr.safetensors"
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    save_file({f"{name}.lokr_w1": torch.ones(4, 4), f"{name}.lokr_w2": torch.ones(96, 32),
               f"{name}.alpha": torch.tensor(1.0)}, str(lokr))
    code, out, err = run_cli(capsys, "convert", lokr, "--to", "diffusers")
    assert code == 2 and "LyCORIS LoKr" in err and "only LoRA files convert" in err
    assert not (tmp_path / "lokr_diffusers.safetensors").exists()
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(sd1),
              metadata={"ss_base_model_version": "sd_v1"})
    code, out, err = run_cli(capsys, "convert", sd1, "--to", "diffusers")
    assert code == 2 and "is a sd1 LoRA" in err and "flux1, chroma, sd3" in err


def test_tools_tab_convert_command_and_result(small_sd3_lora, tmp_path):
    from gui import tools_commands as commands
    from gui import tools_render as render
    from gui.file_browser import FileRoots
    from gui.views import tools as view

    roots = FileRoots.from_paths([tmp_path], include_home=False)
    args = commands.convert_args(str(small_sd3_lora), "", roots, to="diffusers")
    assert args == ["lora", "convert", str(small_sd3_lora), "--to", "diffusers", "-o",
                    str(tmp_path / "small_diffusers.safetensors"), "--json"]
    assert commands.convert_args(str(small_sd3_lora), "", roots, to="kohya", family="sd3")[-3:] == ["--family",
                                                                                                   "sd3", "--json"]
    with pytest.raises(commands.ToolInputError, match="LoRA file: enter a path"):
        commands.convert_args("", "", roots, to="diffusers")
    outcome, inspected = view.run_and_inspect(args)
    assert outcome.report is not None, outcome.error
    assert inspected is None  # inspect reads kohya files only
    text = render.result_markdown("convert", outcome)
    assert f"Wrote `{tmp_path / 'small_diffusers.safetensors'}`" in text
    assert "(sd3, read from metadata) to diffusers names" in text
