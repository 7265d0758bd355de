"""The exponential moving average (EMA) of the trained weights: a float32 shadow copy, updated after optimizer steps.

Which weights: the method's `trainable_parameters()`, named by where they sit in its `trainable_modules()`, so it
works the same for a LoRA-family network, a whole model (DreamBooth, fine-tuning) and an embedding (Textual
Inversion: the whole embedding matrix is averaged; its rows that do not train stay the base model's, and the average
of a constant is that constant).

The rule, as diffusers' EMAModel (update_after_step 0, no minimum decay): the k-th EMA update (k = 1, 2, ...)
sets `ema = decay_k * ema + (1 - decay_k) * weights` with decay_1 = 0 (the first update copies the weights) and,
from then on, decay_k = `ema.decay`, or with `ema.warmup` min(decay, k / (9 + k)). Updates come after every
`ema.update_every_n_steps`-th optimizer step, so the EMA depends only on the weights at those steps.

`applied()` puts the EMA into the model for a while (to save, sample or validate with it) and puts the trained
weights back bit for bit afterwards; they wait in host memory meanwhile, so it needs no device memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from engine.train.state import EmaSnapshot

# ss_* keys naming what an EMA file holds (the raw file of a "beside" save has none of them).
EMA_METADATA_PREFIX = "ss_ema"


def named_trainable_parameters(method: Any) -> dict[str, torch.nn.Parameter]:
    """The method's trainable parameters by a stable name: "<index of its module>.<parameter name>"."""
    wanted = {id(parameter): parameter for parameter in method.trainable_parameters()}
    named: dict[str, torch.nn.Parameter] = {}
    for index, module in enumerate(method.trainable_modules()):
        for name, parameter in module.named_parameters():
            if wanted.pop(id(parameter), None) is not None:
                named[f"{index}.{name}"] = parameter
    # Parameters outside the listed modules (none in Atelier's methods) still take part, by their position.
    named.update((f"extra.{position}", parameter) for position, parameter in enumerate(wanted.values()))
    return named


class WeightsEMA:
    """A float32 EMA of `parameters` kept on `device`.

    Args:
        parameters: the trained weights by name (see :func:`named_trainable_parameters`).
        decay: the decay once warmed up, in (0, 1).
        warmup: ramp the decay as diffusers' EMAModel does.
        every_n_steps: update after optimizer steps that are multiples of it.
        device: where the average lives (the training device, or the CPU).
    """

    def __init__(self, parameters: dict[str, torch.nn.Parameter], *, decay: float, warmup: bool,
                 every_n_steps: int, device: torch.device):
        self.parameters = parameters
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.device = device
        self.updates = 0
        # Allocated now, so a run that cannot hold the copy fails before training; overwritten by the first update.
        self.shadow = {name: parameter.detach().to(device, torch.float32, copy=True)
                       for name, parameter in parameters.items()}

    def decay_for_next_update(self) -> float:
        """decay_k of the coming update k = updates + 1 (see the module docstring)."""
        k = self.updates + 1
        if k == 1:
            return 0.0
        return min(self.decay, k / (9 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Update the average after optimizer step `step` (counted from 1) when it is due."""
        if step % self.every_n_steps:
            return
        decay = self.decay_for_next_update()
        shadows = list(self.shadow.values())
        current = [parameter.detach().to(self.device, torch.float32) for parameter in self.parameters.values()]
        if decay == 0.0:
            torch._foreach_copy_(shadows, current)
        else:
            torch._foreach_lerp_(shadows, current, 1.0 - decay)  # ema + (1 - decay) * (weights - ema)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block (in the trained weights' dtype), the trained weights
        again after it, exactly."""
        kept = {}
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                kept[name] = parameter.detach().to("cpu", copy=True)
                parameter.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.copy_(kept[name])

    def snapshot(self) -> EmaSnapshot:
        """What a training state stores (the tensors are the live ones: the state writer copies them to disk)."""
        return EmaSnapshot(dict(self.shadow), self.updates)

    @torch.no_grad()
    def restore(self, snapshot: EmaSnapshot) -> None:
        """Continue from a state's EMA.

        Raises:
            ValueError: the state's EMA holds other weights than this run trains (names or shapes differ).
        """
        if snapshot.tensors.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - snapshot.tensors.keys())[:3]
            extra = sorted(snapshot.tensors.keys() - self.shadow.keys())[:3]
            raise ValueError(f"the state's EMA holds other weights than this run trains (missing {missing}, "
                             f"unexpected {extra})")
        for name, tensor in snapshot.tensors.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"the state's EMA weight {name} is {tuple(tensor.shape)}, this run's "
                                 f"{tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.updates = snapshot.updates

    def metadata(self) -> dict[str, str]:
        """ss_* keys that mark a saved file as holding EMA weights, and how they were averaged."""
        return {EMA_METADATA_PREFIX: "true", f"{EMA_METADATA_PREFIX}_decay": repr(self.decay),
                f"{EMA_METADATA_PREFIX}_warmup": str(self.warmup),
                f"{EMA_METADATA_PREFIX}_update_every_n_steps": str(self.every_n_steps),
                f"{EMA_METADATA_PREFIX}_updates": str(self.updates)}


def make_ema(session: Any) -> WeightsEMA | None:
    """The run's EMA when ema.enabled, else None; built before training, from the weights as they start."""
    section = session.config.ema
    if not section.enabled:
        return None
    device = torch.device("cpu") if section.device == "cpu" else session.device
    return WeightsEMA(named_trainable_parameters(session.method), decay=section.decay, warmup=section.warmup,
                      every_n_steps=section.update_every_n_steps, device=device)



# What one save wrote: (path, extra fields of its checkpoint event).
SavedModel = tuple[Path, dict[str, Any]]


def save_models(method: Any, ema: WeightsEMA | None, mode: str, folder: Path, stem: str,
                metadata: dict[str, str]) -> list[SavedModel]:
    """The model files of one save under `stem`: the trained weights, and with an EMA (`mode` is ema.save) its
    weights beside them (`<stem>-ema`, a checkpoint event of kind "ema") or instead of them (`ema: true`)."""
    from engine.rundir.naming import ema_stem

    if ema is None:
        return [(method.save(folder / stem, metadata), {})]
    averaged_metadata = {**metadata, **ema.metadata()}
    if mode == "instead":
        with ema.applied():
            return [(method.save(folder / stem, averaged_metadata), {"ema": True})]
    trained = method.save(folder / stem, metadata)
    with ema.applied():
        averaged = method.save(folder / ema_stem(stem), averaged_metadata)
    return [(trained, {}), (averaged, {"kind": "ema"})]


def resume_ema(ema: WeightsEMA | None, snapshot: EmaSnapshot | None, log: Any) -> None:
    """Continue the state's EMA; a state saved without one (an older state, or a run without EMA) starts the EMA
    again from the resumed weights, and says so."""
    if ema is None:
        return
    if snapshot is None:
        ema.updates = 0  # the next update copies the resumed weights
        log.event("warning", message="the state resumed from holds no EMA of the weights, so the EMA starts again "
                  "from the resumed weights", hint="resume from a state saved with ema.enabled = true to continue "
                  "its EMA exactly", where="saving.resume")
        return
    try:
        ema.restore(snapshot)
    except ValueError as error:
        from engine.train.setup import RunInputError

        raise RunInputError(str(error), "resume with the same method, network and learning rates the state was "
                            "saved with", "saving.resume") from error
