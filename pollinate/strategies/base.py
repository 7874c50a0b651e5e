"""What every pollinate LoRA strategy shares: the global adapter, the history of base deltas, and a
downlink per node that carries exactly the base deltas that node still has to merge.

A subclass only says how replies aggregate (:meth:`LoraStrategy.combine`) and how its clients behave
(:attr:`LoraStrategy.client_side`). Base versions count merged rounds: version v means the deltas of
rounds 1..v are in the base weights. Clients report the version they hold; a client whose process is
behind what it was sent asks for a catch-up, and :meth:`LoraStrategy.catch_up` answers it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from pollinate.adapters import LoraAdapter
from pollinate.aggregation import BaseDelta, LoraFactors, combine, to_flat, truncate
from pollinate.strategies import wire


@dataclass(frozen=True)
class ClientSide:
    """How a strategy's clients treat the adapter they receive."""

    freeze_a: bool = False
    """A is drawn from the run's seed and never trained or sent (FFA-LoRA)."""
    fresh_adapter: bool = False
    """Every round starts from B = 0 (the previous round was merged into the base: FLoRA)."""
    truncate: bool = False
    """The global adapter has the largest rank; each client keeps its first r_k components."""

    def prepare(self, adapter: LoraAdapter, model: nn.Module) -> None:
        """Set up a freshly attached adapter for this strategy."""
        if self.freeze_a:
            adapter.freeze_a(model)

    def receive(self, adapter: LoraAdapter, model: nn.Module, state: Mapping[str, torch.Tensor],
                seed: int) -> None:
        """Load a downlinked global adapter state the way this strategy's clients do."""
        if self.fresh_adapter:  # only a trained head travels; the factors restart from B = 0
            adapter.reset(model, seed)
            head = LoraFactors.from_state(adapter.trainable_state(model), adapter.config.alpha).extra
            adapter.load_state(model, state, keys=head)
            return
        if self.truncate:
            rank, alpha = adapter.config.rank, adapter.config.alpha
            state = truncate(LoraFactors.from_state(state, alpha), rank, alpha / rank).to_state()
        adapter.load_state(model, state)


@dataclass
class Aggregate:
    """What one round's replies combine into."""

    state: dict[str, torch.Tensor]
    """The next global adapter state to send (only the head when clients start fresh)."""
    base_delta: BaseDelta | None = None
    """What is merged into the base weights this round, if anything."""


class LoraStrategy(FedAvg):
    """Base of every pollinate strategy; subclasses implement :meth:`combine`."""

    client_side: ClassVar[ClientSide] = ClientSide()
    heterogeneous_ranks: ClassVar[bool] = False
    """Whether the rule is defined for clients of different ranks."""

    def __init__(self, *, rank: int, alpha: float, num_clients: int) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=num_clients,
                         min_available_nodes=num_clients)  # nodes register lazily: wait for all
        self.rank, self.alpha = rank, alpha  # the global adapter's rank (the largest client rank)
        self.history: list[BaseDelta] = []  # history[v - 1]: the delta of round v
        self.node_versions: dict[int, int] = {}
        self.last_delta: BaseDelta | None = None
        self._records: dict[tuple[int, int], ArrayRecord] = {}  # (since, version) -> the downlink

    @property
    def version(self) -> int:
        """Rounds merged into the server's base weights."""
        return len(self.history)

    def combine(self, clients: Sequence[LoraFactors], weights: Sequence[float]) -> Aggregate:
        """The rule: replies (grouped per module) and their weights -> the round's aggregate."""
        raise NotImplementedError

    # -- downlink ---------------------------------------------------------------------------------

    def base_record(self, since: int) -> tuple[ArrayRecord, int]:
        """The deltas of rounds since+1..version (combined, factored or dense) and ``since``.

        Built once per (since, version) and shared by every node at that version, so K nodes cost one
        record in time and memory, not K; records of older versions are dropped.
        """
        since = min(max(since, 0), self.version)
        if since == self.version:
            return ArrayRecord(), since
        key = (since, self.version)
        if key not in self._records:
            self._records = {k: r for k, r in self._records.items() if k[1] == self.version}
            self._records[key] = self.build_base_record(since)
        return self._records[key], since

    def build_base_record(self, since: int) -> ArrayRecord:
        """The record of the deltas since ``since`` (< version), built afresh."""
        return wire.to_record(to_flat(combine(self.history[since:])))

    def node_message(self, node_id: int, arrays: ArrayRecord, config: ConfigRecord,
                     since: int) -> Message:
        """The training instruction for one node, with the base deltas it lacks."""
        base, since = self.base_record(since)
        record = RecordDict({
            wire.ARRAYS: arrays, wire.BASE: base,
            wire.CONFIG: ConfigRecord({**config, wire.BASE_FROM: since, wire.BASE_TO: self.version}),
        })
        return Message(content=record, message_type="train", dst_node_id=node_id)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling, then one message per node carrying the deltas it still needs."""
        sampled = super().configure_train(server_round, arrays, config, grid)
        return [self.node_message(m.metadata.dst_node_id, arrays, config,
                                  self.node_versions.get(m.metadata.dst_node_id, 0)) for m in sampled]

    def catch_up(self, reply: Message, arrays: ArrayRecord, config: ConfigRecord) -> Message:
        """Answer a node whose process holds an older base than it was sent: resend from there."""
        held = int(wire.metric(wire.metrics_of(reply), wire.BASE_VERSION))
        return self.node_message(reply.metadata.src_node_id, arrays, config, held)

    # -- uplink -----------------------------------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the good replies; remember each node's base version; record the round's delta."""
        good = [m for m in replies if not m.has_error()]
        self.last_delta = None
        if not good:
            return None, None
        for m in good:  # the base version each node's process now holds
            self.node_versions[m.metadata.src_node_id] = int(
                wire.metric(wire.metrics_of(m), wire.BASE_VERSION))
        weights = [wire.metric(wire.metrics_of(m), wire.NUM_EXAMPLES) for m in good]
        clients = [LoraFactors.from_state(wire.from_record(wire.arrays_of(m)), self.alpha)
                   for m in good]
        result = self.combine(clients, weights)
        if result.base_delta is not None:
            self.history.append(result.base_delta)
            self.last_delta = result.base_delta
        losses = [wire.metric(wire.metrics_of(m), wire.TRAIN_LOSS) for m in good]
        loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)
        return wire.to_record(result.state), MetricRecord({wire.TRAIN_LOSS: loss,
                                                    wire.NUM_EXAMPLES: int(sum(weights))})
