"""Sample images during training: sd-scripts' samplers, prompt requests, and generation that leaves no trace."""

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config.choices import Sampler
from engine.config.literals import literal_values
from engine.config.sections_output import SamplingSection
from engine.train.sampling import (
    SAMPLERS,
    SampleRequest,
    SamplerParts,
    generate_samples,
    make_sample_scheduler,
    sample_requests,
)

# spec §7: sd-scripts' sampler names -> the diffusers scheduler it builds (and the DPM-Solver algorithm)
EXPECTED = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}
FAMILIES = ("sd1", "sd2", "sdxl")
# diffusers' own numpy deprecations, thousands per KDPM2 scheduler; recording them only slows the tests down
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def request(prompt="a photo of sks cat", negative="", width=64, height=64, seed=1, steps=2, scale=7.5,
            sampler="euler_a"):
    return SampleRequest(prompt, negative, width, height, seed, steps, scale, sampler)


@pytest.fixture(scope="module")
def parts(tiny_models):
    from diffusers import UNet2DConditionModel

    from engine.models.text_encoders import load_text_encoders
    from engine.models.vae import load_vae

    loaded = {}
    for family in FAMILIES:
        folder = Path(tiny_models[family])
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        vae = load_vae(folder)
        loaded[family] = SamplerParts(
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(), vae=vae.vae,
            text=load_text_encoders(folder), family=family,
            v_prediction=scheduler.get("prediction_type") == "v_prediction", scaling_factor=vae.scaling_factor)
    return loaded


def generate(parts, requests, out_dir, stem="last_e000001", dtype=torch.float32):
    return generate_samples(parts, requests, out_dir, stem=stem, clip_skip=1, max_token_length=75, device="cpu",
                            dtype=dtype)


def pixels(sample):
    return np.asarray(Image.open(sample.path))


# --- schedulers ---------------------------------------------------------------------------------------------------


def test_the_registry_covers_every_sampler_choice():
    assert set(SAMPLERS) == set(literal_values(Sampler)) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("v_prediction", [False, True])
def test_every_sampler_builds_its_scheduler_with_sd_scripts_settings(name, v_prediction):
    if "lms" in name and importlib.util.find_spec("scipy") is None:
        # diffusers' LMS scheduler needs scipy; without it the error must say so
        with pytest.raises(ImportError, match="scipy"):
            make_sample_scheduler(name, v_prediction=v_prediction)
        return
    scheduler = make_sample_scheduler(name, v_prediction=v_prediction)
    config = scheduler.config
    assert type(scheduler).__name__ == EXPECTED[name]
    assert config.prediction_type == ("v_prediction" if v_prediction else "epsilon")
    assert (config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule) == (
        1000, 0.00085, 0.012, "scaled_linear")
    if "clip_sample" in config:
        assert config.clip_sample is True
    if name.startswith("dpmsolver"):
        assert config.algorithm_type == name


def test_unknown_sampler_is_an_error():
    with pytest.raises(ValueError, match="unknown sampler 'warp'"):
        make_sample_scheduler("warp", v_prediction=False)


# --- requests -----------------------------------------------------------------------------------------------------


def test_prompt_file_options_are_read_relative_to_the_base_dir(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "p.txt").write_text(
        "# a comment\n\nsks dog on grass --n blurry, lowres --w 72 --h 100 --d 7 --s 3 --l 5.5\n"
        "sks cat --ss DDIM\n", encoding="utf-8")
    section = SamplingSection(sample_prompts_file="prompts/p.txt", sample_sampler="euler")
    first, second = sample_requests(section, tmp_path, default_size=512)
    assert first == SampleRequest("sks dog on grass", "blurry, lowres", 72, 96, 7, 3, 5.5, "euler")
    assert second == SampleRequest("sks cat", "", 512, 512, None, 30, 7.5, "ddim")


def test_inline_prompts_take_the_defaults(tmp_path):
    section = SamplingSection(sample_prompts=["a cat", "a dog --w 640 --s 12"], sample_sampler="dpmsolver++")
    assert sample_requests(section, tmp_path, default_size=1024) == [
        SampleRequest("a cat", "", 1024, 1024, None, 30, 7.5, "dpmsolver++"),
        SampleRequest("a dog", "", 640, 1024, None, 12, 7.5, "dpmsolver++"),
    ]


def test_structured_prompt_files_are_floored_and_clamped_like_text_lines(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a cat", "width": 100, "height": 20, "sample_steps": 0,
                                                  "seed": 3, "sample_sampler": "k_euler"}]))
    section = SamplingSection(sample_prompts_file=str(tmp_path / "p.json"))
    assert sample_requests(section, Path("/elsewhere"), default_size=512) == [
        SampleRequest("a cat", "", 96, 64, 3, 1, 7.5, "k_euler")]


