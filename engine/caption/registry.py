"""The captioners by name. Each entry is built on first use, so `python -m engine --help` loads no model code."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from engine.caption.base import Captioner, CaptionerEntry

# What BLIP and GIT folders hold (a hub download of the repository gives exactly these).
_TRANSFORMERS_FILES = ("config.json, the weights (model.safetensors or pytorch_model.bin), the image processor's "
                       "preprocessor_config.json (or processor_config.json) and the tokenizer files (tokenizer.json or "
                       "vocab.txt, tokenizer_config.json)")


def _blip() -> CaptionerEntry:
    from engine.caption.blip import BLIP_ALLOW_PATTERNS, BLIP_DEFAULT, BlipCaptioner, BlipOptions

    return CaptionerEntry(BLIP_DEFAULT, BlipOptions, BlipCaptioner,
                          (BLIP_DEFAULT, "Salesforce/blip-image-captioning-base"), model_files=_TRANSFORMERS_FILES,
                          allow_patterns=tuple(BLIP_ALLOW_PATTERNS))


def _git() -> CaptionerEntry:
    from engine.caption.git import GIT_ALLOW_PATTERNS, GIT_DEFAULT, GitCaptioner, GitOptions

    return CaptionerEntry(GIT_DEFAULT, GitOptions, GitCaptioner, (GIT_DEFAULT, "microsoft/git-base-coco"),
                          model_files=_TRANSFORMERS_FILES, allow_patterns=tuple(GIT_ALLOW_PATTERNS))


def _wd14() -> CaptionerEntry:
    from engine.caption.wd14 import MODEL_FILE, TAGS_FILE, WD14_MODELS, Wd14Options, Wd14Tagger

    return CaptionerEntry(WD14_MODELS[0], Wd14Options, Wd14Tagger, tuple(WD14_MODELS),
                          model_files=f"{MODEL_FILE} and {TAGS_FILE}", allow_patterns=(MODEL_FILE, TAGS_FILE),
                          metadata_field="tags")


CAPTIONER_LOADERS: dict[str, Callable[[], CaptionerEntry]] = {"blip": _blip, "git": _git, "wd14": _wd14}


def captioner_entry(name: str) -> CaptionerEntry:
    if name not in CAPTIONER_LOADERS:
        raise ValueError(f"unknown captioner {name!r}; choose one of {', '.join(CAPTIONER_LOADERS)}")
    return CAPTIONER_LOADERS[name]()


def build_captioner(name: str, model_dir: str, values: dict[str, Any], **kwargs: Any) -> Captioner:
    """A captioner with its options built from `values` (option name -> value); unknown names are an error."""
    entry = captioner_entry(name)
    fields = {field.name for field in dataclasses.fields(entry.options_type)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{name} has no option(s) {', '.join(unknown)}; it takes {', '.join(sorted(fields))}")
    return entry.build(model_dir, entry.options_type(**values), **kwargs)
