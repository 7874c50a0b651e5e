"""A device's profile (which share, what memory budget) and the training plan that fits it."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pollinate import models, workload
from pollinate.client.budget import parse_size
from pollinate.client.planner import Estimate, ModelDims, Plan, choose_plan, estimator_for, model_dims
from pollinate.config import DEFAULT_TARGETS, RunConfig
from pollinate.strategies import strategy_class


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


@functools.lru_cache(maxsize=8)
def dims(cfg: RunConfig) -> ModelDims:
    """The shapes the estimator needs, from the model's configuration (no weights loaded)."""
    config = models.model_config(cfg.model, cfg.task, max(workload.num_labels(cfg), 2))
    targets = cfg.lora.target_list(config.model_type if config.model_type in DEFAULT_TARGETS else "")
    return model_dims(config, targets, name=cfg.model)


def allowed_ranks(cfg: RunConfig, partition_id: int) -> list[int]:
    """The client's fixed rank, or, where the strategy takes mixed ranks, lora.rank halved down to 1."""
    if cfg.lora.ranks or not strategy_class(cfg.strategy).heterogeneous_ranks:
        return [cfg.lora.rank_for(partition_id)]
    ranks, r = [], cfg.lora.rank
    while r >= 1:
        ranks.append(r)
        r //= 2
    return ranks


def plan_for(cfg: RunConfig, profile: DeviceProfile) -> tuple[Plan, Estimate]:
    """The most capable plan within the budget (ValueError when none fits); the configured plan
    and its estimate when the device declared no budget."""
    ranks = allowed_ranks(cfg, profile.partition_id)
    if profile.budget is None:
        plan = Plan("lora", ranks[0], cfg.batch_size, 1, cfg.max_seq_len, checkpointing=False)
        return plan, estimator_for("lora").estimate(dims(cfg), plan, cfg.task)
    return choose_plan(dims(cfg), cfg.task, profile.budget, ranks=ranks, batch_size=cfg.batch_size,
                       seq_len=cfg.max_seq_len, key="memory-budget")
