"""Every training reply checked before aggregation (docs/reliability.md): one pipeline, one reason.

The checks run in order and the first that fails decides: the envelope (a reply to an instruction of
this round, from the node it was sent to, once), the metrics (every figure a finite number,
``num-examples`` an integer in [1, the cap]), the size of the payload before it is decoded (within what
the method's schema allows, +10%), decoding, the schema (the method's exact keys, dtypes and shapes),
the numerics (finite, no magnitude above :data:`MAX_ABS`) and the frozen part the client trained on (the
server's, by fingerprint). A reply that fails is a :class:`Rejection`; the round goes on without it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, Message

from pollinate import protocol
from pollinate.methods.base import Schema
from pollinate.protocol import ClientReport

MAX_ABS = 1e6
"""Largest magnitude an uploaded number may have: trained factors, square matrices and zeroth-order
scalars of a sane client are orders of magnitude below it; a value above it is an overflow or an attack."""
SIZE_SLACK = 1.10
"""Payload bytes a reply may carry over its schema's largest form, as a factor."""
ARRAY_HEADER = 256
"""Bytes each serialised array may add for its header (dtype, shape)."""
COUNTED = (protocol.NUM_EXAMPLES, protocol.TRAIN_LOSS, protocol.TRAIN_SECONDS, protocol.PEAK_MEM,
           protocol.PROCESS_PEAK, protocol.RUNTIME_BASELINE, protocol.BUDGET, protocol.ESTIMATE,
           protocol.EXAMPLES_SEEN, protocol.TOKENS_SEEN, protocol.BYTES_DOWN, protocol.BASE_VERSION,
           protocol.BASE_FINGERPRINT)
"""The figures a report reads as numbers: each must be one (a list, NaN or infinity is refused)."""
CHECKS = ("envelope", "metrics", "weight", "size", "decode", "schema", "numerics", "sync", "update", "setup")
"""Every check a reply can fail; ``setup`` is a strategy's own check of a setup exchange's answers."""
MIN_FOR_MEDIAN = 3
"""Accepted replies a round needs before the median of their update sizes means anything."""


@dataclass(frozen=True)
class Rejection:
    """A reply the round goes on without: the node, the check that failed and why."""

    node: int
    check: str
    """One of :data:`CHECKS`."""
    reason: str

    def event(self, server_round: int) -> dict[str, Any]:
        """Its ``rejected`` line in metrics.jsonl."""
        return {"round": server_round, "event": "rejected", "node_id": self.node, "check": self.check,
                "reason": self.reason}


class RoundChecks:
    """The checks of one round's training replies, in order; remembers whom it accepted.

    Parameters
    ----------
    method, server
        The run's method and the server's trainee (the reference of every upload schema).
    addressed : Mapping[str, int]
        Every instruction sent this round (catch-ups included): message id -> the node it went to.
    max_examples : int
        The largest ``num-examples`` a reply may claim.
    fingerprint, tolerance : float
        The server's frozen part and the method's tolerance (:attr:`Method.sync_tolerance`).
    missed : Collection[str]
        Instructions of earlier rounds that were still unanswered at their round's deadline.
    """

    def __init__(self, method: Any, server: Any, addressed: Mapping[str, int], max_examples: int,
                 fingerprint: float, tolerance: float, missed: Collection[str] = ()) -> None:
        self.method, self.server, self.addressed = method, server, dict(addressed)
        self.missed = set(missed)
        self.max_examples, self.fingerprint, self.tolerance = max_examples, fingerprint, tolerance
        self.accepted: set[int] = set()
        self._schemas: dict[tuple[tuple[str, int], ...], Schema | str] = {}

    def check(self, reply: Message) -> ClientReport | Rejection:
        """The reply's report, or why it is rejected. Error replies are the caller's (``failed``)."""
        node = reply.metadata.src_node_id

        def reject(check: str, reason: str) -> Rejection:
            return Rejection(node, check, reason)

        if (reason := self._envelope(reply)) is not None:
            return reject("envelope", reason)
        if protocol.METRICS not in reply.content.metric_records:
            return reject("metrics", "the reply carries no metrics")
        metrics = protocol.metrics_of(reply)
        if protocol.metric(metrics, protocol.CATCH_UP) == 1:  # it trained nothing: no figures to check
            return reject("sync", "base still behind after catch-up")
        if (reason := _numbers(metrics)) is not None:
            return reject("metrics", reason)
        if (reason := self._weight(metrics.get(protocol.NUM_EXAMPLES))) is not None:
            return reject("weight", reason)
        schema = self._schema({k[len(protocol.PLAN):].replace("-", "_"): int(protocol.metric(metrics, k))
                               for k in metrics if k.startswith(protocol.PLAN)})
        if isinstance(schema, str):
            return reject("schema", schema)
        arrays = protocol.arrays_of(reply)
        if (reason := _size(arrays, schema)) is not None:
            return reject("size", reason)
        try:
            report = ClientReport.of(reply)
        except Exception as error:  # noqa: BLE001 - an untrusted payload may fail to decode in any way
            return reject("decode", f"the payload does not decode ({type(error).__name__}: {error})"[:300])
        if (reason := schema.check(report.upload)) is not None:
            return reject("schema", reason)
        if (reason := _numerics(report.upload)) is not None:
            return reject("numerics", reason)
        if (reason := schema.check_values(report.upload)) is not None:
            return reject("schema", reason)
        if abs(report.fingerprint - self.fingerprint) > self.tolerance * max(abs(self.fingerprint), 1.0):
            return reject("sync", "base out of sync")
        self.accepted.add(node)
        return report

    def oversized(self, reports: list[ClientReport], bound: float) -> dict[int, tuple[float, float]]:
        """Node -> (update size, the limit) of every report whose update size (:meth:`Method.update_size`)
        exceeds ``bound`` times the round's median; none when ``bound`` is 0 or fewer than
        :data:`MIN_FOR_MEDIAN` reports passed."""
        if bound <= 0 or len(reports) < MIN_FOR_MEDIAN:
            return {}
        sizes = [self.method.update_size(self.server, r.upload) for r in reports]
        limit = bound * statistics.median(sizes)
        return {r.node: (size, limit) for r, size in zip(reports, sizes, strict=True) if size > limit}

    def outliers(self, reports: list[ClientReport], bound: float) -> list[Rejection]:
        """``robust = "none"``: a rejection for every :meth:`oversized` report."""
        return [Rejection(node, "update", f"update size {size:.4g} is above {bound:g} x the round's "
                                          f"median {limit / bound:.4g}")
                for node, (size, limit) in self.oversized(reports, bound).items()]

    def clipped(self, reports: list[ClientReport], bound: float
                ) -> tuple[list[ClientReport], dict[int, float]]:
        """``robust = "clip"``: every :meth:`oversized` report scaled down to the limit
        (:meth:`Method.scale_update`); the reports, and each clipped node's factor."""
        factors = {node: limit / size for node, (size, limit) in self.oversized(reports, bound).items()}

        def scaled(r: ClientReport) -> ClientReport:
            upload = self.method.scale_update(self.server, r.upload, factors[r.node])
            return dataclasses.replace(r, upload=upload)

        return [scaled(r) if r.node in factors else r for r in reports], factors

    def _envelope(self, reply: Message) -> str | None:
        node = reply.metadata.src_node_id
        to = self.addressed.get(reply.metadata.reply_to_message_id)
        if to is None and reply.metadata.reply_to_message_id in self.missed:
            return "stale: a reply to an instruction of an earlier round, after its deadline"
        if to is None:
            return "a reply to no instruction of this round (stale or foreign)"
        if to != node:
            return f"a reply from node {node} to the instruction sent to node {to}"
        if node in self.accepted:
            return "a second reply from this node this round"
        return None

    def _weight(self, value: object) -> str | None:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"num-examples {value!r} is not an integer"
        if not 1 <= value <= self.max_examples:
            return f"num-examples {value} is outside 1..{self.max_examples}"
        return None

    def _schema(self, plan: dict[str, int]) -> Schema | str:
        key = tuple(sorted(plan.items()))
        if key not in self._schemas:
            try:
                self._schemas[key] = self.method.upload_schema(self.server, plan)
            except ValueError as error:
                self._schemas[key] = str(error)
        return self._schemas[key]


