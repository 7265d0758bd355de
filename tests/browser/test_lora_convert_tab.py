"""The Tools tab's Convert page in Chromium: a kohya SD3.5 large LoRA (transformer, CLIP-L, CLIP-G and T5 modules,
made by our network code on the tiny MMDiT) is converted to diffusers names (the page says the T5 modules were left
out and writes transformer.* / text_encoder.* keys only), a second click is refused because the file exists, and the
diffusers file is converted back to kohya names, whose inspect summary shows the SD3 family and module counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fill, open_tab
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 300_000  # ms: each LoRA tool is an engine process that loads torch (on two shared CPU cores)
T5_MODULES = 14  # the tiny T5: 2 blocks x (q, k, v, o, wi_0, wi_1, wo)


def make_sd3_lora(path: Path) -> dict[str, int]:
    """An SD3.5 large LoRA with random lora_up weights; returns its modules per part (unet, te1, te2, te3)."""
    import torch
    from sd3_tiny import tiny_clip_g, tiny_clip_l, tiny_mmdit, tiny_t5

    from engine.networks.lora import create_lora_network
    from engine.networks.network_file import save_network_file

    network = create_lora_network(tiny_mmdit("5-large"), [tiny_clip_l(), tiny_clip_g(), tiny_t5()], "sd3", dim=4,
                                  alpha=2.0, network_args={"train_t5xxl": "True"})
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_up" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    state = network.kohya_state_dict()
    save_network_file(path, state, {"ss_base_model_version": "5-large", "ss_network_module": "networks.lora_sd3",
                                    "modelspec.architecture": "stable-diffusion-3-5-large/lora"},
                      save_as="safetensors")
    names = {key.partition(".")[0] for key in state}
    return {part: sum(1 for name in names if name.startswith(f"lora_{part}_")) for part in ("unet", "te1", "te2",
                                                                                           "te3")}


def keys_of(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


@pytest.fixture
def tools(app_page):
    open_tab(app_page, "Tools")
    app_page.get_by_role("tab", name="Convert", exact=True).click()
    return app_page


def test_convert_sd3_lora_to_diffusers_and_back(tools, work_dir, screenshot):
    from engine.networks.tools.lora_file import count_parts

    lora = work_dir / "sd35l-style.safetensors"
    parts = make_sd3_lora(lora)
    assert parts["te3"] == T5_MODULES
    converted = work_dir / "sd35l-style_diffusers.safetensors"
    fill(tools, "tools-convert-file", str(lora))
    expect(tools.locator("#tools-convert-family input")).to_have_value("auto")
    tools.locator("#tools-convert-run").click()
    result = tools.locator("#tools-convert-result")
    expect(result).to_contain_text(f"Wrote {converted}", timeout=SLOW)
    expect(result).to_contain_text("(sd3, read from metadata) to diffusers names")
    total = sum(parts.values())
    expect(result).to_contain_text(f"Modules: {total} in")
    expect(result).to_contain_text(f"Left out: {T5_MODULES} T5 module(s) (lora_te3_...): diffusers loads no LoRA "
                                   "into T5")
    keys = keys_of(converted)
    assert keys and all(key.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) for key in keys)
    assert any(key.startswith("transformer.transformer_blocks.1.norm1_context.linear") for key in keys)
    screenshot(tools, "tools-convert-diffusers")

    # a blank output field picks a free name; an existing file named in it is refused: the engine never overwrites
    fill(tools, "tools-convert-output", str(converted))
    tools.locator("#tools-convert-run").click()
    expect(result).to_contain_text("The engine refused", timeout=SLOW)
    expect(result).to_contain_text(f"{converted} already exists")

    fill(tools, "tools-convert-output", "")
    fill(tools, "tools-convert-file", str(converted))
    tools.locator("#tools-convert-to").get_by_text("kohya names", exact=False).click()
    tools.locator("#tools-convert-run").click()
    back = work_dir / "sd35l-style_diffusers_kohya.safetensors"
    expect(result).to_contain_text(f"Wrote {back}", timeout=SLOW)
    expect(result).to_contain_text("to kohya names")
    written = tools.locator("#tools-convert-written")
    expect(written).to_contain_text("Family: sd3", timeout=SLOW)
    names = {key.partition(".")[0] for key in keys_of(back)}
    assert names == {key.partition(".")[0] for key in keys_of(lora) if not key.startswith("lora_te3_")}
    groups = ", ".join(f"{part} {count}" for part, count in count_parts(names).items())  # as inspect counts them
    expect(written).to_contain_text(f"Modules: {total - T5_MODULES} ({groups})")
    screenshot(tools, "tools-convert-kohya")
