"""Training methods as small strategies over one trainer: what is trainable, how it is saved.

The trainer owns the loop (data, noise, loss, optimizer steps, saving schedule, stop and resume); a method only
says which parameters learn, with which learning rates, and how its result is written. Adding DreamBooth or
Textual Inversion means adding an entry to `METHODS`, not a second loop. This module is the registry: each method
lives in its own module (method_lora, method_full, method_ti) and none of them imports this one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from engine.train.method_full import full_model_method
from engine.train.method_lora import LoraMethod
from engine.train.method_ti import TextualInversionMethod

if TYPE_CHECKING:
    from engine.config.schema import RunConfig
    from engine.models.loaded_model import LoadedModel


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


MethodFactory = Callable[["RunConfig", "LoadedModel", Path], Method]
METHODS: dict[str, MethodFactory] = {"lora": LoraMethod, "textual_inversion": TextualInversionMethod,
                                      "dreambooth": full_model_method, "finetune": full_model_method}


def create_method(config: RunConfig, model: LoadedModel, base_dir: Path) -> Method:
    factory = METHODS.get(config.method)
    if factory is None:
        raise NotImplementedError(f"method = {config.method!r} is not available yet; choose one of "
                                  f"{', '.join(METHODS)}")
    return factory(config, model, base_dir)
