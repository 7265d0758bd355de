"""Tiny SD3 medium / SD3.5 medium / SD3.5 large models for tests: SAI single files, offline, deterministic.

:func:`write_tiny_sd3` writes, into a folder:

* ``sd3-<variant>.safetensors``: Stability's layout, ``model.diffusion_model.*`` (``MMDiT(tiny_params(variant))``:
  2 joint blocks, hidden 128, context 64, pooled 64; qk-norm for 5-*, attn2 on block 0 for 5-medium) and
  ``first_stage_model.*`` (a 16-channel VAE in LDM names, 4 blocks 32/32/64/64, no quant convs);
* ``sd3-<variant>-incl-te.safetensors``: the same plus ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``, as
  Stability's "incl_clips" files;
* ``clip_l.safetensors`` (2 layers, width 32, projection 32, quick-GELU) and ``clip_g.safetensors`` (3 layers,
  width 32, projection 32, GELU), both ``CLIPTextModelWithProjection`` keys (``text_model.*``,
  ``text_projection.weight``) with CLIP's real 49408-token vocabulary;
* ``t5xxl.safetensors``: a 2-layer T5 v1.1 encoder of width 64 storing ``shared.weight`` once; ``t5_tokenizer/``:
  the tiny T5 tokenizer of tests/flux_tiny.py.

Every weight is perturbed from its initial value, so that a swapped or misnamed tensor changes outputs.
:func:`tiny_sd3_files` caches the files under ``$ATELIER_TINY_MODELS/sd3-<variant>`` when that is set (stamped), else
in a temp folder per test process; :func:`write_tiny_sd3_diffusers` turns them into a StableDiffusion3Pipeline folder
(transformer converted by ``engine.models.sd3.convert``, two shards).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import flux_tiny
from flux_tiny import _perturbed, tiny_t5_tokenizer

VARIANTS = ("medium", "5-medium", "5-large")
VERSION = "1"  # bump to rebuild cached files
STAMP = ".atelier-tiny-sd3-stamp"
SEEDS = {"medium": 2100, "5-medium": 2200, "5-large": 2300, "clip_l": 2400, "clip_g": 2500, "t5": 2600, "vae": 2700}
CLIP_WIDTH = 32  # both CLIPs: widths 32 + 32 ≤ context 64, projections 32 + 32 = adm_in_channels 64
T5_WIDTH = 64  # context_in_dim of the tiny MMDiT
SAI_PREFIX = "model.diffusion_model."
EMBEDDED = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
            "t5xxl": "text_encoders.t5xxl.transformer."}
_TEMP_ROOT: Path | None = None


def tiny_mmdit(variant: str) -> Any:
    import torch

    from engine.models.sd3.mmdit import MMDiT
    from engine.models.sd3.params import tiny_params

    torch.manual_seed(SEEDS[variant])
    return _perturbed(MMDiT(tiny_params(variant)), SEEDS[variant])


def _clip(seed: int, layers: int, act: str, intermediate: int) -> Any:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    # The published configs' special ids (legacy eos_token_id 2: pooled at the highest id, the EOS); one head of 64
    # or fewer, as the loader infers (width // 64, at least 1).
    config = CLIPTextConfig(hidden_size=CLIP_WIDTH, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=1, max_position_embeddings=77, vocab_size=49408, hidden_act=act,
                            projection_dim=CLIP_WIDTH, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(seed)
    return _perturbed(CLIPTextModelWithProjection(config), seed)


def tiny_clip_l() -> Any:
    """CLIP-L shaped as OpenAI's ViT-L/14 text model (quick-GELU), with projection."""
    return _clip(SEEDS["clip_l"], 2, "quick_gelu", 37)


def tiny_clip_g() -> Any:
    """CLIP-G shaped as OpenCLIP bigG's text model (GELU), with projection; one more layer than CLIP-L."""
    return _clip(SEEDS["clip_g"], 3, "gelu", 41)


def tiny_t5() -> Any:
    """FLUX's tiny T5 at the tiny MMDiT's context width."""
    return flux_tiny.tiny_t5(T5_WIDTH, SEEDS["t5"])


def tiny_vae() -> Any:
    """A diffusers AutoencoderKL shaped like SD3's VAE (16 latent channels, no quant convs), 4 blocks."""
    return flux_tiny.tiny_ae(1.5305, 0.0609, SEEDS["vae"])


def t5_file_state(t5: Any) -> dict[str, Any]:
    """T5's keys as the published file stores them: ``shared.weight`` once (``encoder.embed_tokens`` is tied)."""
    return {key: tensor.contiguous() for key, tensor in t5.state_dict().items() if key != "encoder.embed_tokens.weight"}


def sai_state(variant: str) -> dict[str, Any]:
    """The SAI single file's tensors: the MMDiT under ``model.diffusion_model.`` and the VAE under
    ``first_stage_model.`` (LDM names)."""
    from engine.models.ldm_keys import vae_to_ldm

    state = {SAI_PREFIX + key: tensor.contiguous() for key, tensor in tiny_mmdit(variant).state_dict().items()}
    state.update({key: tensor.contiguous() for key, tensor in vae_to_ldm(tiny_vae().state_dict()).items()})
    return state


