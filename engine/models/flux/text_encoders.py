"""CLIP-L and T5-XXL for FLUX.1 / Chroma, from separate files or a diffusers folder, offline (spec §1.4, §1.5).

Separate files (``model.clip_l``, ``model.t5xxl``) carry no config: it is read off the tensor shapes, so the real
files and the tests' tiny ones load the same way.

* CLIP-L (``clip_l.safetensors``, Hugging Face ``CLIPTextModel`` keys, with or without ``text_model.``): width,
  layers, MLP width, vocabulary and positions from the shapes; heads = width / 64 (at least 1), OpenAI CLIP's
  quick-GELU, and the legacy ``eos_token_id`` 2 of the published config, so the pooled output is taken at the
  highest token id (the EOS), as in BFL and sd-scripts (spec §3.2). ``text_projection`` is not used by FLUX;
  SD3 builds ``CLIPTextModelWithProjection`` (CLIP-L and CLIP-G) through :func:`load_clip_text_model`, keeping it.
* T5 (``t5xxl_fp16.safetensors``, ``T5EncoderModel`` keys): d_model and vocabulary from ``shared``, layers from
  the blocks, heads from ``relative_attention_bias`` [buckets, heads], d_kv = query rows / heads, d_ff from
  ``wi_0``; gated-GELU (T5 v1.1). A file in another layout is refused, naming it (the size is not checked: tiny
  encoders of the same layout load).

Modules are built on the meta device and the file's tensors assigned into them, so a 9 GB T5 is never
initialised randomly first. The identity (``text_encoders_identity``) is taken before the cast to the load dtype,
from the stored values, so it is the same whether the weights come from the files or a diffusers folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.configs import shipped_configs
from engine.models.flux.files import check_not_adapter, read_flux_header, read_state
from engine.models.single_file import FileHeader, ModelLoadError

if TYPE_CHECKING:
    import torch

__all__ = ["CLIP_PREFIXES", "clip_config_from_shapes", "load_clip_l", "load_clip_text_model", "load_t5xxl",
           "t5_config_from_shapes"]

# Where a CLIP text model's keys sit in the files that hold one (SAI's SD3 all-in-one files: text_encoders.clip_l.*).
CLIP_PREFIXES = ("text_model.", "transformer.text_model.", "cond_stage_model.transformer.text_model.",
                 "text_encoders.clip_l.transformer.text_model.")
_CLIP_MARKER = "embeddings.token_embedding.weight"
_CLIP_PROJECTION = "text_projection.weight"
_CLIP_UNUSED = (_CLIP_PROJECTION, "logit_scale", "embeddings.position_ids")
_T5_PREFIXES = ("", "t5xxl.transformer.", "transformer.", "text_encoders.t5xxl.transformer.")
_T5_LAYER = "encoder.block.0.layer."
_T5_REQUIRED = ("shared.weight", _T5_LAYER + "0.SelfAttention.q.weight",
                _T5_LAYER + "0.SelfAttention.relative_attention_bias.weight", "encoder.final_layer_norm.weight")
_T5_GATED = (_T5_LAYER + "1.DenseReluDense.wi_0.weight", _T5_LAYER + "1.DenseReluDense.wi_1.weight")
_T5_UNUSED = ("decoder.", "lm_head.")  # a whole T5 (encoder + decoder) file: only the encoder is used
_CLIP_HEAD_WIDTH = 64


def _count(keys: Any, pattern: str) -> int:
    regex = re.compile(pattern)
    return max((int(match[1]) for key in keys if (match := regex.match(key))), default=-1) + 1


# --- CLIP-L ------------------------------------------------------------------------------------------------------


def clip_config_from_shapes(shapes: dict[str, tuple[int, ...]], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``CLIPTextConfig`` keyword arguments for a prefix-free CLIP text model's tensor shapes.

    Args:
        shapes: the tensor shapes (a ``text_projection.weight`` [projection, width] among them sets the projection).
        base: the published config the sizes are put into (default OpenAI CLIP ViT-L/14's: quick-GELU); what the
            shapes cannot tell (the activation, the special token ids) comes from it.
    """
    vocab, hidden = shapes[_CLIP_MARKER]
    config = dict(base if base is not None else shipped_configs("sd1")["text_encoder"])
    for key in ("architectures", "transformers_version", "torch_dtype", "_name_or_path"):
        config.pop(key, None)
    config.update(
        hidden_size=hidden,
        vocab_size=vocab,
        max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
        num_hidden_layers=_count(shapes, r"encoder\.layers\.(\d+)\."),
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_attention_heads=max(1, hidden // _CLIP_HEAD_WIDTH),
        projection_dim=shapes.get(_CLIP_PROJECTION, (hidden,))[0],
    )
    return config


def load_clip_l(location: str | Path, *, what: str = "model.clip_l") -> Any:
    """CLIP-L (float32 or the file's dtype, on the CPU) from ``clip_l.safetensors`` or a diffusers
    ``text_encoder/`` folder.

    Raises:
        ModelLoadError: a missing file or folder, a LoRA, or a file that is no CLIP text model (naming it).
    """
    return load_clip_text_model(location, what=what)


def load_clip_text_model(location: str | Path, *, what: str = "model.clip_l", prefixes: tuple[str, ...] = CLIP_PREFIXES,
                         projection: bool = False, base: dict[str, Any] | None = None,
                         label: str = "CLIP-L's file (clip_l.safetensors)") -> Any:
    """A CLIP text model from a file (config read off the shapes) or a diffusers ``text_encoder*/`` folder.

    Args:
        location: the file or folder.
        what: the config key it came from, for messages.
        prefixes: where the ``text_model`` keys may sit in the file, tried in order after "" (no prefix).
        projection: build a ``CLIPTextModelWithProjection`` (SD3) whose ``text_projection`` is the file's, or the
            identity when the file has none (sd-scripts' rule for CLIP-L); else a ``CLIPTextModel`` (FLUX).
        base: the published config the sizes go into (see :func:`clip_config_from_shapes`).
        label: what ``what`` must be, for messages.

    Raises:
        ModelLoadError: a missing file or folder, a LoRA, or a file that is no CLIP text model (naming it).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    path = Path(location).expanduser()
    if path.is_dir():
        return _from_pretrained(model_class, path, what)
    header = read_flux_header(path, what)
    check_not_adapter(header, what)
    prefix = next((p for p in ("", *prefixes) if p + _CLIP_MARKER in header.shapes), None)
    if prefix is None:
        raise ModelLoadError(f"{path}: not a CLIP text encoder (no {_CLIP_MARKER}){_what_it_is(header)}; {what} must "
                             f"be {label} or a diffusers text_encoder/ folder")
    names = {key[len(prefix):]: key for key in header.shapes
             if key.startswith(prefix) and not key[len(prefix):].startswith(_CLIP_UNUSED)}
    shapes = {name: header.shapes[key] for name, key in names.items()}
    # text_projection sits beside text_model (text_encoders.clip_g.transformer.text_projection.weight)
    projection_key = prefix.removesuffix("text_model.") + _CLIP_PROJECTION
    if projection and projection_key in header.shapes:
        shapes[_CLIP_PROJECTION] = header.shapes[projection_key]
    try:
        config = CLIPTextConfig(**clip_config_from_shapes(shapes, base))
    except KeyError as error:
        raise ModelLoadError(f"{path}: an incomplete CLIP text model (no {error}); check {what}") from error
    state = _read_stored(path, names)
    if projection:
        state = {f"text_model.{name}": tensor for name, tensor in state.items()}
        state[_CLIP_PROJECTION] = _projection(path, projection_key, header, config.hidden_size, state)
    model = _assigned(model_class, config, state, path, what)
    _restore_position_ids(model)
    return model


def _projection(path: Path, key: str, header: FileHeader, width: int, state: dict[str, Any]) -> Any:
    """The file's ``text_projection`` weight, or the identity (sd-scripts' rule for CLIP-L files without one)."""
    import torch

    if key in header.shapes:
        return _read_stored(path, {_CLIP_PROJECTION: key})[_CLIP_PROJECTION]
    dtype = next(iter(state.values())).dtype
    return torch.eye(width, dtype=dtype)


def _restore_position_ids(model: Any) -> None:
    """``position_ids`` is a non-persistent buffer: no file holds it, so the meta-built module needs it set."""
    import torch

    embeddings = model.embeddings if hasattr(model, "embeddings") else model.text_model.embeddings
    count = embeddings.position_embedding.weight.shape[0]
    embeddings.register_buffer("position_ids", torch.arange(count).expand((1, -1)), persistent=False)


# --- T5 -------------------------------------------------------------------------------------------------------------


def t5_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``T5Config`` keyword arguments for a prefix-free T5 encoder's tensor shapes (T5 v1.1, gated-GELU)."""
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes[_T5_LAYER + "0.SelfAttention.relative_attention_bias.weight"]
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": shapes[_T5_LAYER + "0.SelfAttention.q.weight"][0] // heads,
        "d_ff": shapes[_T5_GATED[0]][0],
        "num_layers": _count(shapes, r"encoder\.block\.(\d+)\."),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",  # dense_act_fn gelu_new, as google/t5-v1_1-xxl
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.1,
        "is_encoder_decoder": False,
        "use_cache": False,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def load_t5xxl(location: str | Path, *, what: str = "model.t5xxl") -> Any:
    """The T5 encoder (in the file's dtype, fp8 cast up; on the CPU) from ``t5xxl_fp16.safetensors`` (or the fp8
    e4m3fn file) or a diffusers ``text_encoder_2/`` folder.

    Raises:
        ModelLoadError: a missing file, a LoRA, or a file that is not a T5 v1.1 encoder layout (naming it).
    """
    from transformers import T5Config, T5EncoderModel

    path = Path(location).expanduser()
    if path.is_dir():
        return _from_pretrained(T5EncoderModel, path, what)
    header = read_flux_header(path, what)
    check_not_adapter(header, what)
    prefix = next((p for p in _T5_PREFIXES if all(p + key in header.shapes for key in _T5_REQUIRED)), None)
    if prefix is None:
        raise ModelLoadError(f"{path}: not a T5 encoder (expected shared.weight, encoder.block.N.layer.* and "
                             f"encoder.final_layer_norm){_what_it_is(header)}; {what} must be T5-XXL's file "
                             "(t5xxl_fp16.safetensors) or a diffusers text_encoder_2/ folder")
    if not all(prefix + key in header.shapes for key in _T5_GATED):
        raise ModelLoadError(f"{path}: a T5 v1.0 encoder (no gated wi_0/wi_1 feed-forward); FLUX, Chroma and SD3 "
                             f"use T5 v1.1 XXL (t5xxl_fp16.safetensors); check {what}")
    names = {key[len(prefix):]: key for key in header.shapes
             if key.startswith(prefix) and not key[len(prefix):].startswith(_T5_UNUSED)}
    config = T5Config(**t5_config_from_shapes({name: header.shapes[key] for name, key in names.items()}))
    state = _read_stored(path, names)
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])  # tied: files mostly store it once
    return _assigned(T5EncoderModel, config, state, path, what)


