"""The federation's round loop, driving a Flower strategy and recording every round.

Flower's ``Strategy.start`` runs rounds but keeps no run folder, no per-client record and no checkpoint;
this loop calls the same strategy methods (``configure_train``, ``aggregate_train``) and adds those.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pollinate.config import RunConfig
from pollinate.server.global_model import GlobalModel
from pollinate.server.progress import RoundProgress
from pollinate.server.report import write_report
from pollinate.server.rundir import RunDir
from pollinate.strategies import build_strategy, wire

PULL_INTERVAL = 0.1  # seconds between polls for replies
ROUND_TIMEOUT = 3600.0  # seconds a round waits for its replies


@dataclass
class Totals:
    """Running totals for summary.json."""

    bytes_up: int = 0
    bytes_down: int = 0
    rounds: int = 0
    rejected: int = 0
    evals: dict[int, dict[str, float]] = field(default_factory=dict)


def collect(grid: Grid, messages: Iterable[Message], progress: RoundProgress,
            timeout: float = ROUND_TIMEOUT) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` passed."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            progress.client_done()
        if pending:
            time.sleep(PULL_INTERVAL)
    return replies


def client_event(server_round: int, reply: Message, bytes_down: int) -> dict[str, Any]:
    """The metrics.jsonl line of one client's reply."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        return {"round": server_round, "event": "failed", "node_id": node,
                "reason": reply.error.reason}
    m = wire.metrics_of(reply)
    return {
        "round": server_round, "event": "client", "node_id": node, "method": "lora",
        "num_examples": int(wire.metric(m, wire.NUM_EXAMPLES)),
        "examples_seen": int(wire.metric(m, wire.EXAMPLES_SEEN)),
        "tokens_seen": int(wire.metric(m, wire.TOKENS_SEEN)),
        "train_loss": wire.metric(m, wire.TRAIN_LOSS),
        "train_seconds": wire.metric(m, wire.TRAIN_SECONDS),
        "peak_mem_bytes": int(wire.metric(m, wire.PEAK_MEM)),
        "budget_bytes": None,
        "bytes_up": wire.wire_bytes(wire.arrays_of(reply)),
        "bytes_down": bytes_down,
    }


class Federation:
    """One run: the strategy, the global model, the run folder and the totals."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, global_model: GlobalModel,
                 progress: RoundProgress) -> None:
        self.cfg, self.run_dir, self.model, self.progress = cfg, run_dir, global_model, progress
        self.strategy: Strategy = build_strategy(cfg.strategy, cfg.num_clients)
        self.totals = Totals()

    def evaluate(self, server_round: int) -> dict[str, float]:
        """Central evaluation of the current global adapter, recorded."""
        start = time.perf_counter()
        scores = self.model.evaluate()
        self.totals.evals[server_round] = scores
        self.run_dir.append_event({"round": server_round, "event": "evaluate", **scores,
                                   "eval_seconds": time.perf_counter() - start})
        return scores

    def train_round(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> ArrayRecord:
        """Send, collect, record and aggregate one round; returns the new global arrays."""
        start = time.perf_counter()
        config = wire.config_record(self.cfg.to_run_config(), server_round)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.progress.start_round(server_round, len(messages))
        replies = collect(grid, messages, self.progress)
        bytes_down = wire.wire_bytes(arrays)
        events = [client_event(server_round, r, bytes_down) for r in replies]
        for event in events:
            self.run_dir.append_event(event)
        new_arrays, agg = self.strategy.aggregate_train(server_round, replies)
        ok = [e for e in events if e["event"] == "client"]
        up, down = sum(e["bytes_up"] for e in ok), bytes_down * len(messages)
        self.totals.bytes_up += up
        self.totals.bytes_down += down
        train_loss = wire.metric(agg, wire.TRAIN_LOSS) if agg is not None else None
        self.run_dir.append_event({
            "round": server_round, "event": "train", "sampled": len(messages), "accepted": len(ok),
            "train_loss": train_loss, "bytes_up": up, "bytes_down": down,
            # send to aggregated, without the server's evaluation (that is in the evaluate event)
            "round_seconds": time.perf_counter() - start,
            "client_train_seconds": sum(e["train_seconds"] for e in ok)})
        if new_arrays is not None:
            arrays = new_arrays
            self.model.load(wire.from_record(arrays))
        scores = self.evaluate(server_round)
        self.commit(server_round, [e["node_id"] for e in ok])
        self.progress.end_round(server_round, len(ok), len(messages), train_loss, scores, up, down,
                                time.perf_counter() - start)
        return arrays

    def commit(self, server_round: int, accepted: list[int]) -> None:
        """The round's checkpoint: the global adapter in peft format plus a manifest."""
        self.run_dir.commit_checkpoint(server_round, self.model.save, {
            "strategy": self.cfg.strategy, "accepted_nodes": accepted, "rejected_nodes": [],
        })
        self.totals.rounds = server_round


def run_federation(grid: Grid, cfg: RunConfig, run_dir: RunDir, global_model: GlobalModel,
                   progress: RoundProgress) -> dict[str, Any]:
    """Run every round, then write summary.json and report.html; returns the summary."""
    start = time.perf_counter()
    run_dir.write_json("config.json", cfg.to_run_config())
    fed = Federation(cfg, run_dir, global_model, progress)
    initial = fed.evaluate(0)
    progress.print(f"initial eval loss {initial['loss']:.3f}")
    arrays = wire.to_record(global_model.initial_state())
    for server_round in range(1, cfg.rounds + 1):
        arrays = fed.train_round(server_round, arrays, grid)
    summary = {
        "strategy": cfg.strategy, "method": "lora", "model": cfg.model, "task": cfg.task,
        "num_clients": cfg.num_clients, "rounds_completed": fed.totals.rounds,
        "initial_eval": fed.totals.evals[0], "final_eval": fed.totals.evals[fed.totals.rounds],
        "bytes_up_total": fed.totals.bytes_up, "bytes_down_total": fed.totals.bytes_down,
        "rejected_updates": fed.totals.rejected,
        "wall_seconds": time.perf_counter() - start,
    }
    run_dir.write_json("summary.json", summary)
    write_report(run_dir)
    return summary
