"""The text encoders of FLUX.1 / Chroma and SD3 on the meta device, for the plan's trace of the encoders a LoRA trains.

Built as the engine's loaders build them (engine.models.flux.text_encoders, engine.models.sd3.text_encoders), from
the tensor shapes in the files' headers, or from a diffusers folder's configs, without reading a weight: CLIP-L
(CLIPTextModel for FLUX, CLIPTextModelWithProjection for SD3), SD3's CLIP-G, and T5-XXL's encoder. Where an
encoder's file is not local, none are built and the plan counts the encoders' parameters only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config.schema import RunConfig
from engine.models.families import family_info

__all__ = ["flow_text_modules"]

_CLIP_MARKER = "embeddings.token_embedding.weight"
_T5_MARKER = "shared.weight"


@dataclass(frozen=True)
class _Kind:
    marker: str
    file_prefixes: tuple[str, ...]  # where the keys may sit in the encoder's own file ("" first)
    embedded_prefix: str  # in SD3's all-in-one model file
    folders: tuple[str, ...]  # the diffusers subfolders it may be in (FLUX, SD3)
    model_type: str  # the transformers config's model_type ("clip_text_model", "t5")
    build: Callable[[dict[str, tuple[int, ...]], bool], nn.Module]


def _clip(base_family: str, base_encoder: str) -> Callable[[dict[str, tuple[int, ...]], bool], nn.Module]:
    def build(shapes: dict[str, tuple[int, ...]], projection: bool) -> nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from engine.models.configs import shipped_configs
        from engine.models.flux.text_encoders import clip_config_from_shapes

        config = CLIPTextConfig(**clip_config_from_shapes(shapes, shipped_configs(base_family)[base_encoder]))
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    return build


def _t5(shapes: dict[str, tuple[int, ...]], projection: bool) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    from engine.models.flux.text_encoders import t5_config_from_shapes

    return T5EncoderModel(T5Config(**t5_config_from_shapes(shapes)))


_CLIP_PREFIXES = ("", "text_model.", "transformer.text_model.", "cond_stage_model.transformer.text_model.")
_KINDS = {
    "clip_l": _Kind(_CLIP_MARKER, _CLIP_PREFIXES, "text_encoders.clip_l.transformer.text_model.", ("text_encoder",),
                    "clip_text_model", _clip("sd1", "text_encoder")),
    "clip_g": _Kind(_CLIP_MARKER, _CLIP_PREFIXES, "text_encoders.clip_g.transformer.text_model.",
                    ("text_encoder_2",), "clip_text_model", _clip("sdxl", "text_encoder_2")),
    "t5xxl": _Kind(_T5_MARKER, ("", "t5xxl.transformer.", "transformer."), "text_encoders.t5xxl.transformer.",
                   ("text_encoder_2", "text_encoder_3"), "t5", _t5),
}


# By FamilyInfo.loader: whether the CLIPs are built with their projection (SD3 conditions on both CLIPs' projected
# pooled outputs; FLUX.1 on CLIP-L's plain pooled output).
_CLIP_PROJECTION = {"flux": False, "sd3": True}


def flow_text_modules(config: RunConfig, family: str, location: Path) -> list[nn.Module]:
    """The family's text encoders on the meta device in the engine's order, or [] when any cannot be read here."""
    projection = _CLIP_PROJECTION[family_info(family).loader]
    modules = []
    for key in family_info(family).text_encoder_files:
        module = _on_meta(key, Path(getattr(config.model, key) or location), location, projection)
        if module is None:
            return []
        modules.append(module)
    return modules


def _on_meta(key: str, given: Path, location: Path, projection: bool) -> nn.Module | None:
    kind = _KINDS[key]
    if given.is_dir():
        configs = [_folder_config(given / name) for name in ("", *kind.folders)]
        config = next((found for found in configs if found and found.get("model_type") == kind.model_type), None)
        return None if config is None else _from_config(config, projection)
    if not given.is_file():
        return None
    from engine.models.single_file import read_header

    shapes = read_header(given).shapes
    prefixes = (kind.embedded_prefix,) if given == location else kind.file_prefixes
    prefix = next((p for p in prefixes if p + kind.marker in shapes), None)
    if prefix is None:
        return None
    own = {name[len(prefix):]: shape for name, shape in shapes.items() if name.startswith(prefix)}
    projection_key = prefix.removesuffix("text_model.") + "text_projection.weight"
    if projection and projection_key in shapes:
        own["text_projection.weight"] = shapes[projection_key]
    with torch.device("meta"):
        return kind.build(own, projection)


def _folder_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _from_config(config: dict[str, Any], projection: bool) -> nn.Module:
    import transformers

    name = (config.get("architectures") or ["CLIPTextModel"])[0]
    if name.startswith("CLIP"):
        name = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    model_class = getattr(transformers, name)
    with torch.device("meta"):
        return model_class(model_class.config_class.from_dict(config))
