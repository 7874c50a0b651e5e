"""What crosses the wire between the ServerApp and the ClientApps: record keys and conversions.

Every record and metric name used in a message is a constant here, so the server, the clients and the
strategies agree on them by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

ARRAYS = "arrays"
BASE = "base-delta"  # the base-weight deltas a node still has to merge (FLoRA, FedEx-LoRA)
CONFIG = "config"
METRICS = "metrics"

REFUSED = 1001  # error code of a client that refuses an instruction (no plan fits its budget)

ROUND = "server-round"
BASE_FROM = "base-from"  # the base version the deltas in BASE start from
BASE_TO = "base-to"  # ... and the version they lead to
NUM_EXAMPLES = "num-examples"
RANK = "lora-rank"
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
MICRO_BATCH = "micro-batch"
GRAD_ACCUM = "grad-accum"
SEQ_LEN = "seq-len"
CHECKPOINTING = "checkpointing"
BASE_VERSION = "base-version"  # rounds merged into the replying process's base weights
BASE_FINGERPRINT = "base-fingerprint"  # a projection of those weights, to check sync
CATCH_UP = "catch-up"  # 1: the process holds an older base than it was sent; resend from BASE_VERSION
EVAL_LOSS = "eval-loss"
ACCURACY = "accuracy"


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of fp32 tensors (ArrayRecord rejects bfloat16)."""
    return ArrayRecord({k: v.detach().to(torch.float32).contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord, in its key order."""
    return dict(record.to_torch_state_dict())


def arrays_of(msg: Message) -> ArrayRecord:
    """The ArrayRecord a message carries."""
    return msg.content.array_records[ARRAYS]


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


def run_config_of(record: ConfigRecord) -> dict[str, bool | int | float | str]:
    """The run configuration inside a ConfigRecord made by :func:`config_record`."""
    return {k: v for k, v in record.items()  # type: ignore[misc]
            if k not in (ROUND, BASE_FROM, BASE_TO)}


def metric(record: MetricRecord, key: str, default: float = 0.0) -> float:
    """A scalar metric, ``default`` when absent."""
    value = record.get(key, default)
    return float(value) if isinstance(value, int | float) else default


class _Serialisable(Protocol):
    """Flower's records, arrays and chunks: each serialises itself and names its children."""

    @property
    def children(self) -> Mapping[str, _Serialisable] | None: ...

    def deflate(self) -> bytes: ...


def wire_bytes(obj: _Serialisable) -> int:
    """Bytes of the serialised object tree Flower transmits (record, arrays, their chunks)."""
    return len(obj.deflate()) + sum(wire_bytes(child) for child in (obj.children or {}).values())
