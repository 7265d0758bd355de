"""The run's models as architectures without weights: built on the meta device from the model's own configs (or the
family's standard ones when the file cannot be read here), for parameter counts and for the step's trace.

Nothing here reads tensor data: safetensors headers and config files only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config.schema import RunConfig
from engine.models.families import family_info

__all__ = ["Architecture", "build_architecture", "resolve_family"]


@dataclass
class Architecture:
    """The denoiser on the meta device, the other parts' parameter counts, and where each count came from."""

    family: str
    denoiser: nn.Module
    text_encoders: dict[str, int]  # parameters per encoder
    vae: int  # parameters of the VAE / AE
    source: str  # "the model's configs", "the family's standard configs", ...
    notes: list[str] = field(default_factory=list)
    vae_config: dict[str, Any] | None = None  # the VAE's diffusers config, for tracing its decoder (samples)
    # The text encoders on the meta device, in the engine's order, where the plan can trace them training (SD1, SD2,
    # SDXL always; FLUX.1 / Chroma and SD3 from their files' headers when the run may train them: text_modules.py);
    # empty where only their parameter counts are known.
    text_modules: list[nn.Module] = field(default_factory=list)


def latent_scale(vae_config: dict[str, Any] | None) -> int:
    """How many pixels one latent cell covers per side: the VAE halves the size between its blocks (8 for every
    family's VAE, and assumed where a config does not say)."""
    return 2 ** (len((vae_config or {}).get("block_out_channels", (0, 0, 0, 0))) - 1)


def resolve_family(config: RunConfig, location: Path | str) -> str:
    """The run's family: the config's, or detected from the model's keys when it says "auto"."""
    family = config.model.model_family
    if family != "auto":
        return family
    from engine.models.loading import detect_model_family

    return detect_model_family(location)


def build_architecture(config: RunConfig, location: Path | str) -> Architecture:
    """The run's model on the meta device (see the module docstring)."""
    family = resolve_family(config, location)
    return _BUILDERS[family_info(family).loader](config, family, Path(location))


def parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# --- SD1 / SD2 / SDXL ------------------------------------------------------------------------------------------


def _sd_configs(family: str, location: Path) -> tuple[dict[str, dict[str, Any]], str]:
    from engine.models.configs import shipped_configs

    if location.is_dir():
        found = {name: json.loads((location / name / "config.json").read_text())
                 for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                 if (location / name / "config.json").is_file()}
        if "unet" in found:
            return found, "the model folder's configs"
    if location.is_file():
        from engine.models.single_file import file_configs, read_header

        return file_configs(read_header(location), family), "the checkpoint's configs"
    return shipped_configs(family), f"the standard {family} configs (the model is not a local file)"


def _on_meta(name: str, config: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):
        if name == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if name == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        import transformers

        model_class = getattr(transformers, (config.get("architectures") or ["CLIPTextModel"])[0])
        return model_class(model_class.config_class.from_dict(config))


def _sd(config: RunConfig, family: str, location: Path) -> Architecture:
    configs, source = _sd_configs(family, location)
    denoiser = _on_meta("unet", configs["unet"])
    modules = {name: _on_meta(name, configs[name]) for name in ("text_encoder", "text_encoder_2") if name in configs}
    encoders = {name: parameter_count(module) for name, module in modules.items()}
    vae = parameter_count(_on_meta("vae", configs["vae"])) if "vae" in configs else 0
    return Architecture(family, denoiser, encoders, vae, source, vae_config=configs.get("vae"),
                        text_modules=list(modules.values()))


# --- FLUX.1 / Chroma and SD3 -------------------------------------------------------------------------------------


