"""The doctor's SD3 / SD3.5 model-file checks: the variant from the base file's keys, each text encoder and the VAE
inside the file or from its field (and what it really is when it is not), widths that must fit the MMDiT, and
blocks_to_swap against the variant's depth. Headers only: the files here hold the key names and shapes the checks
read (zeros as data), and the tiny SD3 files of tests/sd3_tiny.py (real MMDiTs) when they are there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config.io import deep_merge, default_config_dict, validate_config
from engine.data.doctor import run_doctor
from engine.data.doctor_models import read_safetensors_header
from engine.data.model_findings import model_findings
from engine.data.model_kinds import model_family_of, read_sd3_file

REPO = Path(__file__).resolve().parents[2]
HIDDEN, CONTEXT, POOLED = 128, 64, 64  # a 2-block MMDiT: hidden 64 * depth; T5 64 wide; CLIP-L 32 + CLIP-G 32


def write_header(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A safetensors file with 1-byte zeros of `shapes` (the checks read nothing but the header)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 1
        for side in shape:
            size *= side
        header[key] = {"dtype": "U8", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\x00" * offset)
    return path


def mmdit_shapes(variant: str, depth: int = 2, hidden: int = HIDDEN) -> dict[str, list[int]]:
    """SAI MMDiT keys (prefix-free) of a `variant` model: qk-norm for SD3.5, attn2 on block 0 for SD3.5 medium."""
    shapes = {"x_embedder.proj.weight": [hidden, 16, 2, 2], "pos_embed": [1, 256, hidden],
              "y_embedder.mlp.0.weight": [hidden, POOLED], "context_embedder.weight": [hidden, CONTEXT]}
    for block in range(depth):
        for part in ("context_block", "x_block"):
            shapes[f"joint_blocks.{block}.{part}.attn.qkv.weight"] = [3 * hidden, hidden]
            if variant != "medium":
                shapes[f"joint_blocks.{block}.{part}.attn.ln_k.weight"] = [64]
    if variant == "5-medium":
        shapes["joint_blocks.0.x_block.attn2.qkv.weight"] = [3 * hidden, hidden]
    return shapes


def clip_shapes(width: int = 32, projection: int | None = 32) -> dict[str, list[int]]:
    shapes = {"text_model.embeddings.token_embedding.weight": [1000, width],
              "text_model.encoder.layers.0.mlp.fc1.weight": [4 * width, width]}
    if projection:
        shapes["text_projection.weight"] = [projection, width]
    return shapes


def t5_shapes(width: int = CONTEXT) -> dict[str, list[int]]:
    return {"shared.weight": [100, width], "encoder.final_layer_norm.weight": [width]}


def vae_shapes(channels: int = 16) -> dict[str, list[int]]:
    return {"encoder.down.0.block.0.conv1.weight": [64, 64, 3, 3], "encoder.conv_out.weight": [2 * channels, 64, 3, 3],
            "decoder.conv_in.weight": [64, channels, 3, 3]}


def prefixed(prefix: str, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    return {prefix + key: shape for key, shape in shapes.items()}


def sd3_file(path: Path, variant: str, *, embedded: tuple[str, ...] = ("clip_l", "clip_g", "t5xxl", "vae"),
             depth: int = 2) -> Path:
    """An SAI single file: the MMDiT under model.diffusion_model., and the `embedded` components."""
    shapes = prefixed("model.diffusion_model.", mmdit_shapes(variant, depth))
    parts = {"clip_l": clip_shapes(), "clip_g": clip_shapes(), "t5xxl": t5_shapes()}
    for name in embedded:
        prefix = "first_stage_model." if name == "vae" else f"text_encoders.{name}.transformer."
        shapes |= prefixed(prefix, vae_shapes() if name == "vae" else parts[name])
    return write_header(path, shapes)


@pytest.fixture
def parts(tmp_path) -> dict[str, Path]:
    """Separate component files and a bare SD3.5 large base file (no text encoders, no VAE)."""
    return {"model": sd3_file(tmp_path / "sd3.5_large.safetensors", "5-large", embedded=()),
            "clip_l": write_header(tmp_path / "clip_l.safetensors", clip_shapes()),
            "clip_g": write_header(tmp_path / "clip_g.safetensors", clip_shapes()),
            "t5xxl": write_header(tmp_path / "t5xxl.safetensors", t5_shapes()),
            "vae": write_header(tmp_path / "vae.safetensors", vae_shapes())}


def config(model: Path | str, family: str = "sd3", training: dict | None = None, **files):
    values = {"model_family": family, "pretrained_model_name_or_path": str(model),
              **{name: str(path) for name, path in files.items()}}
    data = deep_merge(default_config_dict(), {"model": values, "training": training or {}})
    return validate_config(data, check_packages=False)


def found(run_config, base: Path) -> list[tuple[str, str, str, str]]:
    """(severity, code, where, message -> hint) of each finding."""
    return [(f.severity, f.code, f.where, f"{f.message} -> {f.hint}") for f in model_findings(run_config, base)]


def errors(run_config, base: Path) -> list[tuple[str, str, str]]:
    return [(code, where, text) for severity, code, where, text in found(run_config, base) if severity == "error"]


@pytest.mark.parametrize(("variant", "label"), [("medium", "SD3 medium"), ("5-medium", "SD3.5 medium"),
                                                ("5-large", "SD3.5 large")])
def test_the_variant_is_read_from_the_keys_and_said(tmp_path, variant, label):
    path = sd3_file(tmp_path / "model.safetensors", variant)
    sd3 = read_sd3_file(read_safetensors_header(path))
    assert (sd3.variant, sd3.depth, sd3.label) == (variant, 2, label)
    [(severity, code, where, text)] = found(config(path), tmp_path)
    assert (severity, code, where) == ("info", "model-detected", str(path))
    assert text.startswith(f"an {label} model (2 joint blocks); CLIP-L inside the file, CLIP-G inside the file, "
                           "T5-XXL inside the file, VAE inside the file")
    # "auto" detects SD3 from the same header, and a bare transformer-only file (no prefix) is SD3 too
    assert found(config(path, "auto"), tmp_path)[0][1] == "model-detected"
    bare = write_header(tmp_path / "bare.safetensors", mmdit_shapes(variant))
    assert model_family_of(read_safetensors_header(bare)) == "sd3"
    assert read_sd3_file(read_safetensors_header(bare)).variant == variant


def test_separate_files_and_what_each_component_comes_from(parts, tmp_path):
    assert errors(config(parts["model"], **{k: v for k, v in parts.items() if k != "model"}), tmp_path) == []
    [(_, _, _, text)] = found(config(parts["model"], **{k: v for k, v in parts.items() if k != "model"}), tmp_path)
    assert "CLIP-L from model.clip_l, CLIP-G from model.clip_g, T5-XXL from model.t5xxl, VAE from model.vae" in text
    # a set field wins over the copy inside the file, and the summary says so
    full = sd3_file(tmp_path / "full.safetensors", "medium")
    [(_, _, _, text)] = found(config(full, clip_g=parts["clip_g"]), tmp_path)
    assert "CLIP-G from model.clip_g (the file's own is not used)" in text


def test_a_missing_component_names_its_field_and_the_file(parts, tmp_path):
    missing = errors(config(parts["model"], clip_l=parts["clip_l"], t5xxl=parts["t5xxl"], vae=parts["vae"]),
                     tmp_path)
    assert missing == [("model-component-missing", str(parts["model"]),
                        "model.clip_g: not set, and the SD3 file holds no CLIP-G (text_encoders.clip_g.transformer.* "
                        "keys) -> set model.clip_g to CLIP-G's file (clip_g.safetensors)")]
    # an incl-clips file without T5 or a VAE: both named
    no_t5 = sd3_file(tmp_path / "sd3_medium_incl_clips.safetensors", "medium", embedded=("clip_l", "clip_g"))
    assert [text.split(":")[0] for _, _, text in errors(config(no_t5), tmp_path)] == ["model.t5xxl", "model.vae"]
    # a component file that does not exist
    gone = tmp_path / "nowhere" / "clip_g.safetensors"
    [(code, where, text)] = errors(config(no_t5, clip_g=gone, t5xxl=parts["t5xxl"], vae=parts["vae"]), tmp_path)
    assert (code, where) == ("model-file-missing", str(gone)) and text.startswith("model.clip_g: no such file")


def test_files_in_the_wrong_fields_say_what_they_are(parts, tmp_path):
    flux = write_header(tmp_path / "flux1-dev.safetensors", {
        "double_blocks.0.img_attn.norm.key_norm.scale": [8], "img_in.weight": [64, 64]})
    lora = write_header(tmp_path / "lora.safetensors", {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": [4, 128]})
    swapped = errors(config(parts["model"], clip_l=parts["t5xxl"], clip_g=flux, t5xxl=lora, vae=parts["clip_l"]),
                     tmp_path)
    assert [(code, where) for code, where, _ in swapped] == [
        ("model-file", str(parts["t5xxl"])), ("model-file", str(flux)), ("model-file", str(lora)),
        ("model-file", str(parts["clip_l"]))]
    texts = [text for _, _, text in swapped]
    assert texts[0].startswith("model.clip_l: not a CLIP text encoder")
    assert texts[1].startswith("model.clip_g: this is a FLUX.1 transformer, not CLIP-G's file (clip_g.safetensors)")
    assert texts[2].startswith("model.t5xxl: this is a LoRA file, not T5-XXL's file")
    assert "network.network_weights" in texts[2]
    assert texts[3].startswith("model.vae: no VAE weights")
    # a whole SD3 file given as a component, and an SD VAE's 4 channels
    sd_vae = write_header(tmp_path / "sdxl_vae.safetensors", vae_shapes(4))
    texts = [text for _, _, text in errors(config(parts["model"], clip_l=parts["clip_l"], clip_g=parts["model"],
                                                  t5xxl=parts["t5xxl"], vae=sd_vae), tmp_path)]
    assert texts[0].startswith("model.clip_g: this is an SD3.5 large model, not CLIP-G's file")
    assert texts[1].startswith("model.vae: a VAE with 4 latent channels") and "16-channel VAE" in texts[1]


def test_an_sd_checkpoint_as_the_base_or_a_component_is_named(tiny_models, tmp_path, parts):
    sdxl = tiny_models["sdxl_ckpt"]
    [(_, where, text)] = errors(config(sdxl), tmp_path)
    assert where == str(sdxl) and text.startswith("model.pretrained_model_name_or_path: this is an SDXL checkpoint, "
                                                  "but model.model_family is 'sd3'")
    [(_, where, text)] = errors(config(parts["model"], clip_l=parts["clip_l"], clip_g=sdxl, t5xxl=parts["t5xxl"],
                                       vae=parts["vae"]), tmp_path)
    assert text.startswith("model.clip_g: this is an SDXL checkpoint, not CLIP-G's file")


def test_real_widths_tell_clip_l_from_clip_g(tmp_path, parts):
    big_g = write_header(tmp_path / "clip_g.safetensors", clip_shapes(1280, 1280))
    [(_, where, text)] = errors(config(parts["model"], clip_l=big_g, clip_g=parts["clip_g"], t5xxl=parts["t5xxl"],
                                       vae=parts["vae"]), tmp_path)
    assert where == str(big_g)
    assert text.startswith("model.clip_l: a text encoder 1280 wide: this is CLIP-G, not CLIP-L")


def test_text_encoders_must_fit_the_mmdit(tmp_path, parts):
    wide_t5 = write_header(tmp_path / "t5-wide.safetensors", t5_shapes(96))
    wide_l = write_header(tmp_path / "clip-wide.safetensors", clip_shapes(48, None))  # no projection: its width
    found_errors = errors(config(parts["model"], clip_l=wide_l, clip_g=parts["clip_g"], t5xxl=wide_t5,
                                 vae=parts["vae"]), tmp_path)
    assert [(code, where) for code, where, _ in found_errors] == [("model-files-mismatch", str(wide_t5)),
                                                                  ("model-files-mismatch", str(wide_l))]
    assert "a T5 96 wide, but this SD3.5 large model takes 64-wide text features" in found_errors[0][2]
    assert "CLIP-L and CLIP-G give 48 + 32 pooled features, but this SD3.5 large model takes 64" in found_errors[1][2]


def test_blocks_to_swap_stops_two_blocks_short_of_the_depth(tmp_path):
    path = sd3_file(tmp_path / "sd3.5_medium.safetensors", "5-medium", depth=6)
    assert errors(config(path, training={"blocks_to_swap": 4}), tmp_path) == []
    [(code, where, text)] = errors(config(path, training={"blocks_to_swap": 5}), tmp_path)
    assert (code, where) == ("blocks-to-swap", "training.blocks_to_swap")
    assert text == ("training.blocks_to_swap is 5, but this SD3.5 medium model has 6 joint blocks: at most 4 can be "
                    "swapped -> set training.blocks_to_swap to 4 or less (0 = off)")


def test_a_base_file_of_another_family(tmp_path, parts):
    flux = write_header(tmp_path / "flux1-dev.safetensors", {
        "double_blocks.0.img_attn.norm.key_norm.scale": [8], "img_in.weight": [64, 64]})
    [(_, where, text)] = errors(config(flux), tmp_path)
    assert where == str(flux)
    assert text.startswith("model.pretrained_model_name_or_path: this is a FLUX.1 transformer, but "
                           "model.model_family is 'sd3'")
    # and the other way round: an SD3 file with model_family flux1
    flux_files = {"clip_l": parts["clip_l"], "t5xxl": parts["t5xxl"], "ae": parts["vae"]}
    texts = [text for _, _, text in errors(config(parts["model"], "flux1", **flux_files), tmp_path)]
    assert texts[0].startswith("model.pretrained_model_name_or_path: this is an SD3.5 large model, not a FLUX.1")
    [(_, _, text)] = errors(config(parts["clip_l"]), tmp_path)
    assert "not an SD3 / SD3.5 model (no joint_blocks.* keys)" in text


def test_the_doctor_reports_them_with_the_dataset(tiny_models, tmp_path):
    path = sd3_file(tmp_path / "sd3_medium.safetensors", "medium", embedded=("clip_l", "t5xxl", "vae"))
    data = deep_merge(default_config_dict(), {
        "model": {"model_family": "auto", "pretrained_model_name_or_path": str(path)},
        "dataset": {"train_data_dir": str(tiny_models["dataset_img"]), "general": {"bucket_reso_steps": 64}}})
    report = run_doctor(validate_config(data, check_packages=False), tmp_path, quick=True).to_dict()
    assert not report["ok"]
    [missing] = [f for f in report["findings"] if f["code"] == "model-component-missing"]
    assert missing["message"].startswith("model.clip_g: not set")
    assert [f["message"][:18] for f in report["findings"] if f["code"] == "model-detected"] == ["an SD3 medium mode"]


def test_the_checks_stay_light(tmp_path):
    """The GUI process runs them: no torch, safetensors, transformers or diffusers get imported."""
    path = sd3_file(tmp_path / "sd3.5_medium.safetensors", "5-medium")
    code = ("import sys; from pathlib import Path; from engine.data.model_findings import model_findings; "
            "from engine.config.io import deep_merge, default_config_dict, validate_config; "
            f"data = deep_merge(default_config_dict(), {{'model': {{'model_family': 'auto', "
            f"'pretrained_model_name_or_path': {str(path)!r}}}}}); "
            "[finding] = model_findings(validate_config(data, check_packages=False), Path('.')); "
            "assert finding.code == 'model-detected', finding; "
            "print(sorted(m for m in ('torch', 'safetensors', 'transformers', 'diffusers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("variant", ["medium", "5-medium", "5-large"])
def test_the_tiny_sd3_files(variant, tmp_path):
    """The writer's real files (tests/sd3_tiny.py): the same verdicts as the hand-written headers."""
    from sd3_tiny import tiny_sd3_files

    files, incl = tiny_sd3_files(variant), tiny_sd3_files(variant, embedded=True)
    label = {"medium": "SD3 medium", "5-medium": "SD3.5 medium", "5-large": "SD3.5 large"}[variant]
    [(severity, _, _, text)] = found(config(incl["model"], "auto"), tmp_path)
    assert severity == "info" and text.startswith(f"an {label} model (2 joint blocks); CLIP-L inside the file, "
                                                  "CLIP-G inside the file, T5-XXL inside the file, VAE inside the file")
    separate = {name: files[name] for name in ("clip_l", "clip_g", "t5xxl")}
    [(severity, _, _, text)] = found(config(files["model"], **separate), tmp_path)
    assert "CLIP-L from model.clip_l, CLIP-G from model.clip_g, T5-XXL from model.t5xxl, VAE inside the file" in text
    del separate["clip_g"]
    assert [text.split(" ->")[0] for _, _, text in errors(config(files["model"], **separate), tmp_path)] == [
        "model.clip_g: not set, and the SD3 file holds no CLIP-G (text_encoders.clip_g.transformer.* keys)"]
    # CLIP-G's file given as T5, T5's as CLIP-L: each named
    swapped = errors(config(files["model"], clip_l=files["t5xxl"], clip_g=files["clip_g"], t5xxl=files["clip_g"]),
                     tmp_path)
    assert [text.split(" (")[0] for _, _, text in swapped] == ["model.clip_l: not a CLIP text encoder",
                                                               "model.t5xxl: not a T5 encoder"]
