"""A device's profile (which share, what memory budget) and the training plan that fits it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pollinate.client.budget import parse_size
from pollinate.client.planner import plan_within
from pollinate.config import RunConfig
from pollinate.methods.plan import Estimate, Plan

if TYPE_CHECKING:
    from pollinate.methods.base import Method


NODE_FIELDS = {"prompt-field": "prompt", "response-field": "response", "text-field": "text",
               "label-field": "label"}
"""Node-config keys naming a column of the device's data file -> the field of the run's ``data`` table."""


@dataclass(frozen=True)
class DeviceProfile:
    """What a node says about itself: its data (a share of the run's dataset, or a file of its own) and its
    memory budget (bytes or None)."""

    partition_id: int
    """The share of the run's dataset this node trains on (simulation); -1 when it has a file of its own."""
    budget: int | None
    data_path: str | None = None
    """The device's own .jsonl/.csv data (``--node-config data-path=...``); the server never reads it."""
    fields: dict[str, str] = field(default_factory=dict)
    """Column names of that file that differ from the run's ``data.*`` fields (``prompt-field=question``)."""

    @classmethod
    def of(cls, node_config: Mapping[str, Any], cfg: RunConfig) -> DeviceProfile:
        """From ``--node-config`` (deployment) or the run's per-client lists (simulation)."""
        data_path = str(node_config.get("data-path") or "") or None
        if data_path is None and "partition-id" not in node_config:
            raise ValueError("node config: give data-path (this device's own .jsonl/.csv file) or "
                             "partition-id (a share of the run's dataset)")
        partition_id = int(node_config["partition-id"]) if data_path is None else -1
        declared = node_config.get("memory-budget")
        budget = (parse_size(declared, "memory-budget") if declared not in (None, "")
                  else cfg.memory.budget_for(partition_id) if partition_id >= 0 else None)
        fields = {NODE_FIELDS[k]: str(v) for k, v in node_config.items() if k in NODE_FIELDS and v}
        return cls(partition_id, budget, data_path, fields)

    def client(self, node_id: int) -> int:
        """The client number seeds are drawn for: the partition, or the node's id on a device."""
        return self.partition_id if self.partition_id >= 0 else node_id % 1_000_003


def plan_for(method: Method, profile: DeviceProfile) -> tuple[Plan, Estimate]:
    """The most capable plan within the budget (ValueError when none fits); the configured plan (the
    most capable candidate) and its estimate when the device declared no budget."""
    if profile.budget is None:
        dims = method.dims()
        plan = method.candidates(dims, profile.partition_id)[0]
        return plan, method.estimate(dims, plan)
    return plan_within(method, profile.budget, profile.partition_id, key="memory-budget")
