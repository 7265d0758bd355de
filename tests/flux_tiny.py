"""Tiny FLUX.1 dev / schnell and Chroma models for tests: BFL single files, offline, deterministic (fixed seeds).

:func:`write_tiny_flux` writes, into a folder:

* ``flux1-<variant>.safetensors``: the transformer, ``Flux(tiny params).state_dict()`` in BFL naming (hidden 64,
  2 heads of 32, 2 double + 2 single blocks, T5 width 32, CLIP width 32; Chroma: approximator 32 wide, 2 deep);
* ``clip_l.safetensors``: a 2-layer, 32-wide CLIP text model with CLIP's real 49408-token vocabulary, keys under
  ``text_model.`` plus an unused ``text_projection.weight``, as the published file;
* ``t5xxl.safetensors``: a 2-layer T5 v1.1 encoder (gated-GELU, d_model 32, 2 heads of d_kv 8, d_ff 37) storing
  ``shared.weight`` once, as the published file; ``t5_tokenizer/``: a small SentencePiece-style (Unigram) T5
  tokenizer for it, built without any hub;
* ``ae.safetensors``: a 16-channel AE (4 blocks 32/32/64/64, so 8× downsampling) in BFL/LDM naming, no quant convs.

Every weight is perturbed from its initial value, so norms are not all ones and a swapped or misnamed tensor
changes outputs. :func:`tiny_flux_files` caches the files under ``$ATELIER_TINY_MODELS/flux-<variant>`` when that
is set (stamped, like tools/make_tiny_model.py), else in a temp folder per test process; :func:`write_tiny_diffusers`
turns them into a diffusers pipeline folder (transformer converted by ``engine.models.flux.convert``, two shards).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

VARIANTS = ("dev", "schnell", "chroma")
VERSION = "1"  # bump to rebuild cached files
STAMP = ".atelier-tiny-flux-stamp"
SEEDS = {"dev": 1200, "schnell": 1300, "chroma": 1400, "clip": 1500, "t5": 1600, "ae": 1700}
TEXT_WIDTH = 32  # T5 d_model (context_in_dim) and CLIP width (vec_in_dim) of the tiny transformer
T5_VOCAB = 96
_WORDS = ["a", "photo", "of", "sks", "cat", "dog", "red", "square", "circle", "blue", "the", "and", "on", "with", "in"]
_TEMP_ROOT: Path | None = None


def tiny_params(variant: str) -> Any:
    """The tiny ``FluxParams`` of ``variant`` ("dev", "schnell" or "chroma")."""
    from engine.models.flux.params import FluxParams

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return FluxParams(in_channels=64, vec_in_dim=TEXT_WIDTH, context_in_dim=TEXT_WIDTH, hidden_size=64, num_heads=2,
                      depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14), guidance_embed=variant == "dev",
                      chroma=variant == "chroma", approximator_hidden=32, approximator_depth=2)


def _perturbed(module: Any, seed: int) -> Any:
    """Seeded small noise on every parameter (norm scales of one, zero biases would hide swapped tensors)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module.eval()


def tiny_transformer(variant: str) -> Any:
    import torch

    from engine.models.flux.transformer import Flux

    torch.manual_seed(SEEDS[variant])
    return _perturbed(Flux(tiny_params(variant)), SEEDS[variant])


def _t5_pieces() -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"▁{word}", -2.0) for word in _WORDS), ("▁", -3.0)]
    return pieces + [(char, -5.0) for char in string.ascii_lowercase + string.digits + string.punctuation]


