"""Training methods as small strategies over one trainer: what is trainable, how it is saved.

The trainer owns the loop (data, noise, loss, optimizer steps, saving schedule, stop and resume); a method only
says which parameters learn, with which learning rates, and how its result is written. Adding DreamBooth or
Textual Inversion means adding an entry to `METHODS`, not a second loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from engine.config.choices import NETWORK_TYPES
from engine.models.families import family_info
from engine.networks.dylora import dylora_network
from engine.networks.lycoris_network import lycoris_network
from engine.train.method_full import full_model_method
from engine.train.method_ti import TextualInversionMethod

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.loading import LoadedModel


@dataclass(frozen=True)
class LearningRates:
    """Per-part learning rates after the config's fallbacks; 0 means that part is frozen."""

    unet: float
    text_encoders: tuple[float, ...]


def learning_rates(config: RunConfig, text_encoder_count: int) -> LearningRates:
    section = config.optimizer
    base = section.learning_rate
    unet = base if section.unet_lr is None else section.unet_lr
    first = base if section.text_encoder_lr is None else section.text_encoder_lr
    second = first if section.text_encoder2_lr is None else section.text_encoder2_lr
    # A third encoder (SD3's T5) takes the second's rate, as sd-scripts' `--text_encoder_lr a b` does.
    return LearningRates(unet, (first, *[second] * max(0, text_encoder_count - 1))[:text_encoder_count])


class Method(Protocol):
    """What the trainer needs from a training method.

    Optional hooks, looked up with getattr by the trainer: `prepare_captions(captions) -> captions` and
    `prepare_prompt(prompt) -> prompt` for sample prompts (e.g. Textual Inversion puts its token in),
    `before_training(step, total_steps)`, `after_update()` (runs after each optimizer step, e.g. to restore frozen
    embedding rows), `metadata_kind` ("lora", "textual-inversion" or "" for full checkpoints; default "lora") and
    `network_module` (ss_network_module; default "networks.lora").
    """

    name: str
    trains_unet: bool
    trains_text_encoders: list[bool]

    def param_groups(self) -> list[dict]: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def trainable_modules(self) -> list[torch.nn.Module]: ...

    def trained_state(self) -> dict[str, torch.Tensor]: ...

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def save(self, path_without_suffix: Path, metadata: dict[str, str]) -> Path: ...

    def describe(self) -> str: ...


class LoraMethod:
    """A kohya-format LoRA/LoCon network on the UNet and text encoders (spec §5)."""

    name = "lora"

    def __init__(self, config: RunConfig, model: LoadedModel, base_dir: Path):
        self.config = config
        section = config.network
        rates = learning_rates(config, len(model.text.encoders))
        self.rates = rates
        self.trains_unet = rates.unet > 0 and not section.train_text_encoder_only
        caches_text = config.training.cache_text_encoder_outputs
        self.trains_text_encoders = [lr > 0 and not section.train_unet_only and not caches_text
                                     for lr in rates.text_encoders]
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
    from engine.networks.lora import create_lora_network

    section = config.network
    return create_lora_network(
        model.unet, model.text.encoders, model.family, dim=section.network_dim, alpha=section.network_alpha,
        conv_dim=section.conv_dim, conv_alpha=section.conv_alpha, dropout=section.network_dropout,
        rank_dropout=section.rank_dropout, module_dropout=section.module_dropout, train_unet=train_unet,
        train_text_encoder=train_text, network_args=section.network_args,
    )


# A network builder returns an nn.Module with apply_to(), prepare_optimizer_params(unet_lr, text_lrs),
# kohya_state_dict(dtype=None), load_kohya_state_dict(tensors) and module_count(), like LoRANetwork.
NetworkBuilder = Callable[["RunConfig", "LoadedModel", bool, list[bool]], Any]
NETWORK_BUILDERS: dict[str, NetworkBuilder] = {"kohya": kohya_network, "lycoris": lycoris_network,
                                               "dylora": dylora_network}
NETWORK_MODULES = {"kohya": "networks.lora", "lycoris": "lycoris.kohya", "dylora": "networks.dylora"}


MethodFactory = Callable[["RunConfig", "LoadedModel", Path], Method]
METHODS: dict[str, MethodFactory] = {"lora": LoraMethod, "textual_inversion": TextualInversionMethod,
                                      "dreambooth": full_model_method, "finetune": full_model_method}


def create_method(config: RunConfig, model: LoadedModel, base_dir: Path) -> Method:
    factory = METHODS.get(config.method)
    if factory is None:
        raise NotImplementedError(f"method = {config.method!r} is not available yet; choose one of "
                                  f"{', '.join(METHODS)}")
    return factory(config, model, base_dir)