def write_tiny_sd3(folder: str | Path, variant: str = "medium") -> dict[str, Path]:
    """Write the tiny files of ``variant`` into ``folder`` (see the module docstring) and return their paths."""
    from safetensors.torch import save_file

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = _paths(folder, variant, embedded=False)
    state = sai_state(variant)
    save_file(state, str(paths["model"]))
    clip_l = {key: tensor.contiguous() for key, tensor in tiny_clip_l().state_dict().items()}
    clip_g = {key: tensor.contiguous() for key, tensor in tiny_clip_g().state_dict().items()}
    t5 = t5_file_state(tiny_t5())
    save_file(clip_l, str(paths["clip_l"]))
    save_file(clip_g, str(paths["clip_g"]))
    save_file(t5, str(paths["t5xxl"]))
    for part, tensors in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5)):
        state.update({EMBEDDED[part] + key: tensor for key, tensor in tensors.items()})
    save_file(state, str(_paths(folder, variant, embedded=True)["model"]))
    tiny_t5_tokenizer().save_pretrained(str(paths["t5_tokenizer"]))
    return paths


def _paths(folder: Path, variant: str, embedded: bool) -> dict[str, Path]:
    name = f"sd3-{variant}-incl-te" if embedded else f"sd3-{variant}"
    return {"model": folder / f"{name}.safetensors", "clip_l": folder / "clip_l.safetensors",
            "clip_g": folder / "clip_g.safetensors", "t5xxl": folder / "t5xxl.safetensors",
            "t5_tokenizer": folder / "t5_tokenizer"}


def tiny_sd3_files(variant: str = "medium", embedded: bool = False) -> dict[str, Path]:
    """The tiny files of ``variant``, built once: under ``$ATELIER_TINY_MODELS/sd3-<variant>`` (kept between sessions,
    rebuilt when :data:`VERSION` changes) or a temp folder of this process.

    Returns:
        ``model`` (the single file; with ``embedded`` the one holding the text encoders too), ``clip_l``,
        ``clip_g``, ``t5xxl`` (files) and ``t5_tokenizer`` (folder).
    """
    global _TEMP_ROOT
    configured = os.environ.get("ATELIER_TINY_MODELS")
    if configured:
        root = Path(configured)
    else:
        if _TEMP_ROOT is None:
            _TEMP_ROOT = Path(tempfile.mkdtemp(prefix="atelier-tiny-sd3-"))
        root = _TEMP_ROOT
    folder = root / f"sd3-{variant}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".sd3-build.lock", "w") as lock:  # parallel test workers build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = folder / STAMP
        if not (stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == f"{variant}-{VERSION}"):
            shutil.rmtree(folder, ignore_errors=True)
            write_tiny_sd3(folder, variant)
            stamp.write_text(f"{variant}-{VERSION}\n", encoding="utf-8")
    return _paths(folder, variant, embedded)


def write_tiny_sd3_diffusers(files: dict[str, Path], folder: str | Path) -> Path:
    """A StableDiffusion3Pipeline folder holding the same weights as ``files`` (from :func:`tiny_sd3_files`).

    The transformer is converted from the SAI file by ``engine.models.sd3.convert.sai_to_diffusers`` and written in
    two shards with an index; the encoders, VAE and tokenizers are the same seeded models, saved by diffusers and
    transformers (CLIP-L in text_encoder/, CLIP-G in text_encoder_2/, T5 in text_encoder_3/).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from engine.models.sd3.convert import diffusers_config, sai_to_diffusers
    from engine.models.sd3.params import params_from_state_dict
    from engine.models.tokenizers import load_tokenizer

    folder = Path(folder)
    with safe_open(str(files["model"]), "pt") as handle:
        sai = {key.removeprefix(SAI_PREFIX): handle.get_tensor(key) for key in handle.keys()  # noqa: SIM118
               if key.startswith(SAI_PREFIX)}
    converted, leftover = sai_to_diffusers(sai)
    assert not leftover, leftover
    transformer = folder / "transformer"
    transformer.mkdir(parents=True)
    keys = sorted(converted)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({key: converted[key].contiguous() for key in shard_keys}, str(transformer / name))
    index = {"metadata": {}, "weight_map": {key: name for name, ks in shards.items() for key in ks}}
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    config = diffusers_config(params_from_state_dict({key: tuple(t.shape) for key, t in sai.items()}))
    config = {"_class_name": "SD3Transformer2DModel", **config, "dual_attention_layers": list(
        config["dual_attention_layers"])}
    (transformer / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tiny_vae().save_pretrained(str(folder / "vae"))
    tiny_clip_l().save_pretrained(str(folder / "text_encoder"))
    tiny_clip_g().save_pretrained(str(folder / "text_encoder_2"))
    tiny_t5().save_pretrained(str(folder / "text_encoder_3"))
    load_tokenizer("sd1").save_pretrained(str(folder / "tokenizer"))
    load_tokenizer("sdxl", "tokenizer_2").save_pretrained(str(folder / "tokenizer_2"))
    tiny_t5_tokenizer().save_pretrained(str(folder / "tokenizer_3"))
    scheduler = folder / "scheduler"
    scheduler.mkdir()
    (scheduler / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}),
        encoding="utf-8")
    model_index = {"_class_name": "StableDiffusion3Pipeline",
                   "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                   "text_encoder_3": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                   "tokenizer_3": ["transformers", "T5TokenizerFast"],
                   "image_encoder": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(model_index), encoding="utf-8")
    return folder
