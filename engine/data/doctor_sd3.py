"""The doctor's SD3 / SD3.5 model-file checks: which variant the base file is, where each text encoder and the VAE
come from, and that the separate files are what their fields say (headers only, no torch: the GUI runs the doctor).

An SD3 base is a SAI single file (`model.diffusion_model.*`, spec §8.1) that may carry CLIP-L, CLIP-G, T5-XXL
(`text_encoders.<name>.transformer.*`) and the VAE (`first_stage_model.*`); what it lacks must come from
`model.clip_l` / `model.clip_g` / `model.t5xxl`, and a set field wins over the embedded copy, as the loader does. The
variant (SD3 medium, SD3.5 medium, SD3.5 large) comes from the keys (qk-norm, attn2 blocks) and decides how many
joint blocks `training.blocks_to_swap` may keep in CPU memory (all but two, spec §8.6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.config.base import field_families
from engine.config.choices import SD3_FAMILIES
from engine.config.schema import RunConfig
from engine.data.doctor_models import LOCATION, ModelChecker, suffixed
from engine.data.model_kinds import SD3Model, model_kind, read_sd3_file
from engine.data.records import Finding
from engine.models.families import FAMILY_INFO
from engine.models.single_file import FileHeader

# The MMDiT's inputs the text encoders feed, as [out, in] weights: T5's width (context) and CLIP-L + CLIP-G's
# projected pooled widths (the y vector, 768 + 1280 = 2048 in the real models).
_CONTEXT_INPUT, _POOLED_INPUT = "context_embedder.weight", "y_embedder.mlp.0.weight"
# Real text encoder widths: a file of one of these widths is that encoder (tiny test encoders match none).
_KNOWN_CLIP_WIDTHS = {768: "CLIP-L", 1280: "CLIP-G", 1024: "OpenCLIP-H (an SD2 text encoder)"}


# --- the components ----------------------------------------------------------------------------------------------


def _clip_problem(header: FileHeader, label: str) -> str | None:
    embedding = suffixed(header, "embeddings.token_embedding.weight")
    if embedding is None or len(embedding) != 2:
        return "not a CLIP text encoder (no text_model.embeddings.token_embedding)"
    known = _KNOWN_CLIP_WIDTHS.get(embedding[1])
    if known is not None and known != label:
        return f"a text encoder {embedding[1]} wide: this is {known}, not {label}"
    return None


def _t5_problem(header: FileHeader, _label: str) -> str | None:
    shared = suffixed(header, "shared.weight")
    if shared is None or len(shared) != 2 or suffixed(header, "encoder.final_layer_norm.weight") is None:
        return "not a T5 encoder (no shared.weight / encoder.final_layer_norm)"
    return None


def _vae_problem(header: FileHeader, _label: str) -> str | None:
    conv_out = suffixed(header, "encoder.conv_out.weight")
    if conv_out is None:
        return "no VAE weights (no encoder.conv_out)"
    channels, wanted = conv_out[0] // 2, FAMILY_INFO["sd3"].latent_channels  # mean and log-variance per channel
    if channels != wanted:
        return f"a VAE with {channels} latent channels (an SD1/SDXL VAE?), but SD3 needs its {wanted}-channel VAE"
    return None


@dataclass(frozen=True)
class Component:
    """One part of an SD3 model that is either inside the base file or a file of its own."""

    name: str  # its key in the base file: text_encoders.<name>.transformer.* (the VAE: first_stage_model.*)
    label: str
    fields: tuple[str, ...]  # model fields that can name its file; the first that applies to sd3 is used
    what: str  # what the field must name, for messages
    problem: Callable[[FileHeader, str], str | None]  # what is wrong with a file given for it, None if nothing

    @property
    def prefix(self) -> str:
        return "first_stage_model." if self.name == "vae" else f"text_encoders.{self.name}.transformer."

    def field(self, config: RunConfig) -> str | None:
        """The model field that names this component's file for SD3, or None when no field does."""
        fields = type(config.model).model_fields
        for name in self.fields:
            families = field_families(fields[name]) if name in fields else ()
            if families is None or not set(families).isdisjoint(SD3_FAMILIES):
                return f"model.{name}"
        return None


COMPONENTS = (
    Component("clip_l", "CLIP-L", ("clip_l",), "CLIP-L's file (clip_l.safetensors)", _clip_problem),
    Component("clip_g", "CLIP-G", ("clip_g",), "CLIP-G's file (clip_g.safetensors)", _clip_problem),
    Component("t5xxl", "T5-XXL", ("t5xxl",), "T5-XXL's file (e.g. t5xxl_fp16.safetensors)", _t5_problem),
    Component("vae", "VAE", ("vae", "ae"), "SD3's 16-channel VAE file", _vae_problem),
)


def _component_header(checker: ModelChecker, component: Component, field: str) -> FileHeader | None:
    """The header of the file `field` names when it is a readable file of this component (else a finding)."""
    header = checker.header(field, component.what, component=True)
    if header is None:
        return None
    problem = component.problem(header, component.label)
    if problem is not None:
        checker.error(header.path, f"{field}: {problem}", f"point {field} at {component.what}")
        return None
    return header


