"""LoRA-family training (kohya LoRA/LoCon, LyCORIS, DyLoRA): a network on the UNet and text encoders learns.

The network's backend (`NETWORK_TYPES[...].backend`) picks its builder and the ss_network_module written into the
saved file's metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.config.choices import NETWORK_TYPES
from engine.models.families import family_info
from engine.networks.dylora import dylora_network
from engine.networks.lycoris_network import lycoris_network
from engine.train.learning_rates import learning_rates, lora_trains_text_encoders

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.loaded_model import LoadedModel


class LoraMethod:
    """A kohya-format LoRA/LoCon network on the UNet and text encoders (spec §5)."""

    name = "lora"

    def __init__(self, config: RunConfig, model: LoadedModel, base_dir: Path):
        self.config = config
        section = config.network
        rates = learning_rates(config, len(model.text.encoders))
        self.rates = rates
        self.trains_unet = rates.unet > 0 and not section.train_text_encoder_only
        self.trains_text_encoders = lora_trains_text_encoders(config, len(model.text.encoders))
        backend = NETWORK_TYPES[section.network_type].backend
        self.network_module = NETWORK_MODULES[backend] if backend != "kohya" else \
            family_info(model.family).kohya_network_module
        self.network = NETWORK_BUILDERS[backend](config, model, self.trains_unet, self.trains_text_encoders)
        # An encoder the network put no modules on does not train (FLUX's T5 without train_t5xxl): it stays in eval
        # mode, with no dropout and no graph kept through it.
        built = getattr(self.network, "text_encoder_loras", None)
        if built is not None:
            self.trains_text_encoders = [trains and bool(loras)
                                         for trains, loras in zip(self.trains_text_encoders, built, strict=True)]
        if section.network_weights:
            self._load_start_weights(base_dir / section.network_weights)
        self.network.apply_to()

    def _load_start_weights(self, path: Path) -> None:
        from engine.networks.network_file import read_network_file

        tensors, _ = read_network_file(path)
        self.network.load_kohya_state_dict(tensors)

    def param_groups(self) -> list[dict]:
        text_rates = [rate if trains else 0.0
                      for rate, trains in zip(self.rates.text_encoders, self.trains_text_encoders, strict=True)]
        return self.network.prepare_optimizer_params(self.rates.unet if self.trains_unet else 0.0, text_rates)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.network.parameters() if parameter.requires_grad]

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.network]

    def trained_state(self) -> dict[str, torch.Tensor]:
        return self.network.kohya_state_dict()

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network.load_kohya_state_dict(tensors)

    def save(self, path_without_suffix: Path, metadata: dict[str, str]) -> Path:
        from engine.networks.network_file import save_dtype, save_network_file

        save_as = self.config.saving.save_model_as
        tensors = self.network.kohya_state_dict(save_dtype(self.config.saving.save_precision))
        path = path_without_suffix.with_name(f"{path_without_suffix.name}.{save_as}")
        return save_network_file(path, tensors, metadata, save_as=save_as)

    def describe(self) -> str:
        counts = self.network.module_count()
        return ", ".join(f"{part}: {count} modules" for part, count in counts.items())


def kohya_network(config: RunConfig, model: LoadedModel, train_unet: bool, train_text: list[bool]) -> Any:
    """LoRA and LoCon in kohya's own format (engine.networks.lora)."""
    from engine.networks.lora import create_lora_network, network_options

    return create_lora_network(model.unet, model.text.encoders, model.family, train_unet=train_unet,
                               train_text_encoder=train_text, **network_options(config.network))


# A network builder returns an nn.Module with apply_to(), prepare_optimizer_params(unet_lr, text_lrs),
# kohya_state_dict(dtype=None), load_kohya_state_dict(tensors) and module_count(), like LoRANetwork.
NetworkBuilder = Callable[["RunConfig", "LoadedModel", bool, list[bool]], Any]
NETWORK_BUILDERS: dict[str, NetworkBuilder] = {"kohya": kohya_network, "lycoris": lycoris_network,
                                               "dylora": dylora_network}
NETWORK_MODULES = {"kohya": "networks.lora", "lycoris": "lycoris.kohya", "dylora": "networks.dylora"}
