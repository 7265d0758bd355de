"""How much GPU and system memory a run will take, before it starts (issue 16): `python -m engine plan CONFIG`."""

from engine.plan.estimate import GIB, MemoryPlan, PlanItem, make_plan, optimizer_state_bytes

__all__ = ["GIB", "MemoryPlan", "PlanItem", "make_plan", "optimizer_state_bytes"]
