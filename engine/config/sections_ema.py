"""Config section for the exponential moving average (EMA) of the trained weights (engine.train.ema)."""

from __future__ import annotations

from typing import Literal

from engine.config.base import StrictModel, setting

# Where the averaged copy is kept: on the training device, or in host memory.
EmaDevice = Literal["gpu", "cpu"]
# What a save writes: the EMA weights as an extra file beside each checkpoint, or in the checkpoint itself.
EmaSave = Literal["beside", "instead"]


class EmaSection(StrictModel):
    """A smoothed copy of the trained weights, often better than the last weights of a run."""

    enabled: bool = setting(False, "Keep an exponential moving average (EMA) of the trained weights and save it.")
    decay: float = setting(
        0.999, "How much of the average each EMA update keeps; the rest comes from the current weights (0.999 "
        "averages over roughly the last 1000 updates, 0.99 over the last 100).", gt=0.0, lt=1.0,
    )
    warmup: bool = setting(
        True, "Ramp the decay up over the first updates, as diffusers' EMAModel: the k-th update uses "
        "min(decay, k / (9 + k)) (the first copies the weights), so early weights do not hold the average back; "
        "off: the first update copies the weights and every later one uses decay.", advanced=True,
    )
    update_every_n_steps: int = setting(
        1, "Update the EMA after every N optimizer steps; the decay applies per EMA update, so a larger N averages "
        "over more steps and costs less time (mostly with device = cpu).", ge=1, advanced=True, unit="steps",
    )
    device: EmaDevice = setting(
        "gpu", "Where the EMA copy (float32) is kept: gpu = the training device (fast, costs its memory), cpu = host "
        "memory (saves GPU memory; each update copies the weights over).", advanced=True,
    )
    save: EmaSave = setting(
        "beside", "beside = every save also writes the EMA weights as <name>-ema next to the trained file; instead = "
        "the saved files hold the EMA weights (states keep both, so a resume stays exact).",
    )
    sample_with_ema: bool = setting(False, "Draw sample images with the EMA weights instead of the current ones.")
    validate_with_ema: bool = setting(
        False, "Compute the validation loss (and so saving.keep_best's choice) with the EMA weights instead of the "
        "current ones; fits ema.save = instead, whose checkpoints hold the EMA weights.",
    )
