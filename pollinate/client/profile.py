"""A device's profile (which share, what memory budget) and the training plan that fits it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pollinate.client.budget import parse_size
from pollinate.client.planner import plan_within
from pollinate.config import RunConfig
from pollinate.methods.plan import Estimate, Plan

if TYPE_CHECKING:
    from pollinate.methods.base import Method


@dataclass(frozen=True)
class DeviceProfile:
    """What a node says about itself: its data share and its memory budget (bytes or None)."""

    partition_id: int
    budget: int | None

    @classmethod
    def of(cls, node_config: Mapping[str, Any], cfg: RunConfig) -> DeviceProfile:
        """From ``--node-config`` (deployment) or the run's per-client lists (simulation)."""
        partition_id = int(node_config["partition-id"])
        declared = node_config.get("memory-budget")
        budget = (parse_size(declared, "memory-budget") if declared not in (None, "")
                  else cfg.memory.budget_for(partition_id))
        return cls(partition_id, budget)


def plan_for(method: Method, profile: DeviceProfile) -> tuple[Plan, Estimate]:
    """The most capable plan within the budget (ValueError when none fits); the configured plan (the
    most capable candidate) and its estimate when the device declared no budget."""
    if profile.budget is None:
        dims = method.dims()
        plan = method.candidates(dims, profile.partition_id)[0]
        return plan, method.estimate(dims, plan)
    return plan_within(method, profile.budget, profile.partition_id, key="memory-budget")