def _pooled_width(header: FileHeader, prefix: str = "") -> int | None:
    """A CLIP's projected pooled width (its own width without a text_projection: the loader adds an identity)."""
    keys = {key[len(prefix):]: shape for key, shape in header.shapes.items() if key.startswith(prefix)}
    projection = next((shape for key, shape in keys.items() if key.endswith("text_projection.weight")), None)
    if projection is not None:
        return projection[0]
    embedding = next((shape for key, shape in keys.items() if key.endswith("embeddings.token_embedding.weight")), None)
    return embedding[1] if embedding else None


def _t5_width(header: FileHeader, prefix: str = "") -> int | None:
    return next((shape[1] for key, shape in header.shapes.items()
                 if key.startswith(prefix) and key.endswith("shared.weight") and len(shape) == 2), None)


@dataclass
class _Sources:
    """Where each component comes from: its field's file header, or the base file (prefix), or nowhere."""

    found: dict[str, tuple[FileHeader, str]]  # component name -> (header, key prefix)
    said: list[str]  # "CLIP-L from model.clip_l" ... for the summary


def _sources(checker: ModelChecker, base: SD3Model) -> _Sources:
    sources = _Sources({}, [])
    for component in COMPONENTS:
        field = component.field(checker.config)
        value = getattr(checker.config.model, field.split(".")[-1]).strip() if field else ""
        embedded = component.name in base.embedded
        if value:
            header = _component_header(checker, component, field)
            if header is not None:
                sources.found[component.name] = (header, "")
            sources.said.append(f"{component.label} from {field}" + (" (the file's own is not used)" if embedded
                                                                     else ""))
        elif embedded:
            sources.found[component.name] = (base.header, component.prefix)
            sources.said.append(f"{component.label} inside the file")
        else:
            hint = (f"set {field} to {component.what}" if field else
                    f"use an SD3 file that includes {component.label} ({component.prefix}* keys)")
            checker.error(base.header.path, f"{field or component.label}: not set, and the SD3 file holds no "
                          f"{component.label} ({component.prefix}* keys)", hint, "model-component-missing")
    return sources


def _check_widths(checker: ModelChecker, base: SD3Model, sources: _Sources) -> None:
    """The text encoders fit the MMDiT: T5's width is its context input, CLIP-L + CLIP-G's pooled its y input."""
    t5 = sources.found.get("t5xxl")
    context = base.mmdit.get(_CONTEXT_INPUT)
    width = _t5_width(*t5) if t5 else None
    if width is not None and context is not None and len(context) == 2 and width != context[1]:
        checker.error(t5[0].path, f"model.t5xxl: a T5 {width} wide, but this {base.label} model takes {context[1]}"
                      "-wide text features (T5-XXL: 4096)", "point model.t5xxl at T5-XXL's file "
                      "(t5xxl_fp16.safetensors), not T5-base/large or another model's encoder", "model-files-mismatch")
    pooled = base.mmdit.get(_POOLED_INPUT)
    clips = [sources.found.get(name) for name in ("clip_l", "clip_g")]
    widths = [_pooled_width(*clip) if clip else None for clip in clips]
    if None in widths or pooled is None or len(pooled) != 2 or sum(widths) == pooled[1]:
        return
    where = next((clip[0].path for clip in clips if clip[1] == ""), base.header.path)
    checker.error(where, f"model.clip_l / model.clip_g: CLIP-L and CLIP-G give {widths[0]} + {widths[1]} pooled "
                  f"features, but this {base.label} model takes {pooled[1]} (CLIP-L 768 + CLIP-G 1280)",
                  "point model.clip_l at CLIP-L's file and model.clip_g at CLIP-G's (clip_l.safetensors, "
                  "clip_g.safetensors) from this model's release", "model-files-mismatch")


def _check_blocks_to_swap(checker: ModelChecker, base: SD3Model) -> None:
    """All but two joint blocks may be swapped (sd-scripts asserts blocks_to_swap <= num_blocks - 2)."""
    wanted, limit = checker.config.training.blocks_to_swap, max(base.depth - 2, 0)
    if wanted > limit:
        checker.error("training.blocks_to_swap", f"training.blocks_to_swap is {wanted}, but this {base.label} "
                      f"model has {base.depth} joint blocks: at most {limit} can be swapped",
                      f"set training.blocks_to_swap to {limit} or less (0 = off)", "blocks-to-swap")


def _base_file(checker: ModelChecker) -> SD3Model | None:
    what = "the SD3 / SD3.5 model file (e.g. sd3.5_large.safetensors)"
    header = checker.header(LOCATION, what)
    if header is None:
        return None
    base = read_sd3_file(header)
    if base is None:
        other = model_kind(header)
        said = f"this is {other}" if other else "not an SD3 / SD3.5 model (no joint_blocks.* keys)"
        checker.error(header.path, f"{LOCATION}: {said}, but model.model_family is 'sd3'",
                      f"point {LOCATION} at {what}, or set model.model_family to the family of this file (or auto)")
    return base


def sd3_model_findings(config: RunConfig, base_dir: Path, family: str) -> list[Finding]:
    """The SD3 base file (its variant), its text encoders and VAE (inside or from their fields, each what it
    claims and fitting the MMDiT), and blocks_to_swap against the variant's depth."""
    checker = ModelChecker(config, base_dir, family, [])
    base = _base_file(checker)
    if base is None:
        return checker.findings
    sources = _sources(checker, base)
    _check_widths(checker, base, sources)
    _check_blocks_to_swap(checker, base)
    checker.findings.append(Finding("info", "model-detected", str(base.header.path),
                                    f"an {base.label} model ({base.depth} joint blocks); " + ", ".join(sources.said)))
    return checker.findings