def test_bad_prompt_files_are_explained(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a cat"}, {"prompt": "a dog", "sample_sampler": "x"}]))
    with pytest.raises(ValueError, match="sample prompt 2: unknown sampler 'x'"):
        sample_requests(SamplingSection(sample_prompts_file="p.json"), tmp_path, default_size=512)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        sample_requests(SamplingSection(sample_prompts_file="missing.txt"), tmp_path, default_size=512)


# --- generation ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_images_have_the_requested_sizes_and_sd_scripts_names(parts, tmp_path, family):
    requests = [request(width=64, height=96, sampler="ddim"), request(width=96, height=64, seed=None, steps=3)]
    samples = generate(parts[family], requests, tmp_path, stem="last_000500")
    assert [(s.index, s.prompt) for s in samples] == [(0, requests[0].prompt), (1, requests[1].prompt)]
    assert samples[0].seed == 1 and 0 <= samples[1].seed < 2**32
    for sample, wanted in zip(samples, requests, strict=True):
        assert re.fullmatch(rf"last_000500_{sample.index:02d}_\d{{14}}_{sample.seed}\.png", sample.path.name)
        assert sample.path.parent == tmp_path
        assert Image.open(sample.path).size == (wanted.width, wanted.height)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s.path.name for s in samples)  # no temporary files


def test_seeds_reproduce_and_differ(parts, tmp_path):
    ancestral = request(sampler="euler_a", steps=3)  # draws fresh noise at every step, from the same generator
    first, other, again = generate(parts["sd1"], [ancestral, request(seed=2, sampler="euler_a", steps=3), ancestral],
                                   tmp_path)
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_the_negative_prompt_changes_the_image(parts, tmp_path):
    plain, negative = generate(parts["sd1"], [request(), request(negative="blurry, lowres")], tmp_path)
    assert not np.array_equal(pixels(plain), pixels(negative))


def test_half_precision_runs_under_autocast(parts, tmp_path):
    (sample,) = generate(parts["sdxl"], [request(width=96)], tmp_path, dtype=torch.bfloat16)
    assert Image.open(sample.path).size == (96, 64)
    assert all(p.dtype == torch.float32 for p in parts["sdxl"].unet.parameters())  # weights untouched


def test_sdxl_is_conditioned_on_the_requested_size(parts, tmp_path):
    unet, seen = parts["sdxl"].unet, []
    handle = unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    try:
        generate(parts["sdxl"], [request(width=96, height=64, steps=2)], tmp_path)
    finally:
        handle.remove()
    expected = torch.tensor([[64, 96, 0, 0, 64, 96]] * 2, dtype=seen[0].dtype)  # (h, w), crop, (h, w); CFG pair
    assert len(seen) == 2 and all(torch.equal(time_ids, expected) for time_ids in seen)


def test_global_rng_and_module_modes_are_restored(parts, tmp_path):
    part = parts["sd1"]
    encoder = part.text.encoders[0]
    part.unet.train()
    part.unet.conv_in.eval()  # a submodule whose flag differs from its parent's must keep it
    encoder.train()
    during = []

    def disturb(module, args):
        # Something inside sampling that draws from every global RNG and records the state it runs in.
        during.append((module.training, torch.is_grad_enabled()))
        torch.rand(3), random.random(), np.random.rand()

    handle = part.unet.register_forward_pre_hook(disturb)
    flags = {name: m.training for root in (part.unet, part.vae, encoder) for name, m in root.named_modules()}
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        generate(part, [request(seed=None), request(seed=5)], tmp_path)
    finally:
        handle.remove()
        after = {name: m.training for root in (part.unet, part.vae, encoder) for name, m in root.named_modules()}
        part.unet.eval(), encoder.eval()
    assert during and set(during) == {(False, False)}  # eval mode, no autograd while sampling
    assert after == flags
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[2], strict=True))


def test_a_monkey_patched_lora_is_sampled_with(parts, tmp_path):
    """kohya-style LoRA: the original module's forward replaced, the LoRA weights in a separate plain module."""
    part = parts["sd1"]
    target = part.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    down, up = torch.nn.Linear(target.in_features, 4, bias=False), torch.nn.Linear(4, target.out_features, bias=False)
    torch.nn.init.normal_(up.weight, std=0.5)
    original, calls = target.forward, []

    def patched(x):
        calls.append(1)
        return original(x) + up(down(x))

    (plain,) = generate(part, [request()], tmp_path / "plain")
    target.forward = patched
    try:
        (with_lora,) = generate(part, [request()], tmp_path / "lora")
    finally:
        target.forward = original
    assert calls
    assert not np.array_equal(pixels(plain), pixels(with_lora))


def test_importing_the_module_stays_cheap():
    code = ("import sys, engine.train.sampling; "
            "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
