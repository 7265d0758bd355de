"""The SD3 / SD3.5 VAE as a diffusers ``AutoencoderKL``, offline (spec §8.2).

It is the FLUX AE's architecture (16 latent channels, ×8, no quant convs, LDM key names) with other latent
factors: the denoiser sees ``(z - 0.0609) * 1.5305`` of the raw latent z (sd-scripts' ``process_in``; the latent
cache keeps z). The weights are read by the FLUX AE's reader (``engine.models.flux.ae.load_ae_module``) from:

* Stability's single file (``first_stage_model.*``, the model file itself when it embeds the VAE);
* a standalone VAE file in LDM naming (with or without that prefix) or in diffusers naming;
* a diffusers ``vae/`` folder, or a pipeline folder holding one.

A VAE with other than 16 latent channels (an SD1/SDXL VAE) is refused, naming the file and ``model.vae``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.models.flux.ae import FLUX_AE_CONFIG, load_ae_module
from engine.models.flux.files import check_not_adapter, read_flux_header
from engine.models.single_file import ModelLoadError
from engine.models.vae import LoadedVae, ready_vae

__all__ = ["SD3_LATENT_CHANNELS", "SD3_VAE_CONFIG", "SD3_VAE_SCALING_FACTOR", "SD3_VAE_SHIFT_FACTOR", "load_sd3_vae"]

SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_SHIFT_FACTOR = 0.0609
SD3_LATENT_CHANNELS = 16
# stabilityai/stable-diffusion-3-medium-diffusers vae/config.json: FLUX's AE config with SD3's factors.
SD3_VAE_CONFIG: dict[str, Any] = {**FLUX_AE_CONFIG, "scaling_factor": SD3_VAE_SCALING_FACTOR,
                                  "shift_factor": SD3_VAE_SHIFT_FACTOR}
_PREFIXES = ("", "first_stage_model.", "vae.")


def load_sd3_vae(location: str | Path, *, dtype: Any = None, device: str = "cpu", what: str = "model.vae") -> LoadedVae:
    """Load the SD3 VAE from a file or a diffusers folder.

    Args:
        location: a single file (Stability's model file, a standalone VAE in LDM or diffusers naming) or a
            diffusers ``vae/`` or pipeline folder.
        dtype: torch dtype to encode in (default float32); the identity is that of the float32 weights.
        device: where to put the module.
        what: the config key the location came from, for messages.

    Returns:
        The VAE of family "sd3" with scaling factor 1.5305 and shift factor 0.0609.

    Raises:
        ModelLoadError: a missing or unreadable location, no VAE weights, or a VAE that is not SD3's (latent
            channels other than 16), naming the file.
    """
    path = Path(location).expanduser()
    if path.is_file():
        check_not_adapter(read_flux_header(path, what), what, "SD3 VAE")
    vae = load_ae_module(path, what=what, prefixes=_PREFIXES, base=SD3_VAE_CONFIG, label="SD3 VAE")
    channels = int(vae.config.latent_channels)
    if channels != SD3_LATENT_CHANNELS:
        raise ModelLoadError(f"{path}: a VAE with {channels} latent channels (an SD1/SDXL VAE?); SD3 and SD3.5 need "
                             f"their 16-channel VAE (the one inside sd3_medium.safetensors, or a diffusers vae/ "
                             f"folder of stable-diffusion-3); check {what}")
    vae.register_to_config(shift_factor=SD3_VAE_SHIFT_FACTOR)
    loaded = ready_vae(vae, "sd3", SD3_VAE_SCALING_FACTOR, str(path), dtype=dtype, device=device)
    loaded.shift_factor = SD3_VAE_SHIFT_FACTOR
    return loaded
