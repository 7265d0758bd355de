"""The FLUX AE (same for FLUX.1 dev, schnell and Chroma) as a diffusers ``AutoencoderKL``, offline (spec §2.1).

Sources:

* BFL's ``ae.safetensors`` / ``ae.sft`` (``model.ae``): the LDM VAE key layout without ``quant_conv`` /
  ``post_quant_conv``, converted with the same code as SD's standalone VAEs (``engine.models.vae_layout``); the
  config is the published FLUX ``vae/config.json`` with the sizes read off the shapes, so tiny AEs load too;
* the same AE in diffusers naming, as one file;
* a diffusers ``vae/`` folder (or a pipeline folder holding one).

The latents the denoiser sees are ``(z - 0.1159) * 0.3611`` of the AE's raw latent z; :class:`LoadedVae` carries
both factors and applies them (``normalize`` / ``denormalize``), the module's config states them too. An AE with
other than 16 latent channels (an SD VAE) is refused, naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.models.configs.inference import ConfigInferenceError, infer_vae_config
from engine.models.flux.files import check_not_adapter, read_flux_header, read_state
from engine.models.single_file import ModelLoadError
from engine.models.vae import LoadedVae, ready_vae
from engine.models.vae_layout import vae_from_state_dict

__all__ = ["FLUX_AE_CONFIG", "FLUX_AE_SCALING_FACTOR", "FLUX_AE_SHIFT_FACTOR", "FLUX_LATENT_CHANNELS", "load_ae_module",
           "load_flux_ae"]

FLUX_AE_SCALING_FACTOR = 0.3611
FLUX_AE_SHIFT_FACTOR = 0.1159
FLUX_LATENT_CHANNELS = 16
# black-forest-labs/FLUX.1-dev vae/config.json (spec §1.5, §2.1): 16 latent channels, no quant convs.
FLUX_AE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": FLUX_LATENT_CHANNELS,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": FLUX_AE_SCALING_FACTOR,
    "shift_factor": FLUX_AE_SHIFT_FACTOR,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
# A key each single-file naming has (prefix-free), checked in order.
_FILE_LAYOUTS = {"ldm": "encoder.down.0.block.0.conv1.weight",
                 "diffusers": "encoder.down_blocks.0.resnets.0.conv1.weight"}
_AE_PARTS = ("encoder.", "decoder.")


def load_flux_ae(location: str | Path, *, family: str, dtype: Any = None, device: str = "cpu",
                 what: str = "model.ae") -> LoadedVae:
    """Load the FLUX AE from a file or a diffusers folder.

    Args:
        location: ``ae.safetensors``/``ae.sft`` (BFL naming) or a diffusers-named AE file, a diffusers ``vae/``
            folder, or a pipeline folder with ``vae/``.
        family: "flux1" or "chroma" (what the latents are for).
        dtype: torch dtype to encode in (default float32); the identity is that of the float32 weights.
        device: where to put the module.
        what: the config key the location came from, for messages.

    Returns:
        The AE with scaling factor 0.3611 and shift factor 0.1159.

    Raises:
        ModelLoadError: a missing or unreadable location, no AE weights, or an AE that is not FLUX's (latent
            channels other than 16), naming the file.
    """
    path = Path(location).expanduser()
    vae = load_ae_module(path, what=what)
    channels = int(vae.config.latent_channels)
    if channels != FLUX_LATENT_CHANNELS:
        raise ModelLoadError(f"{path}: an AE with {channels} latent channels (an SD VAE?); FLUX and Chroma need their "
                             f"16-channel AE (ae.safetensors from black-forest-labs/FLUX.1-dev); check {what}")
    vae.register_to_config(shift_factor=FLUX_AE_SHIFT_FACTOR)
    loaded = ready_vae(vae, family, FLUX_AE_SCALING_FACTOR, str(path), dtype=dtype, device=device)
    loaded.shift_factor = FLUX_AE_SHIFT_FACTOR
    return loaded


def load_ae_module(location: str | Path, *, what: str = "model.ae", prefixes: tuple[str, ...] = ("",),
                   base: dict[str, Any] | None = None, label: str = "FLUX AE") -> Any:
    """The float32 ``AutoencoderKL`` of a file (LDM or diffusers naming) or a diffusers folder; channels unchecked.

    Args:
        location: the file or folder.
        what: the config key it came from, for messages.
        prefixes: where the AE's ``encoder.*`` / ``decoder.*`` keys may sit in a file, tried in order (SD3's
            all-in-one files: ``first_stage_model.``).
        base: the published config the sizes read off the shapes go into (default FLUX's).
        label: what the weights should be, for messages.

    Raises:
        ModelLoadError: a missing or unreadable location, or no AE weights in it (naming the file).
    """
    path = Path(location).expanduser()
    if path.is_dir():
        return _load_folder(path, what)
    return _load_file(path, what, prefixes, FLUX_AE_CONFIG if base is None else base, label)


def _load_file(path: Path, what: str, prefixes: tuple[str, ...], base: dict[str, Any], label: str) -> Any:
    header = read_flux_header(path, what)
    check_not_adapter(header, what)
    found = next(((prefix, name) for prefix in prefixes for name, marker in _FILE_LAYOUTS.items()
                  if prefix + marker in header.shapes), None)
    if found is None:
        raise ModelLoadError(f"{path}: no {label} weights found{_what_it_is(header.shapes)}; {what} must be the AE "
                             "file (ae.safetensors, keys encoder.* / decoder.*) or a diffusers vae/ folder")
    prefix, layout = found
    keys = {key[len(prefix):]: key for key in header.shapes
            if key.startswith(prefix) and key[len(prefix):].startswith(_AE_PARTS)}
    shapes = {name: header.shapes[key] for name, key in keys.items()}
    try:
        config = infer_vae_config(shapes, layout, base)
    except ConfigInferenceError as error:
        raise ModelLoadError(f"{path}: {error} ({what})") from error
    import torch

    state = read_state(path, keys, dtype=torch.float32)
    return vae_from_state_dict(state, layout, path, config)


def _what_it_is(keys: Any) -> str:
    """A hint for a file that is not an AE: what it looks like instead."""
    if any(key.startswith("first_stage_model.") for key in keys):
        return " (it looks like an SD checkpoint, whose VAE has 4 latent channels)"
    if any(key.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for key in keys):
        return " (it looks like a FLUX transformer)"
    if any(key.startswith(("encoder.block.", "shared.", "text_model.")) for key in keys):
        return " (it looks like a text encoder)"
    return ""


def _load_folder(folder: Path, what: str) -> Any:
    from diffusers import AutoencoderKL

    vae_folder = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
    if not (vae_folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: a folder without an AE (no vae/config.json or config.json); point {what} "
                             "at ae.safetensors or a diffusers vae/ folder")
    try:
        return AutoencoderKL.from_pretrained(str(vae_folder), local_files_only=True).float()
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{vae_folder}: cannot load the AE ({error})") from error
