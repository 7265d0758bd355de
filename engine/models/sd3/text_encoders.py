"""CLIP-L, CLIP-G and T5-XXL of SD3 / SD3.5 with their tokenizers, offline (spec §8.1, §8.3).

Each encoder comes from the first of:

1. its own file or folder (``model.clip_l``, ``model.clip_g``, ``model.t5xxl``): separate files win;
2. the model's single file when it embeds it (``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``);
3. the diffusers folder's ``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (CLIP-G), ``text_encoder_3/`` (T5);

else the error names the config key to set. The files are read by the FLUX loaders
(``engine.models.flux.text_encoders``): configs from the tensor shapes, modules built on the meta device. Both CLIPs
are ``CLIPTextModelWithProjection`` (SD3 conditions on their projected pooled outputs): CLIP-L quick-GELU as OpenAI's
ViT-L/14, with an identity projection when its file has none (sd-scripts' rule); CLIP-G GELU as OpenCLIP bigG, whose
projection is required. T5 is required too (sd-scripts would put zeros in its place; a model trained so is not
SD3 any more).

Tokenizers: CLIP-L's and CLIP-G's are the folder's ``tokenizer/`` and ``tokenizer_2/`` or the package's own (same
vocabulary; CLIP-G pads with "!", id 0, which sd-scripts forces); T5's is found as for FLUX (``tokenizer_3/`` of the
folder, ``model.tokenizer_cache_dir``, the model cache).

The widths must fit the transformer: CLIP-L + CLIP-G widths at most its context width (the joined CLIP states are
zero-padded to it), their projections summing to its ``adm_in_channels``, T5's width equal to its context width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.configs import shipped_configs
from engine.models.flux.files import check_not_adapter, read_flux_header
from engine.models.single_file import ModelLoadError

if TYPE_CHECKING:
    from engine.models.sd3.params import SD3Params
    from engine.models.text_encoders import LoadedTextEncoders

__all__ = ["CLIP_G_PREFIXES", "ENCODERS", "EncoderSpec", "load_clip_g", "load_sd3_clip_l", "load_sd3_t5xxl",
           "load_sd3_text_encoders", "load_sd3_tokenizers"]

_LOCATION = "model.pretrained_model_name_or_path"


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder of SD3: its config key, diffusers subfolders, prefix in an all-in-one file and names."""

    key: str  # "clip_l", "clip_g", "t5xxl"
    encoder_folder: str
    tokenizer_folder: str
    label: str
    file_name: str  # the published file, for messages


ENCODERS = (
    EncoderSpec("clip_l", "text_encoder", "tokenizer", "CLIP-L", "clip_l.safetensors"),
    EncoderSpec("clip_g", "text_encoder_2", "tokenizer_2", "CLIP-G", "clip_g.safetensors"),
    EncoderSpec("t5xxl", "text_encoder_3", "tokenizer_3", "T5-XXL", "t5xxl_fp16.safetensors"),
)
_SPECS = {spec.key: spec for spec in ENCODERS}
CLIP_G_PREFIXES = ("text_model.", "transformer.text_model.", "text_encoders.clip_g.transformer.text_model.")
_CLIP_L_EMBEDDED = ("text_encoders.clip_l.transformer.text_model.",)
_T5_EMBEDDED_PREFIX = "text_encoders.t5xxl.transformer."


def load_sd3_clip_l(location: str | Path, *, embedded: bool = False) -> Any:
    """CLIP-L as ``CLIPTextModelWithProjection`` (identity projection when the file has none).

    Args:
        location: ``clip_l.safetensors`` (HF keys), a diffusers ``text_encoder/`` folder, or (``embedded``) the
            model's all-in-one file.
        embedded: read ``text_encoders.clip_l.transformer.*`` of the model file.
    """
    from engine.models.flux.text_encoders import CLIP_PREFIXES, load_clip_text_model

    what = _LOCATION if embedded else "model.clip_l"
    _check_file(location, what)
    return load_clip_text_model(location, what=what, prefixes=_CLIP_L_EMBEDDED if embedded else CLIP_PREFIXES,
                                projection=True, base=shipped_configs("sd1")["text_encoder"],
                                label="CLIP-L's file (clip_l.safetensors)")


