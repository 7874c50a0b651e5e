"""A device's profile (which share, what memory budget) and the training plan that fits it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate.client.budget import parse_size
from pollinate.client.node import NODE_FIELDS, TLS_KEYS
from pollinate.client.planner import plan_within
from pollinate.config import RunConfig
from pollinate.deploy.certs import DeviceTls
from pollinate.methods.plan import Estimate, Plan

if TYPE_CHECKING:
    from pollinate.methods.base import Method


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
    tls: DeviceTls | None = None
    """The device's own certificate for a service of the server besides Flower (SFPrompt's body); None in
    simulation, where clients use the server's throw-away folder."""

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
        return cls(partition_id, budget, data_path, fields, device_tls(node_config))

    def client(self, node_id: int) -> int:
        """The client number seeds are drawn for: the partition, or the node's id on a device."""
        return self.partition_id if self.partition_id >= 0 else node_id % 1_000_003


def device_tls(node_config: Mapping[str, Any]) -> DeviceTls | None:
    """The device's TLS identity from :data:`TLS_KEYS` (all three or none), or the one-line error."""
    given = {k: str(node_config.get(k) or "") for k in TLS_KEYS}
    if not any(given.values()):
        return None
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise ValueError(f"node config: {missing[0]} is missing; give {', '.join(TLS_KEYS)} together "
                         "(`pollinate agent` sets all three)")
    return DeviceTls(Path(given["certs"]), given["node-name"], given["server-host"])


def plan_for(method: Method, profile: DeviceProfile) -> tuple[Plan, Estimate]:
    """The most capable plan within the budget (ValueError when none fits); the configured plan (the
    most capable candidate) and its estimate when the device declared no budget."""
    if profile.budget is None:
        dims = method.dims()
        plan = method.candidates(dims, profile.partition_id)[0]
        return plan, method.estimate(dims, plan)
    return plan_within(method, profile.budget, profile.partition_id, key="memory-budget")