def _numbers(metrics: Mapping[str, object]) -> str | None:
    """Every figure a report reads is one finite number."""
    for key in COUNTED:
        value = metrics.get(key, 0)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return f"{key} {value!r} is not a finite number"
    return None


def _size(arrays: ArrayRecord, schema: Schema) -> str | None:
    """The payload, before it is decoded, within what the schema allows."""
    count = len(arrays)
    if count > schema.max_arrays:
        return f"{count} arrays, the method's uploads have at most {schema.max_arrays}"
    size = sum(len(array.data) for array in arrays.values())
    allowed = int(SIZE_SLACK * schema.max_bytes) + ARRAY_HEADER * count
    if size > allowed:
        return f"{size} payload bytes, at most {allowed} allowed"
    return None


def _numerics(upload: Mapping[str, torch.Tensor]) -> str | None:
    """Every number finite and no larger in magnitude than :data:`MAX_ABS`."""
    for key, tensor in upload.items():
        if not tensor.is_floating_point():
            continue
        if not bool(torch.isfinite(tensor).all()):
            return f"{key} holds NaN or infinite values"
        if tensor.numel() and float(tensor.abs().max()) > MAX_ABS:
            return f"{key} holds values above {MAX_ABS:g} in magnitude"
    return None


@dataclass(frozen=True)
class Bounded:
    """What a round keeps of the reports that passed every check, under the update-size bound."""

    kept: list[ClientReport]
    rejected: list[Rejection]
    clipped: dict[int, float]
    """Node -> the factor its update was scaled by."""


class BoundPolicy(Protocol):
    """What a round does with an update above ``update-bound`` times its median (``robust``)."""

    def apply(self, checks: RoundChecks, reports: list[ClientReport], bound: float) -> Bounded:
        """The reports kept, the rejections, the clipped nodes."""
        ...


class RejectOversized:
    """``robust = "none"``: a report whose update is above the bound is rejected (check ``update``)."""

    def apply(self, checks: RoundChecks, reports: list[ClientReport], bound: float) -> Bounded:
        rejected = checks.outliers(reports, bound)
        dropped = {r.node for r in rejected}
        return Bounded([r for r in reports if r.node not in dropped], rejected, {})


class ClipOversized:
    """``robust = "clip"``: a report whose update is above the bound is scaled down to it and kept."""

    def apply(self, checks: RoundChecks, reports: list[ClientReport], bound: float) -> Bounded:
        kept, factors = checks.clipped(reports, bound)
        return Bounded(kept, [], factors)


BOUND_POLICIES: dict[str, BoundPolicy] = {"none": RejectOversized(), "clip": ClipOversized()}
"""The value of ``robust`` -> what the round does with an update above ``update-bound``."""

__all__ = ["BOUND_POLICIES", "CHECKS", "MAX_ABS", "BoundPolicy", "Bounded", "ClipOversized", "Rejection",
           "RejectOversized", "RoundChecks"]

