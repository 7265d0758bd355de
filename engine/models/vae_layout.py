"""Single-file VAEs: which key layout a file uses, the AutoencoderKL config it needs, and loading.

A VAE comes in three single-file layouts: inside a whole SD checkpoint (``first_stage_model.*``), as a standalone
LDM VAE (``encoder.down.0.block.0...``, like ``vae-ft-mse-840000-ema-pruned.safetensors``) or as a standalone
diffusers VAE (``encoder.down_blocks.0.resnets.0...``). Its config is, in order: the one our writer embedded in the
file (``engine.models.single_file``), else the family's shipped VAE config with the sizes read off the tensor shapes
(``engine.models.configs.inference``). A standalone VAE does not tell its family; SD1's shipped config stands in,
since every SD-family VAE has the same shape and only the scaling factor differs, which the caller sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.models.configs import shipped_configs
from engine.models.configs.inference import ConfigInferenceError, infer_vae_config
from engine.models.ldm_checkpoint import detect_family
from engine.models.ldm_keys import VAE_PREFIX
from engine.models.single_file import FileHeader, ModelLoadError, embedded_configs, read_header, read_tensors

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

__all__ = ["SingleFileVae", "VaeLoadError", "load_single_file_vae", "single_file_family", "vae_from_state_dict"]


class VaeLoadError(ModelLoadError):
    """The VAE cannot be loaded; the message names the file, folder or id and says what to do."""


# Layout name → (a key only that layout has, prefix stripped from the VAE's keys). Checked in order.
_LAYOUTS: dict[str, tuple[str, str]] = {
    "checkpoint": (VAE_PREFIX + "encoder.conv_in.weight", VAE_PREFIX),  # a whole SD checkpoint
    "ldm": ("encoder.down.0.block.0.conv1.weight", ""),  # a standalone VAE in LDM naming
    "diffusers": ("encoder.down_blocks.0.resnets.0.conv1.weight", ""),  # a standalone VAE in diffusers naming
}
_VAE_PARTS = {"encoder", "decoder", "quant_conv", "post_quant_conv"}
_STANDALONE_BASE = "sd1"  # the shipped VAE config a standalone VAE file starts from


@dataclass
class SingleFileVae:
    """A VAE loaded from a single file, with the family the file shows (None for a standalone VAE)."""

    vae: AutoencoderKL
    family: str | None


def _header(path: Path) -> FileHeader:
    try:
        return read_header(path)
    except ModelLoadError as error:
        raise VaeLoadError(str(error)) from error


def _layout(header: FileHeader) -> tuple[str, str]:
    for name, (marker, prefix) in _LAYOUTS.items():
        if marker in header.shapes:
            return name, prefix
    raise VaeLoadError(f"{header.path}: no VAE weights found; expected keys under '{VAE_PREFIX}' (a whole SD "
                       "checkpoint) or 'encoder.' / 'decoder.' (a standalone VAE)")


def _family_or_none(keys: Any) -> str | None:
    try:
        return detect_family(keys)
    except ValueError:  # a VAE-only file with the checkpoint prefix: no text encoder to tell by
        return None


def single_file_family(path: Path) -> str | None:
    """The family of a whole SD checkpoint from its key names (only the header is read for .safetensors)."""
    return _family_or_none(_header(path).shapes)


def load_single_file_vae(path: Path) -> SingleFileVae:
    """Load the VAE of a single file (a whole checkpoint or a standalone VAE) as float32.

    Raises:
        VaeLoadError: an unsupported or unreadable file, no VAE keys, or weights that do not fit.
    """
    header = _header(path)
    layout, prefix = _layout(header)
    keys = [key for key in header.shapes if key.startswith(prefix) and key[len(prefix):].split(".")[0] in _VAE_PARTS]
    family = _family_or_none(header.shapes) if layout == "checkpoint" else None
    try:
        stored = embedded_configs(header) if layout == "checkpoint" else None
        state = read_tensors(path, keys)
    except ModelLoadError as error:
        raise VaeLoadError(str(error)) from error
    except Exception as error:  # safetensors and torch.load signal damage with many types
        raise VaeLoadError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    state = {key[len(prefix):]: tensor for key, tensor in state.items()}
    config = (stored or {}).get("vae")
    naming = "ldm" if layout == "checkpoint" else layout
    return SingleFileVae(vae_from_state_dict(state, naming, path, config, base_family=family), family)


def vae_from_state_dict(state: dict[str, torch.Tensor], layout: str, path: Path, config: dict[str, Any] | None = None,
                        *, base_family: str | None = None) -> AutoencoderKL:
    """Build an ``AutoencoderKL`` (float32) from a prefix-free VAE state dict in ``layout`` ("ldm" or "diffusers").

    Args:
        state: the VAE's tensors without prefix.
        layout: their key naming; LDM keys go through diffusers' own ``convert_ldm_vae_checkpoint``.
        path: the file, for messages.
        config: the AutoencoderKL config; None → ``base_family``'s shipped config with the sizes of ``state``.
        base_family: the family whose shipped config to start from (None: SD1's, see the module docstring).

    Raises:
        VaeLoadError: the shapes do not describe a VAE diffusers can build, or keys are missing / left over.
    """
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if config is None:
        base = shipped_configs(base_family or _STANDALONE_BASE)["vae"]
        try:
            config = infer_vae_config({key: tuple(t.shape) for key, t in state.items()}, layout, base)
        except ConfigInferenceError as error:
            raise VaeLoadError(f"{path}: {error}") from error
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    if layout == "ldm":
        state = convert_ldm_vae_checkpoint(state, config)
    with torch.device("meta"):  # no random initialisation of weights that are overwritten at once
        vae = AutoencoderKL.from_config(config)
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise VaeLoadError(f"{path}: the weights do not fit the VAE shape read from the file ({error})") from error
    return vae.float()
