"""What every pollinate strategy shares, whatever the method: sampling, the versioned downlink of the
method's updates with catch-up, setup and teardown around the rounds, and reading replies into reports.

A subclass names its method (:attr:`PollinateStrategy.method_name`), may check the configuration
(:meth:`check`), may run a setup exchange before round 1 (:meth:`setup`) and a :meth:`teardown`, and
combines replies (:meth:`combine`). Versions count merged updates: version v means the first v updates
of :attr:`history` are folded into a node's frozen part. Clients report the version they hold; a
process that cannot apply what it was sent asks for a catch-up, and :meth:`catch_up` answers it with
every update, combined into one. What a resumed run needs of a strategy is its history, the
versions its nodes hold and its own :meth:`state` (:meth:`restore` puts them back).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from pollinate import methods, protocol
from pollinate.config import RunConfig
from pollinate.privacy.mechanism import privacy_for
from pollinate.protocol import ClientReport

if TYPE_CHECKING:
    from pathlib import Path

    from pollinate.config import Scalar
    from pollinate.methods.base import Method, Trainee, Update

Exchange = Callable[[list[Message]], list[Message]]
"""Push messages to nodes and return their replies (the loop's, with its deadline and progress)."""


class NotCommitted(Exception):
    """A round's aggregate that must not become the global state (its reason is the message)."""


@dataclass
class Aggregate:
    """What one round's replies combine into."""

    state: dict[str, torch.Tensor]
    """The next global state to send (LoRA: the adapter, or only a head when clients start fresh)."""
    update: Update | None = None
    """What every node merges into its frozen part this round, if anything."""


class PollinateStrategy(FedAvg):
    """Base of every pollinate strategy; subclasses name a method and implement :meth:`combine`."""

    method_name: ClassVar[str]
    """The registered method this strategy trains (``pollinate.methods``)."""
    averages_uploads: ClassVar[bool] = False
    """Whether :meth:`combine` is a weighted mean of what clients upload (as their method's ``dp_view``
    reads it): only then can differential privacy noise that mean and leave the rule exact on it."""

    def __init__(self, cfg: RunConfig) -> None:
        self.check(cfg)
        self.check_privacy(cfg)
        super().__init__(fraction_train=1.0, min_train_nodes=cfg.num_clients,
                         min_available_nodes=cfg.num_clients)  # nodes register lazily: wait for all
        self.cfg = cfg
        self.method: Method = self.build_method(cfg)
        self.history: list[Update] = []  # history[v - 1]: update v
        self.node_versions: dict[int, int] = {}
        self.partitions: dict[int, int] = {}
        """Node id -> the partition (the stable name) it declared; sampling orders nodes by it, so that
        a resumed run samples the same shares although a new simulation gives its nodes new ids."""
        self._records: dict[tuple[int, int], ArrayRecord] = {}  # (since, version) -> the downlink
        self.setup_rejections: list[tuple[int, str]] = []
        """(node, reason) of every setup answer :meth:`setup` left out (the loop records them)."""
        self.privacy = privacy_for(cfg.dp)
        self.received: dict[str, torch.Tensor] = {}
        """The global state the round's nodes received (what a private update is measured from)."""

    @classmethod
    def build_method(cls, cfg: RunConfig) -> Method:
        """This strategy's method for ``cfg`` (a variant is passed in by overriding this)."""
        return methods.build(cls.method_name, cfg)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Raise a one-line ValueError for a configuration this strategy cannot run."""

    @classmethod
    def deployment(cls, cfg: RunConfig, certs: Path, address: tuple[str, int]) -> dict[str, Scalar]:
        """Run-config keys ``pollinate serve`` sets for this strategy, from the deployment's certificate
        folder and the (host, port) its SuperLink listens on: none, unless the strategy runs a service
        of its own that devices reach (SFPrompt's body)."""
        return {}

    @classmethod
    def check_privacy(cls, cfg: RunConfig) -> None:
        """Raise the one-line error for differential privacy on a rule that does not average uploads."""
        if cfg.dp.on and not cls.averages_uploads:
            allowed = ", ".join(sorted(n for n, s in _registered().items() if s.averages_uploads))
            raise ValueError(f"dp.mode: {cfg.dp.mode!r} is not allowed with strategy {cfg.strategy!r}; "
                             f"allowed with {allowed} (rules that average what clients upload)")

    @property
    def version(self) -> int:
        """Updates merged into the server's frozen part."""
        return len(self.history)

    def combine(self, reports: Sequence[ClientReport]) -> Aggregate:
        """The rule: the round's accepted reports -> the next global state and update."""
        raise NotImplementedError

    # -- around the rounds ------------------------------------------------------------------------

    def setup(self, server: Trainee, exchange: Exchange, grid: Grid, config: ConfigRecord) -> None:
        """Before round 1: anything the method needs first (default: nothing)."""

    def teardown(self) -> None:
        """After the last round (or a failure): release what :meth:`setup` started."""

    def commit(self, update: Update) -> None:
        """Append ``update`` to the history every node catches up from."""
        self.history.append(update)

    def state(self) -> dict[str, torch.Tensor]:
        """What this strategy keeps between rounds besides its history (default: nothing)."""
        return {}

    def restore(self, history: list[Update], node_versions: dict[int, int],
                state: dict[str, torch.Tensor]) -> None:
        """Put back what a checkpoint kept: the history, the nodes' versions and :meth:`state`."""
        self.history, self.node_versions, self._records = list(history), dict(node_versions), {}
        if state:
            raise ValueError(f"strategy {self.cfg.strategy!r} keeps no state, but a checkpoint gave "
                             f"{sorted(state)}")

    def merged_updates(self) -> dict[str, torch.Tensor] | None:
        """Every update so far as one (what a checkpoint keeps), or None before the first."""
        if not self.history:
            return None
        return self.method.update_type.combine(self.history).to_flat()

    # -- downlink ---------------------------------------------------------------------------------

    def base_record(self, since: int) -> tuple[ArrayRecord, int]:
        """The updates since+1..version (combined) and ``since``.

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
        """The record of the updates since ``since`` (< version), built afresh."""
        return protocol.to_record(self.method.update_type.combine(self.history[since:]).to_flat())

    def node_message(self, node_id: int, arrays: ArrayRecord | None, config: ConfigRecord, since: int,
                     message_type: str = "train") -> Message:
        """An instruction for one node, with the updates it lacks (and the global state, if any)."""
        base, since = self.base_record(since)
        record = RecordDict({
            protocol.BASE: base,
            protocol.CONFIG: ConfigRecord({**config, protocol.BASE_FROM: since,
                                           protocol.BASE_TO: self.version}),
        })
        if arrays is not None:  # a setup exchange sends no state
            record[protocol.ARRAYS] = arrays
        return Message(content=record, message_type=message_type, dst_node_id=node_id)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Wait for every node, sample ``clients-per-round`` of them, then one message per sampled node
        carrying the updates it still needs."""
        if self.cfg.dp.on:
            self.received = protocol.from_record(arrays)
        return [self.node_message(node, arrays, config, self.node_versions.get(node, 0))
                for node in self.sample(server_round, self.nodes(server_round, grid))]

    def nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Every node of the run, once all have registered (Flower's wait), in id order."""
        every = super().configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        return sorted(m.metadata.dst_node_id for m in every)

    def sample(self, server_round: int, nodes: list[int]) -> list[int]:
        """``clients-per-round`` of ``nodes``, drawn from the run's seed and the round alone over the
        nodes ordered by partition, so that a resumed run samples what the uninterrupted one did."""
        count = self.cfg.clients_per_round or len(nodes)
        if count >= len(nodes):
            return nodes
        ordered = sorted(nodes, key=lambda node: (self.partitions.get(node, -1), node))
        return sorted(random.Random(self.cfg.seed * 1_000_003 + server_round).sample(ordered, count))

    def catch_up(self, reply: Message, arrays: ArrayRecord | None, config: ConfigRecord,
                 message_type: str = "train") -> Message:
        """Answer a node whose process could not apply what it was sent: resend every update from the
        base. One resend always suffices: a process holding part of them starts again from the base
        (in a simulation the resend may reach another process than the one that asked, at a version
        of its own)."""
        return self.node_message(reply.metadata.src_node_id, arrays, config, 0, message_type)

    # -- uplink -----------------------------------------------------------------------------------

    def aggregate(self, reports: Sequence[ClientReport]) -> tuple[Aggregate, MetricRecord] | None:
        """Combine accepted reports (as the run's privacy releases them); remember each node's version;
        append the round's update."""
        self.privacy.clipped = 0
        if not reports:
            return None
        result = self.combine(self.privacy.release(reports, self.received, self.method))
        if (reason := nonfinite(result)) is not None:
            raise NotCommitted(reason)
        for r in reports:  # the version each node's process now holds
            self.node_versions[r.node] = r.version
        if result.update is not None:
            self.commit(result.update)
        weights = [r.examples for r in reports]
        loss = sum(w * r.loss for w, r in zip(weights, reports, strict=True)) / sum(weights)
        return result, MetricRecord({protocol.TRAIN_LOSS: loss, protocol.NUM_EXAMPLES: int(sum(weights))})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's entry point: read the good replies into reports and :meth:`aggregate` them."""
        done = self.aggregate([ClientReport.of(m) for m in replies if not m.has_error()])
        if done is None:
            return None, None
        return protocol.to_record(done[0].state), done[1]


def _registered() -> dict[str, type[PollinateStrategy]]:
    from pollinate.strategies import STRATEGIES  # the registry imports every strategy module

    return STRATEGIES


def nonfinite(result: Aggregate) -> str | None:
    """Why an aggregate must not be committed (a NaN or an infinity in its state or update), or None."""
    tensors = {**result.state, **(result.update.to_flat() if result.update is not None else {})}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return f"the aggregate holds NaN or infinite values ({', '.join(bad[:3])})" if bad else None


def refuse_client_ranks(cfg: RunConfig, reason: str) -> None:
    """The one-line error for ``lora.ranks`` under a strategy whose clients all train the same shapes."""
    if cfg.lora.ranks:
        raise ValueError(f"lora.ranks: {cfg.lora.ranks!r} is not allowed with strategy {cfg.strategy!r}; "
                         f"{reason}")


def weights_of(reports: Sequence[ClientReport]) -> list[float]:
    """Each report's weight: its examples."""
    return [float(r.examples) for r in reports]


__all__ = ["Aggregate", "Exchange", "NotCommitted", "PollinateStrategy", "nonfinite", "refuse_client_ranks",
           "weights_of"]