def tiny_t5_tokenizer() -> Any:
    """A Unigram T5 tokenizer: pad 0, EOS 1, unk 2, a few words, then single characters."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=_t5_pieces(), extra_ids=0)


def write_spiece_tokenizer(folder: str | Path, extra_ids: int = 0) -> Path:
    """The tiny tokenizer laid out as google/t5-v1_1-xxl ships it: ``spiece.model`` (a SentencePiece protobuf,
    Unigram, pad/EOS as control pieces), ``tokenizer_config.json`` and ``special_tokens_map.json``, no
    ``tokenizer.json``."""
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    for index, (text, score) in enumerate(_t5_pieces()):
        piece = proto.pieces.add()
        piece.piece, piece.score = text, score
        piece.type = 3 if index < 2 else 2 if index == 2 else 1  # control, unknown, normal
    proto.trainer_spec.model_type = 1  # Unigram
    proto.trainer_spec.pad_id, proto.trainer_spec.eos_id, proto.trainer_spec.unk_id = 0, 1, 2
    proto.trainer_spec.bos_id = -1
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(proto.SerializeToString())
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**specials, "extra_ids": extra_ids,
                                                              "model_max_length": 512}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    return folder


def tiny_clip() -> Any:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    # As the published CLIP-L config: quick-GELU, legacy eos_token_id 2 (pooling at the highest id, the EOS); one
    # head of 64 or fewer, as the loader infers (width // 64, at least 1).
    config = CLIPTextConfig(hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
                            max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
                            projection_dim=TEXT_WIDTH, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(SEEDS["clip"])
    return _perturbed(CLIPTextModel(config), SEEDS["clip"])


def tiny_t5(d_model: int = TEXT_WIDTH, seed: int = SEEDS["t5"]) -> Any:
    """A 2-layer T5 v1.1 encoder (gated-GELU, 2 heads of 8, d_ff 37); SD3's tiny T5 is the same, wider."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=T5_VOCAB, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return _perturbed(T5EncoderModel(config), seed)


def tiny_ae(scaling_factor: float = 0.3611, shift_factor: float = 0.1159, seed: int = SEEDS["ae"]) -> Any:
    """A diffusers AutoencoderKL shaped like FLUX's AE (16 latent channels, no quant convs), 4 blocks; SD3's VAE
    has the same shape with its own scale and shift."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                       layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=64,
                       scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                       use_post_quant_conv=False)
    return _perturbed(ae, seed)


def ae_to_bfl(ae_state: dict[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL state dict → BFL ``ae.safetensors`` keys (LDM naming without the prefix)."""
    from engine.models.ldm_keys import VAE_PREFIX, vae_to_ldm

    return {key.removeprefix(VAE_PREFIX): tensor.contiguous() for key, tensor in vae_to_ldm(ae_state).items()}


