"""The protocol between the ServerApp and the ClientApp: record keys, conversions, the client report.

Every record and metric name used in a message is a constant here, so the server, the clients and the
strategies agree on them by construction; this module lives beside neither app because both import it.
A plan's fields travel as ``plan.<field>``, a method's own figures as ``method.<name>``; the run
configuration travels with every instruction and is read back through the list of known keys, so a
per-message key never looks like a configuration error. A reply is read once, where it arrives, into a
:class:`ClientReport`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from pollinate.config import RunConfig, flat_keys

ARRAYS = "arrays"
BASE = "updates"  # the combined updates a node still has to merge (the versioned downlink)
CONFIG = "config"
METRICS = "metrics"

REFUSED = 1001  # error code of a client that refuses an instruction (no plan fits its budget)
TRAIN_FAILED = 1002  # error code of a client whose training raised (it stays up, its trainee is rebuilt)

ROUND = "server-round"
BASE_FROM = "base-from"  # the version the updates in BASE start from
BASE_TO = "base-to"  # ... and the version they lead to
SETUP = "setup"  # a setup exchange before round 1 (names what the strategy asks of the clients)
IDENTIFY = "identify"  # the SETUP request of the server's roll call: each node answers its PARTITION_ID
PARTITION_ID = "partition-id"  # a node's share: the name it keeps across restarts of the federation
NUM_EXAMPLES = "num-examples"
PLAN = "plan."  # prefix of every plan field in a reply: plan.rank, plan.micro-batch, ...
METHOD = "method."  # prefix of a method's own figures in a reply
SPLIT_UP = "split-bytes-up"  # the method figures of bytes a client sent and received beside Flower
SPLIT_DOWN = "split-bytes-down"  # (SFPrompt's activations and gradients): in the run's byte totals too
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
EXAMPLES_SEEN = "examples-seen"
TOKENS_SEEN = "tokens-seen"
BYTES_DOWN = "bytes-down"
PEAK_MEM = "peak-mem-bytes"  # the training's high-water mark above the runtime baseline
PROCESS_PEAK = "process-peak-bytes"  # the raw high-water mark of the process
RUNTIME_BASELINE = "runtime-baseline-bytes"  # resident bytes before any model was loaded
BUDGET = "budget-bytes"  # 0: the device declared none
ESTIMATE = "estimate-bytes"  # the planner's estimate of the plan's peak
BASE_VERSION = "base-version"  # updates merged into the replying process's frozen part
BASE_FINGERPRINT = "base-fingerprint"  # a projection of that frozen part, to check sync
CATCH_UP = "catch-up"  # 1: the process holds an older version than it was sent; resend from BASE_VERSION
EVAL_LOSS = "eval-loss"
ACCURACY = "accuracy"


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of fp32 tensors (ArrayRecord rejects bfloat16)."""
    return ArrayRecord({k: v.detach().to(torch.float32).contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord, in its key order."""
    return dict(record.to_torch_state_dict())


def arrays_of(msg: Message) -> ArrayRecord:
    """The ArrayRecord a message carries (empty when it carries none: a setup exchange, a catch-up ask)."""
    records = msg.content.array_records
    return records[ARRAYS] if ARRAYS in records else ArrayRecord()


def metrics_of(msg: Message) -> MetricRecord:
    """The MetricRecord a reply carries."""
    return msg.content.metric_records[METRICS]


def config_of(msg: Message) -> ConfigRecord:
    """The ConfigRecord an instruction carries."""
    return msg.content.config_records[CONFIG]


def base_of(msg: Message) -> ArrayRecord:
    """The base deltas an instruction carries (empty when there are none)."""
    records = msg.content.array_records
    return records[BASE] if BASE in records else ArrayRecord()


def config_record(values: Mapping[str, bool | int | float | str], server_round: int) -> ConfigRecord:
    """The run configuration plus the round number, as sent with every instruction."""
    return ConfigRecord({**values, ROUND: server_round})


_RUN_KEYS = frozenset(flat_keys(RunConfig))


def run_config_of(record: ConfigRecord) -> dict[str, bool | int | float | str]:
    """The run configuration inside a ConfigRecord made by :func:`config_record`: its known keys only,
    so the round, the versions and any per-message key never reach the configuration check."""
    return {k: v for k, v in record.items() if k in _RUN_KEYS}  # type: ignore[misc]


def metric(record: MetricRecord, key: str, default: float = 0.0) -> float:
    """A scalar metric, ``default`` when absent."""
    value = record.get(key, default)
    return float(value) if isinstance(value, int | float) else default


class _Serialisable(Protocol):
    """Flower's records, arrays and chunks: each serialises itself and names its children."""

    @property
    def children(self) -> Mapping[str, _Serialisable] | None: ...

    def deflate(self) -> bytes: ...


def downlink_bytes(message: Message) -> int:
    """Bytes of the state and the updates an instruction carries (counted alike by both apps)."""
    return wire_bytes(arrays_of(message)) + wire_bytes(base_of(message))


def wire_bytes(obj: _Serialisable) -> int:
    """Bytes of the serialised object tree Flower transmits (record, arrays, their chunks)."""
    return len(obj.deflate()) + sum(wire_bytes(child) for child in (obj.children or {}).values())


def plan_metrics(fields: Mapping[str, int | bool]) -> dict[str, int]:
    """A plan's fields as reply metrics: ``plan.micro-batch``, ``plan.rank``, ..."""
    return {PLAN + k.replace("_", "-"): int(v) for k, v in fields.items()}


def method_metrics(figures: Mapping[str, float]) -> dict[str, float]:
    """A method's own figures as reply metrics: ``method.<name>``."""
    return {METHOD + k: v for k, v in figures.items()}


@dataclass(frozen=True)
class ClientReport:
    """One training reply, read once where it arrives; the loop, the checks and the metrics use it."""

    node: int
    examples: int
    loss: float
    seconds: float
    plan: dict[str, int]
    """The plan's fields (``micro_batch``, ``rank``, ...), as the client chose them."""
    method_figures: dict[str, float]
    peak: int
    """The training's resident high-water mark above the runtime baseline, bytes."""
    process_peak: int
    baseline: int
    budget: int | None
    estimate: int
    examples_seen: int
    tokens_seen: int
    bytes_up: int
    bytes_down: int
    """Bytes the client received for this instruction, as it counted them."""
    version: int
    fingerprint: float
    upload: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def of(cls, reply: Message) -> ClientReport:
        """Read a (non-error) training reply."""
        m = metrics_of(reply)
        arrays = arrays_of(reply)
        return cls(
            node=reply.metadata.src_node_id, examples=int(metric(m, NUM_EXAMPLES)),
            loss=metric(m, TRAIN_LOSS), seconds=metric(m, TRAIN_SECONDS),
            plan={k[len(PLAN):].replace("-", "_"): int(metric(m, k)) for k in m if k.startswith(PLAN)},
            method_figures={k[len(METHOD):]: metric(m, k) for k in m if k.startswith(METHOD)},
            peak=int(metric(m, PEAK_MEM)), process_peak=int(metric(m, PROCESS_PEAK)),
            baseline=int(metric(m, RUNTIME_BASELINE)), budget=int(metric(m, BUDGET)) or None,
            estimate=int(metric(m, ESTIMATE)), examples_seen=int(metric(m, EXAMPLES_SEEN)),
            tokens_seen=int(metric(m, TOKENS_SEEN)), bytes_up=wire_bytes(arrays),
            bytes_down=int(metric(m, BYTES_DOWN)), version=int(metric(m, BASE_VERSION)),
            fingerprint=metric(m, BASE_FINGERPRINT), upload=from_record(arrays))

    @property
    def split_bytes(self) -> tuple[int, int]:
        """Bytes up and down beside Flower (a split method's body channel) during this training."""
        return int(self.method_figures.get(SPLIT_UP, 0)), int(self.method_figures.get(SPLIT_DOWN, 0))

    @property
    def over_budget(self) -> bool:
        """The measured peak went above the declared budget."""
        return self.budget is not None and self.peak > self.budget