def load_clip_g(location: str | Path, *, embedded: bool = False) -> Any:
    """CLIP-G (OpenCLIP bigG in Hugging Face naming) as ``CLIPTextModelWithProjection``; its projection must be
    in the file.

    Args:
        location: ``clip_g.safetensors``, a diffusers ``text_encoder_2/`` folder, or (``embedded``) the model file.
        embedded: read ``text_encoders.clip_g.transformer.*`` of the model file.

    Raises:
        ModelLoadError: as for CLIP-L, and a file without ``text_projection.weight``.
    """
    from engine.models.flux.text_encoders import load_clip_text_model

    what = _LOCATION if embedded else "model.clip_g"
    prefixes = CLIP_G_PREFIXES[-1:] if embedded else CLIP_G_PREFIXES
    path = Path(location).expanduser()
    if path.is_file():
        header = _check_file(path, what)
        prefix = next((p for p in ("", *prefixes) if p + "embeddings.token_embedding.weight" in header.shapes), None)
        if prefix is not None and prefix.removesuffix("text_model.") + "text_projection.weight" not in header.shapes:
            raise ModelLoadError(f"{path}: a CLIP text model without text_projection.weight; SD3 needs CLIP-G with its "
                                 f"projection (clip_g.safetensors of stable-diffusion-3); check {what}")
    return load_clip_text_model(location, what=what, prefixes=prefixes, projection=True,
                                base=shipped_configs("sdxl")["text_encoder_2"],
                                label="CLIP-G's file (clip_g.safetensors)")


def load_sd3_t5xxl(location: str | Path, *, embedded: bool = False) -> Any:
    """T5-XXL's encoder from ``t5xxl_fp16.safetensors`` (or fp8 e4m3fn), a ``text_encoder_3/`` folder or the model
    file's ``text_encoders.t5xxl.transformer.*``."""
    from engine.models.flux.text_encoders import load_t5xxl

    what = _LOCATION if embedded else "model.t5xxl"
    _check_file(location, what)
    return load_t5xxl(location, what=what)


_LOADERS = {"clip_l": load_sd3_clip_l, "clip_g": load_clip_g, "t5xxl": load_sd3_t5xxl}


def _check_file(location: str | Path, what: str) -> Any:
    """The header of a file location, refusing LoRAs with SD3's advice; None for folders (checked on loading)."""
    path = Path(location).expanduser()
    if not path.is_file():
        return None
    header = read_flux_header(path, what)
    check_not_adapter(header, what, "SD3/SD3.5 text encoder" if what != _LOCATION else "SD3/SD3.5")
    return header


def load_sd3_tokenizers(folder: Path | None, tokenizer_cache_dir: str | Path | None) -> list[Any]:
    """[CLIP-L's ``CLIPTokenizer``, CLIP-G's (pad id 0), T5's ``T5TokenizerFast``] (see the module docstring)."""
    from engine.models.flux.tokenizers import load_clip_tokenizer, load_t5_tokenizer

    clip_l = load_clip_tokenizer(folder, "tokenizer", ("sd1", "tokenizer"))
    clip_g = load_clip_tokenizer(folder, "tokenizer_2", ("sdxl", "tokenizer_2"))
    if clip_g.pad_token_id != 0:  # sd-scripts' Sd3TokenizeStrategy: CLIP-G pads with id 0 ("!")
        clip_g.pad_token = clip_g.convert_ids_to_tokens(0)
    return [clip_l, clip_g, load_t5_tokenizer(folder, tokenizer_cache_dir, "tokenizer_3")]


