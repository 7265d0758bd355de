"""The metadata of the files the LoRA tools write: ss_* shape keys and ModelSpec (spec §5.3), as sd-scripts' own
merge, resize and extract scripts write them."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from engine.models.families import family_info
from engine.networks.metadata import (
    IMPLEMENTATION_VERSION,
    MODELSPEC_VERSION,
    STABILITY_AI_IMPLEMENTATION,
    is_flow_family,
)
from engine.networks.tools.lora_file import LoRAWeights

__all__ = ["DYNAMIC", "modelspec_date", "modelspec_keys", "network_args", "shape_metadata"]

DYNAMIC = "Dynamic"  # what sd-scripts writes for ss_network_dim/alpha when modules have different ranks
_CONV_ARGS = ("conv_dim", "conv_alpha")


def modelspec_date(now: float | None = None) -> str:
    """modelspec.date as sd-scripts writes it: local ISO time without microseconds."""
    return datetime.datetime.fromtimestamp(int(time.time() if now is None else now)).isoformat()


def modelspec_keys(family: str, v_prediction: bool, *, kind: str, title: str, variant: str = "") -> dict[str, str]:
    """ModelSpec 1.0.1 keys of a new file: kind "lora" for a LoRA, "" for a whole checkpoint.

    Args:
        variant: the base file's variant where the family has several architectures (FLUX.1 "dev", "schnell";
            SD3 "medium", "5-medium", "5-large").

    Flow-matching families (FLUX.1, Chroma, SD3) name their own implementation for every kind and have no
    prediction type (spec §5.4; sd-scripts' SD3 "epsilon" is an artefact, appendix A.5).
    """
    info = family_info(family)
    size = info.resolution_for(v_prediction)
    flow = is_flow_family(family)
    keys = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": info.modelspec_architecture(v_prediction, kind, variant=variant),
        "modelspec.implementation": (info.modelspec_implementation if kind == "lora" or flow
                                     else STABILITY_AI_IMPLEMENTATION),
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": modelspec_date(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
    }
    if flow:
        del keys["modelspec.prediction_type"]
    return keys


def _one(values: Iterable[Any]) -> str:
    distinct = {str(value) for value in values}
    if not distinct:
        return "None"
    return distinct.pop() if len(distinct) == 1 else DYNAMIC


def network_args(metadata: Mapping[str, str]) -> dict[str, Any]:
    """ss_network_args as a dict ({} when missing or not a JSON object)."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        return {}
    return args if isinstance(args, dict) else {}


def shape_metadata(modules: Mapping[str, LoRAWeights], args: Mapping[str, Any] | None = None) -> dict[str, str]:
    """ss_network_dim/alpha (Linear and 1x1 modules) and conv_dim/conv_alpha in ss_network_args (3x3 convs), each
    the one value all modules share or "Dynamic"; other network_args are kept."""
    linear = [weights for weights in modules.values() if not weights.is_spatial_conv]
    conv = [weights for weights in modules.values() if weights.is_spatial_conv]
    metadata = {"ss_network_dim": _one(weights.rank for weights in linear),
                "ss_network_alpha": _one(f"{weights.alpha:g}" for weights in linear)}
    kept = {key: value for key, value in (args or {}).items() if key not in _CONV_ARGS}
    if conv:
        kept.update(conv_dim=_one(weights.rank for weights in conv),
                    conv_alpha=_one(f"{weights.alpha:g}" for weights in conv))
    if kept:
        metadata["ss_network_args"] = json.dumps(kept)
    return metadata