# --- shared ---------------------------------------------------------------------------------------------------------


def _read_stored(path: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors in the file's dtype; fp8 (e4m3fn) ones cast up to bfloat16, the dtype fp8 T5 files come from."""
    import torch

    state = read_state(path, names, dtype=None, keep_fp8=True)
    return {name: t.to(torch.bfloat16) if t.dtype == torch.float8_e4m3fn else t for name, t in state.items()}


def _assigned(model_class: Any, config: Any, state: dict[str, torch.Tensor], path: Path, what: str) -> Any:
    import torch

    with torch.device("meta"):
        model = model_class(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ModelLoadError(f"{path}: the weights do not fit the {model_class.__name__} read off their shapes "
                             f"({error}); check {what}") from error
    return model.eval()


def _from_pretrained(model_class: Any, folder: Path, what: str) -> Any:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: a folder without config.json; {what} must be a model file or a diffusers "
                             f"{model_class.__name__} folder")
    try:
        return model_class.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{folder}: cannot load {model_class.__name__} ({error}); check {what}") from error


def _what_it_is(header: FileHeader) -> str:
    keys = header.shapes
    if any("double_blocks." in key for key in keys):
        return " (it looks like a FLUX transformer)"
    if any(key.removeprefix("model.diffusion_model.").startswith("joint_blocks.") for key in keys):
        return " (it looks like an SD3 transformer)"
    if any(key.startswith(("encoder.down.", "decoder.up.")) for key in keys):
        return " (it looks like an AE/VAE)"
    if any(key.startswith(CLIP_PREFIXES) or key.startswith("embeddings.token_embedding") for key in keys):
        return " (it looks like a CLIP text encoder)"
    if any(key.startswith("shared.") or key.startswith("encoder.block.") for key in keys):
        return " (it looks like a T5 encoder)"
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return " (it looks like an SD checkpoint)"
    return ""


def read_config_class(folder: Path) -> str | None:
    """The ``architectures[0]`` of a transformers folder's config (which encoder a diffusers subfolder holds)."""
    try:
        return (json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or [None])[0]
    except (OSError, ValueError, AttributeError):
        return None
