"""The memory plan at the start of a run on a GPU (issue 16): its figures go into the `start` event, and a plan that
does not fit the card is a warning naming the changes that would make it fit, before the model is even loaded."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from engine.config.schema import RunConfig
from engine.train.reporting import RunLog

__all__ = ["memory_plan_check"]


def memory_plan_check(config: RunConfig, base_dir: Path, log: RunLog, *, device_type: str,
                      capacity: int | None = None) -> dict[str, Any] | None:
    """The plan's summary for the `start` event, or None on a CPU (no card to fit; the trace costs CPU seconds).

    `capacity` defaults to the detected GPU's memory. A planner failure never stops the run: it is logged."""
    if device_type != "cuda":
        return None
    from engine.plan import GIB, make_plan

    traces: dict = {}  # the step traced here is the fit's starting point: traced once
    try:
        plan = make_plan(config, base_dir, gpu_capacity=capacity, traces=traces)
    except Exception as error:  # noqa: BLE001 - the plan is advice; the run goes on without it
        log.line(f"memory plan unavailable: {type(error).__name__}: {error}")
        log.line(traceback.format_exc(limit=3))
        return None
    summary = {"gpu_peak_bytes": plan.gpu_peak, "gpu_needed_bytes": plan.gpu_needed,
               "gpu_capacity_bytes": plan.gpu_capacity, "fits": plan.fits}
    capacity_text = f"{plan.gpu_capacity / GIB:.1f} GiB" if plan.gpu_capacity else "an unknown size"
    log.line(f"memory plan: about {plan.gpu_needed / GIB:.1f} GiB of the GPU's {capacity_text} "
             f"(peak allocation {plan.gpu_peak / GIB:.1f} GiB)")
    if plan.fits is False:
        log.event("warning", where="training",
                  message=f"the memory plan needs about {plan.gpu_needed / GIB:.1f} GiB and the GPU has "
                          f"{capacity_text}: this run will most likely run out of GPU memory",
                  hint=_fit_hint(config, base_dir, plan.gpu_capacity, traces))
    return summary


def _fit_hint(config: RunConfig, base_dir: Path, capacity: int, traces: dict) -> str:
    from engine.plan.fit import fit_to_gpu

    try:
        result = fit_to_gpu(config, base_dir, capacity, traces=traces)
    except Exception:  # noqa: BLE001 - the hint falls back to the command
        result = None
    command = "python -m engine plan CONFIG --fit (or Parameters > Fit to my GPU)"
    if result is None or not result.changes:
        return f"lower the resolution or the batch size; {command} lists what it can change"
    changes = ", ".join(f"{change.key} = {change.value}" for change in result.changes)
    verdict = "fits with" if result.fits else "still does not fit even with"
    return f"the plan {verdict}: {changes} ({command})"