def load_sd3_text_encoders(params: SD3Params, *, model_file: Path | None, embedded: frozenset[str],
                           folder: Path | None, clip_l: Any = None, clip_g: Any = None, t5xxl: Any = None,
                           tokenizer_cache_dir: Any = None, dtype: Any = None,
                           device: str = "cpu") -> LoadedTextEncoders:
    """The three encoders and tokenizers of an SD3 model, checked against the transformer's widths.

    Args:
        params: the transformer's sizes.
        model_file: the single file the transformer came from (None for a folder).
        embedded: which of "clip_l", "clip_g", "t5xxl" that file holds.
        folder: the diffusers folder (None for a single file).
        clip_l, clip_g, t5xxl: ``model.clip_l`` ... ("" or None: the model's own).
        tokenizer_cache_dir: ``model.tokenizer_cache_dir``.
        dtype, device: where the encoders go (identities are taken first, from the stored values).

    Raises:
        ModelLoadError: a missing component (naming its config key), a file of the wrong kind, or widths that do not
            fit the transformer.
    """
    from engine.models.text_encoders import ready_text_encoders

    given = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl}
    encoders, sources = [], []
    for spec in ENCODERS:
        location, from_model = _where(spec, given[spec.key], model_file, embedded, folder)
        encoders.append(_LOADERS[spec.key](location, embedded=from_model))
        sources.append(location)
    _check_widths(params, encoders, sources, given)
    tokenizers = load_sd3_tokenizers(folder, tokenizer_cache_dir)
    source = str(model_file or folder)
    return ready_text_encoders("sd3", tokenizers, encoders, source, dtype=dtype, device=device)


def _where(spec: EncoderSpec, given: Any, model_file: Path | None, embedded: frozenset[str],
           folder: Path | None) -> tuple[Path, bool]:
    """(location, whether it is the model file's embedded copy) of one encoder; the error says what to set."""
    if given:
        return Path(given).expanduser(), False
    if model_file is not None and spec.key in embedded:
        return model_file, True
    if folder is not None and (folder / spec.encoder_folder).is_dir():
        return folder / spec.encoder_folder, False
    where = f"{model_file.name} has no {spec.label} inside" if model_file is not None else \
        f"{folder} has no {spec.encoder_folder}/ folder"
    raise ModelLoadError(f"model.{spec.key} is not set and {where}; set model.{spec.key} to {spec.file_name} "
                         f"({spec.label}'s file) or a diffusers {spec.encoder_folder}/ folder")


def _check_widths(params: SD3Params, encoders: list[Any], sources: list[Path], given: dict[str, Any]) -> None:
    clip_l, clip_g, t5 = encoders
    l_width, g_width = clip_l.config.hidden_size, clip_g.config.hidden_size
    l_proj, g_proj = clip_l.text_projection.out_features, clip_g.text_projection.out_features
    context = params.context_in_dim
    if t5.config.d_model != context:
        raise ModelLoadError(f"{sources[2]}: T5 width {t5.config.d_model} does not fit the transformer, which expects "
                             f"{context} (context_embedder); check {_key('t5xxl', given)} (it must belong to the same "
                             "model)")
    where = f"{sources[0]} + {sources[1]}" if sources[0] != sources[1] else str(sources[0])
    keys = f"{_key('clip_l', given)} and {_key('clip_g', given)}"
    if l_width + g_width > context:
        raise ModelLoadError(f"{where}: CLIP-L + CLIP-G widths {l_width} + {g_width} = {l_width + g_width} exceed the "
                             f"transformer's context width {context}; check {keys} (they must be SD3's)")
    if l_proj + g_proj != params.adm_in_channels:
        raise ModelLoadError(f"{where}: CLIP-L + CLIP-G pooled widths {l_proj} + {g_proj} = {l_proj + g_proj} do not "
                             f"fit the transformer, which expects {params.adm_in_channels} (adm_in_channels); check "
                             f"{keys} (they must belong to the same model)")


def _key(name: str, given: dict[str, Any]) -> str:
    """The config key to check: the component's own when set, else the model's."""
    return f"model.{name}" if given[name] else f"model.{name} / {_LOCATION}"