def _header_shapes(path: str, what: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of a local safetensors/ckpt file (header only), or None when there is no such file."""
    if not path or not Path(path).is_file():
        return None
    from engine.models.single_file import read_header

    return read_header(Path(path)).shapes


def _file_parameters(paths: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    counts, notes = {}, []
    for name, path in paths.items():
        shapes = _header_shapes(path, name)
        if shapes is None:
            notes.append(f"{name}: no local file to count ({path or 'not set'}); counted as 0")
            counts[name] = 0
        else:
            counts[name] = sum(_numel(shape) for shape in shapes.values())
    return counts, notes


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _stripped(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    if any(key.startswith(prefix) for key in shapes):
        return {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}
    return shapes


def _flux(config: RunConfig, family: str, location: Path) -> Architecture:
    from engine.models.flux.params import CHROMA, FLUX_DEV, params_from_state_dict
    from engine.models.flux.transformer import Flux

    shapes = _header_shapes(str(location), "model.pretrained_model_name_or_path")
    if shapes is not None:
        params, source = params_from_state_dict(_stripped(shapes, "model.diffusion_model.")), "the model file"
    else:
        # Chroma is the FLUX-layout family without CLIP-L's vector input (its approximator modulates instead).
        standard = FLUX_DEV if "clip_l" in family_info(family).text_encoder_files else CHROMA
        params, source = standard, f"the standard {family} architecture"
    with torch.device("meta"):
        denoiser = Flux(params)
    model = config.model
    paths = {name: getattr(model, name) for name in family_info(family).text_encoder_files}
    encoders, notes = _file_parameters(paths)
    vae, vae_notes = _file_parameters({"ae": model.ae})
    from engine.models.flux.ae import FLUX_AE_CONFIG

    return Architecture(family, denoiser, encoders, vae["ae"], source, notes + vae_notes, vae_config=FLUX_AE_CONFIG,
                        text_modules=_flow_text_modules(config, family, location))


def _sd3(config: RunConfig, family: str, location: Path) -> Architecture:
    from engine.models.sd3.mmdit import MMDiT
    from engine.models.sd3.params import SD35_MEDIUM, params_from_state_dict

    shapes = _header_shapes(str(location), "model.pretrained_model_name_or_path")
    if shapes is not None:
        params, source = params_from_state_dict(_stripped(shapes, "model.diffusion_model.")), "the model file"
    else:
        params, source = SD35_MEDIUM, "the standard SD3.5 medium architecture"
    with torch.device("meta"):
        denoiser = MMDiT(params)
    model = config.model
    encoders, notes = _file_parameters({"clip_l": model.clip_l, "clip_g": model.clip_g, "t5xxl": model.t5xxl})
    vae, vae_notes = _file_parameters({"vae": model.vae}) if model.vae else ({"vae": 0}, [])
    if shapes is not None:  # SD3 files often carry their text encoders and VAE
        for name, prefix in (("clip_l", "text_encoders.clip_l."), ("clip_g", "text_encoders.clip_g."),
                             ("t5xxl", "text_encoders.t5xxl."), ("vae", "first_stage_model.")):
            embedded = sum(_numel(shape) for key, shape in shapes.items() if key.startswith(prefix))
            if embedded and name == "vae" and not vae["vae"]:
                vae["vae"] = embedded
            elif embedded and not encoders.get(name):
                encoders[name] = embedded
        notes = [note for note in notes if not encoders.get(note.split(":")[0])]
    from engine.models.sd3.vae import SD3_VAE_CONFIG

    return Architecture(family, denoiser, encoders, vae["vae"], source, notes + vae_notes, vae_config=SD3_VAE_CONFIG,
                        text_modules=_flow_text_modules(config, family, location))


def _flow_text_modules(config: RunConfig, family: str, location: Path) -> list[nn.Module]:
    """FLUX's and SD3's encoders on the meta device when the run may train them (T5-XXL alone is 4.8 B parameters:
    not built for the many plans of runs that do not)."""
    from engine.plan.text_modules import flow_text_modules
    from engine.plan.text_trace import encoder_training

    if not any(encoder_training(config, family, len(family_info(family).text_encoder_files))):
        return []
    return flow_text_modules(config, family, location)


_BUILDERS: dict[str, Callable[[RunConfig, str, Path], Architecture]] = {"ldm": _sd, "flux": _flux, "sd3": _sd3}
