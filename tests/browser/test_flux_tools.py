"""The Tools tab on FLUX.1 in Chromium: inspect a tiny FLUX.1 LoRA (family, double/single/CLIP-L/T5 module counts,
split_qkv), then merge it into a bf16 copy of the tiny FLUX.1 dev transformer. Without a T5 file the engine refuses
(the LoRA has T5 modules) and the page shows why; with CLIP-L and T5 in and out it writes the three files, which keep
the model's bf16 (the merge's default precision is the input's own), and the page lists each new file. Then a LoRA
is extracted back from the merged transformer with a clamp quantile and its summary shown."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import fill, open_tab
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SLOW = 300_000  # ms: each LoRA tool is an engine process that loads torch (on two shared CPU cores)
FLUX_METADATA = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                 "modelspec.architecture": "flux-1-dev/lora"}


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict:
    """The tiny FLUX.1 dev files, in a folder the app may use (its --allow-path roots)."""
    from flux_tiny import tiny_flux_files, write_tiny_flux

    if os.environ.get("ATELIER_TINY_MODELS"):  # kept between sessions, beside the tiny SD models the app allows
        return tiny_flux_files("dev")
    return write_tiny_flux(tmp_path_factory.mktemp("flux_dev"), "dev")


def make_flux_lora(files: dict, path: Path) -> dict[str, int]:
    """A FLUX.1 LoRA on the transformer, CLIP-L and T5 (split_qkv, random lora_up as after training); returns its
    modules per part as the engine names them."""
    import torch

    from engine.models.flux.loading import load_flux_model
    from engine.networks.lora import create_lora_network
    from engine.networks.network_file import save_network_file

    loaded = load_flux_model(files["model"], family="flux1", clip_l=files["clip_l"], t5xxl=files["t5xxl"],
                             ae=files["ae"], tokenizer_cache_dir=files["t5_tokenizer"])
    network = create_lora_network(loaded.unet, list(loaded.text.encoders), "flux1", dim=4, alpha=2.0,
                                  train_text_encoder=True, network_args={"train_t5xxl": "True", "split_qkv": "True"})
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lora in network.all_loras():
            for up in lora.lora_up.modules():
                if isinstance(up, torch.nn.Linear):
                    up.weight.copy_(torch.randn(up.weight.shape, generator=generator) * 0.3)
    save_network_file(path, network.kohya_state_dict(), dict(FLUX_METADATA), save_as="safetensors")
    names = {key.partition(".")[0] for key in network.kohya_state_dict()}
    # lora_unet_double_blocks_0_img_attn_qkv -> double; lora_te1_... -> te1
    return dict(Counter(name.split("_")[2] if name.startswith("lora_unet_") else name.split("_")[1]
                        for name in names))


def bf16_copy(source: Path, target: Path) -> Path:
    """The tiny transformer saved in bf16, as the real FLUX.1 files are."""
    import torch
    from safetensors.torch import load_file, save_file

    save_file({key: value.to(torch.bfloat16) for key, value in load_file(str(source)).items()}, str(target))
    return target


def dtypes(path: Path) -> Counter:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys = handle.keys()  # a safe_open handle is not iterable itself
        return Counter(handle.get_slice(key).get_dtype() for key in keys)


@pytest.fixture
def tools(app_page):
    open_tab(app_page, "Tools")
    return app_page


def test_flux_lora_inspect_and_merge_with_text_encoders(tools, work_dir, flux_files, screenshot):
    lora = work_dir / "flux_style.safetensors"
    parts = make_flux_lora(flux_files, lora)
    assert parts["double"] == 20 and parts["single"] == 6 and parts["te1"] > 0 and parts["te3"] > 0
    fill(tools, "tools-inspect-file", str(lora))
    tools.locator("#tools-inspect-run").click()
    summary = tools.locator("#tools-inspect-summary")
    expect(summary).to_contain_text("Family: flux1", timeout=SLOW)
    expect(summary).to_contain_text(f"Modules: {sum(parts.values())} (double 20, single 6, te1 {parts['te1']}, "
                                    f"te3 {parts['te3']})")
    # img_attn.qkv and txt_attn.qkv of the 2 double blocks in 3 parts, linear1 of the 2 single blocks in 4
    expect(summary).to_contain_text("split_qkv modules (saved merged, block-diagonal lora_up): 4 in 3 parts, "
                                    "2 in 4 parts")
    expect(tools.locator("#tools-inspect-metadata")).to_contain_text("networks.lora_flux")
    screenshot(tools, "tools-flux-inspect")

    model = bf16_copy(flux_files["model"], work_dir / "flux1-dev-bf16.safetensors")
    clip_l, t5xxl = (Path(shutil.copy(flux_files[name], work_dir / f"{name}.safetensors")) for name in
                     ("clip_l", "t5xxl"))
    merged, clip_out = work_dir / "flux1-dev-style.safetensors", work_dir / "clip_l-style.safetensors"
    tools.get_by_role("tab", name="Merge", exact=True).click()
    fill(tools, "tools-merge-sources", str(lora))
    fill(tools, "tools-merge-output", str(merged))
    expect(tools.locator("#tools-merge-precision input")).to_have_value("keep")
    fill(tools, "tools-merge-model", str(model))
    # a FLUX.1 file opens the text-encoder fields and says which encoders are separate files
    expect(tools.locator("#tools-merge-encoders-note")).to_contain_text("is a flux1 transformer", timeout=30_000)
    expect(tools.locator("#tools-merge-encoders-note")).to_contain_text("CLIP-L and T5-XXL")
    fill(tools, "tools-merge-clip-l", str(clip_l))
    fill(tools, "tools-merge-clip-l-save-to", str(clip_out))
    tools.locator("#tools-merge-run").click()
    result = tools.locator("#tools-merge-result")
    # the LoRA has T5 modules and no T5 file is given: the engine refuses and writes nothing
    expect(result).to_contain_text("The engine refused", timeout=SLOW)
    expect(result).to_contain_text(f"{parts['te3']} T5-XXL module(s)")
    expect(result).to_contain_text("give --t5xxl")
    assert not merged.exists() and not clip_out.exists()

    fill(tools, "tools-merge-t5xxl", str(t5xxl))  # its new file left blank: next to it, named *_merged
    tools.locator("#tools-merge-run").click()
    t5_out = work_dir / "t5xxl_merged.safetensors"
    expect(result).to_contain_text(f"Wrote {merged}", timeout=SLOW)
    expect(result).to_contain_text(f"{sum(parts.values())} modules (double 20, single 6")
    expect(result).to_contain_text(f"Wrote the CLIP-L: {clip_out}")
    expect(result).to_contain_text(f"Wrote the T5-XXL: {t5_out}")
    written = tools.locator("#tools-merge-written")
    model_tensors = sum(dtypes(model).values())
    # kept in bf16, as its input; saving it as float32 would double a real FLUX.1 (48 GB)
    expect(written).to_contain_text(f"Model {merged}: ", timeout=SLOW)
    expect(written).to_contain_text(f"{model_tensors} tensors (BF16 {model_tensors}), a flux1 transformer")
    expect(written).to_contain_text(f"CLIP-L {clip_out}: ")
    expect(written).to_contain_text(f"T5-XXL {t5_out}: ")
    assert dtypes(merged) == Counter({"BF16": model_tensors})
    assert dtypes(clip_out) == dtypes(clip_l) and dtypes(t5_out) == dtypes(t5xxl)
    screenshot(tools, "tools-flux-merge")

    # back out of the merged transformer: the LoRA's transformer part, its factors clipped at sd-scripts' quantile
    tools.get_by_role("tab", name="Extract", exact=True).click()
    fill(tools, "tools-extract-base", str(model))
    fill(tools, "tools-extract-tuned", str(merged))
    box = tools.locator("#tools-extract-clamp input[type=number]")
    box.fill("0.99")
    box.press("Tab")
    tools.locator("#tools-extract-run").click()
    extracted = work_dir / "flux1-dev-style_lora_r8.safetensors"
    expect(tools.locator("#tools-extract-result")).to_contain_text(f"Wrote {extracted}", timeout=SLOW)
    expect(tools.locator("#tools-extract-result")).to_contain_text("(flux1) at rank 8")
    extracted_summary = tools.locator("#tools-extract-written")
    expect(extracted_summary).to_contain_text("Family: flux1", timeout=SLOW)
    expect(extracted_summary).to_contain_text("(double 20, single 6)")
