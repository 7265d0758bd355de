"""The doctor's model-file findings for a config: the check of the family's loader (`FamilyInfo.loader`, never the
family's name), FLUX.1 / Chroma's in engine.data.doctor_models and SD3's in engine.data.doctor_sd3.

Kept apart from both so that the SD3 checks can build on doctor_models' checker without the two importing each
other. Headers only, no torch: the GUI process runs the doctor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.config.io import resolve_path
from engine.config.schema import RunConfig
from engine.data.doctor_models import HEADER_FILES, flux_model_findings, read_safetensors_header
from engine.data.doctor_sd3 import sd3_model_findings
from engine.data.model_kinds import model_family_of
from engine.data.records import Finding
from engine.models.families import family_info
from engine.models.single_file import ModelLoadError

__all__ = ["MODEL_CHECKS", "model_findings"]

# Model checks by FamilyInfo.loader; SD checkpoints carry their own text encoders and VAE, so they have none here.
MODEL_CHECKS: dict[str, Callable[[RunConfig, Path, str], list[Finding]]] = {
    "flux": flux_model_findings, "sd3": sd3_model_findings}


def _detected_family(config: RunConfig, base_dir: Path) -> str | None:
    """The family of the model file with model_family = "auto", from its header (a folder, hub id or pickle is left
    to the loader)."""
    location = config.model.pretrained_model_name_or_path.strip()
    path = resolve_path(location, base_dir) if location else None
    if path is None or path.suffix.lower() not in HEADER_FILES or not path.is_file():
        return None
    try:
        return model_family_of(read_safetensors_header(path))
    except ModelLoadError:
        return None  # reported by the loader, which knows every kind of model file


def model_findings(config: RunConfig, base_dir: str | Path) -> list[Finding]:
    """The model-file findings of `config` (paths relative to base_dir)."""
    base_dir = Path(base_dir)
    family = config.model.model_family
    if family == "auto":
        family = _detected_family(config, base_dir) or "auto"
    check = MODEL_CHECKS.get(family_info(family).loader) if family != "auto" else None
    return check(config, base_dir, family) if check else []