def write_tiny_flux(folder: str | Path, variant: str = "dev") -> dict[str, Path]:
    """Write the tiny model files of ``variant`` into ``folder`` and return their paths.

    Returns:
        ``model`` (transformer), ``clip_l``, ``t5xxl``, ``ae`` (files) and ``t5_tokenizer`` (folder).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = _paths(folder, variant)
    save_file({k: v.contiguous() for k, v in tiny_transformer(variant).state_dict().items()}, str(paths["model"]))
    clip = {f"text_model.{key}": tensor.contiguous() for key, tensor in tiny_clip().state_dict().items()}
    import torch

    clip["text_projection.weight"] = torch.zeros(TEXT_WIDTH, TEXT_WIDTH)  # in the published file, unused by FLUX
    save_file(clip, str(paths["clip_l"]))
    t5 = {key: tensor.contiguous() for key, tensor in tiny_t5().state_dict().items()
          if key != "encoder.embed_tokens.weight"}  # tied to shared.weight; the published file stores it once
    save_file(t5, str(paths["t5xxl"]))
    save_file(ae_to_bfl(tiny_ae().state_dict()), str(paths["ae"]))
    tiny_t5_tokenizer().save_pretrained(str(paths["t5_tokenizer"]))
    return paths


def _paths(folder: Path, variant: str) -> dict[str, Path]:
    name = "chroma" if variant == "chroma" else f"flux1-{variant}"
    return {"model": folder / f"{name}.safetensors", "clip_l": folder / "clip_l.safetensors",
            "t5xxl": folder / "t5xxl.safetensors", "ae": folder / "ae.safetensors",
            "t5_tokenizer": folder / "t5_tokenizer"}


def tiny_flux_files(variant: str = "dev") -> dict[str, Path]:
    """The tiny files of ``variant``, built once: under ``$ATELIER_TINY_MODELS/flux-<variant>`` (kept between
    sessions, rebuilt when :data:`VERSION` changes) or a temp folder of this process."""
    global _TEMP_ROOT
    configured = os.environ.get("ATELIER_TINY_MODELS")
    if configured:
        root = Path(configured)
    else:
        if _TEMP_ROOT is None:
            _TEMP_ROOT = Path(tempfile.mkdtemp(prefix="atelier-tiny-flux-"))
        root = _TEMP_ROOT
    folder = root / f"flux-{variant}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".flux-build.lock", "w") as lock:  # parallel test workers build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = folder / STAMP
        if not (stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == f"{variant}-{VERSION}"):
            shutil.rmtree(folder, ignore_errors=True)
            write_tiny_flux(folder, variant)
            stamp.write_text(f"{variant}-{VERSION}\n", encoding="utf-8")
    return _paths(folder, variant)


def write_tiny_diffusers(files: dict[str, Path], folder: str | Path, variant: str = "dev") -> Path:
    """A diffusers pipeline folder holding the same weights as ``files`` (from :func:`tiny_flux_files`).

    The transformer is converted from the BFL file by ``engine.models.flux.convert.bfl_to_diffusers`` and written in
    two shards with an index; the encoders, AE and tokenizers are the same seeded models, saved by diffusers and
    transformers. FLUX.1: CLIP-L in text_encoder/, T5 in text_encoder_2/; Chroma: T5 in text_encoder/.
    """
    from safetensors.torch import load_file, save_file

    from engine.models.flux.convert import bfl_to_diffusers
    from engine.models.tokenizers import load_tokenizer

    folder = Path(folder)
    converted, leftover = bfl_to_diffusers(load_file(str(files["model"])))
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
    (transformer / "config.json").write_text(json.dumps(diffusers_transformer_config(variant)), encoding="utf-8")
    tiny_ae().save_pretrained(str(folder / "vae"))
    t5_encoder, t5_tokenizer = ("text_encoder", "tokenizer") if variant == "chroma" else \
        ("text_encoder_2", "tokenizer_2")
    tiny_t5().save_pretrained(str(folder / t5_encoder))
    tiny_t5_tokenizer().save_pretrained(str(folder / t5_tokenizer))
    components: dict[str, Any] = {t5_encoder: ["transformers", "T5EncoderModel"],
                                  t5_tokenizer: ["transformers", "T5TokenizerFast"]}
    if variant != "chroma":
        tiny_clip().save_pretrained(str(folder / "text_encoder"))
        load_tokenizer("sd1").save_pretrained(str(folder / "tokenizer"))
        components.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    scheduler = folder / "scheduler"
    scheduler.mkdir()
    (scheduler / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
         "use_dynamic_shifting": variant != "schnell"}), encoding="utf-8")
    pipeline = "ChromaPipeline" if variant == "chroma" else "FluxPipeline"
    cls = "ChromaTransformer2DModel" if variant == "chroma" else "FluxTransformer2DModel"
    index_json = {"_class_name": pipeline, "transformer": ["diffusers", cls], "vae": ["diffusers", "AutoencoderKL"],
                  "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], **components}
    (folder / "model_index.json").write_text(json.dumps(index_json), encoding="utf-8")
    return folder


def diffusers_transformer_config(variant: str) -> dict[str, Any]:
    """The diffusers ``FluxTransformer2DModel`` / ``ChromaTransformer2DModel`` config of the tiny transformer."""
    params = tiny_params(variant)
    config: dict[str, Any] = {"patch_size": 1, "in_channels": params.in_channels, "num_layers": params.depth,
                              "num_single_layers": params.depth_single_blocks, "attention_head_dim": params.head_dim,
                              "num_attention_heads": params.num_heads, "joint_attention_dim": params.context_in_dim,
                              "axes_dims_rope": list(params.axes_dim)}
    if variant == "chroma":
        return {"_class_name": "ChromaTransformer2DModel", **config,
                "approximator_num_channels": params.approximator_in_dim,
                "approximator_hidden_dim": params.approximator_hidden, "approximator_layers": params.approximator_depth}
    return {"_class_name": "FluxTransformer2DModel", **config, "pooled_projection_dim": params.vec_in_dim,
            "guidance_embeds": params.guidance_embed}
