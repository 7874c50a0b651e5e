"""The federation's round loop, driving a Flower strategy and recording every round.

Flower's ``Strategy.start`` runs rounds but keeps no run folder, no per-client record and no checkpoint;
this loop calls the same strategy methods (``configure_train``, ``aggregate_train``) and adds those.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from safetensors.torch import save_file

from pollinate.aggregation import combine, to_flat
from pollinate.config import RunConfig
from pollinate.server.global_model import GlobalModel
from pollinate.server.progress import RoundProgress
from pollinate.server.report import write_report
from pollinate.server.rundir import BASE_DELTA_FILE, RunDir
from pollinate.strategies import LoraStrategy, build_strategy, wire

PULL_INTERVAL = 0.1  # seconds between polls for replies
ROUND_TIMEOUT = 3600.0  # seconds a round waits for its replies
# Relative difference of base fingerprints above which a client trained on another base. The server
# and a client merge the same fp32 deltas; only thread-count-dependent summation order differs.
FINGERPRINT_TOLERANCE = 1e-6


@dataclass
class Totals:
    """Running totals for summary.json."""

    bytes_up: int = 0
    bytes_down: int = 0
    rounds: int = 0
    rejected: int = 0
    failed: int = 0
    over_budget: int = 0
    evals: dict[int, dict[str, float]] = field(default_factory=dict)


def wants_catch_up(reply: Message) -> bool:
    """A reply asking for the base deltas from an older version (its process missed rounds)."""
    return not reply.has_error() and wire.metric(wire.metrics_of(reply), wire.CATCH_UP) == 1


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
            if not wants_catch_up(reply):
                progress.client_done()
        if pending:
            time.sleep(PULL_INTERVAL)
    return replies


def downlink_bytes(message: Message) -> int:
    """Bytes of the adapter and base deltas an instruction carries."""
    return wire.wire_bytes(wire.arrays_of(message)) + wire.wire_bytes(wire.base_of(message))


def client_event(server_round: int, reply: Message, bytes_down: int) -> dict[str, Any]:
    """The metrics.jsonl line of one client's reply."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        return {"round": server_round, "event": "failed", "node_id": node,
                "reason": reply.error.reason}
    m = wire.metrics_of(reply)
    return {
        "round": server_round, "event": "client", "node_id": node, "method": "lora",
        "rank": int(wire.metric(m, wire.RANK)),
        "num_examples": int(wire.metric(m, wire.NUM_EXAMPLES)),
        "examples_seen": int(wire.metric(m, wire.EXAMPLES_SEEN)),
        "tokens_seen": int(wire.metric(m, wire.TOKENS_SEEN)),
        "train_loss": wire.metric(m, wire.TRAIN_LOSS),
        "train_seconds": wire.metric(m, wire.TRAIN_SECONDS),
        "peak_mem_bytes": int(wire.metric(m, wire.PEAK_MEM)),
        "process_peak_bytes": int(wire.metric(m, wire.PROCESS_PEAK)),
        "runtime_baseline_bytes": int(wire.metric(m, wire.RUNTIME_BASELINE)),
        "budget_bytes": int(wire.metric(m, wire.BUDGET)) or None,
        "estimate_bytes": int(wire.metric(m, wire.ESTIMATE)),
        "over_budget": 0 < wire.metric(m, wire.BUDGET) < wire.metric(m, wire.PEAK_MEM),
        "plan": {"rank": int(wire.metric(m, wire.RANK)),
                 "micro_batch": int(wire.metric(m, wire.MICRO_BATCH)),
                 "grad_accum": int(wire.metric(m, wire.GRAD_ACCUM)),
                 "seq_len": int(wire.metric(m, wire.SEQ_LEN)),
                 "checkpointing": bool(wire.metric(m, wire.CHECKPOINTING))},
        "bytes_up": wire.wire_bytes(wire.arrays_of(reply)),
        "bytes_down": bytes_down,
        "base_version": int(wire.metric(m, wire.BASE_VERSION)),
        "base_fingerprint": wire.metric(m, wire.BASE_FINGERPRINT),
    }


def out_of_sync(event: dict[str, Any], server_fingerprint: float) -> bool:
    """True when a client trained on other base weights than the server holds (exactness guard)."""
    return abs(event["base_fingerprint"] - server_fingerprint) > FINGERPRINT_TOLERANCE * max(
        abs(server_fingerprint), 1.0)


class Federation:
    """One run: the strategy, the global model, the run folder and the totals."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, global_model: GlobalModel,
                 progress: RoundProgress) -> None:
        self.cfg, self.run_dir, self.model, self.progress = cfg, run_dir, global_model, progress
        self.strategy: LoraStrategy = build_strategy(cfg)
        self.totals = Totals()

    def evaluate(self, server_round: int) -> dict[str, float]:
        """Central evaluation of the current global adapter, recorded."""
        start = time.perf_counter()
        scores = self.model.evaluate()
        self.totals.evals[server_round] = scores
        self.run_dir.append_event({"round": server_round, "event": "evaluate", **scores,
                                   "eval_seconds": time.perf_counter() - start})
        return scores

    def exchange(self, server_round: int, arrays: ArrayRecord, grid: Grid
                 ) -> tuple[list[Message], dict[int, int], int]:
        """Send the round's instructions (and catch-ups) and collect replies.

        Returns the replies, bytes sent to each node, and how many nodes were sampled.
        """
        config = wire.config_record(self.cfg.to_run_config(), server_round)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.progress.start_round(server_round, len(messages))
        sent = {m.metadata.dst_node_id: downlink_bytes(m) for m in messages}
        replies = collect(grid, messages, self.progress)
        behind = [r for r in replies if wants_catch_up(r)]
        if behind:  # processes that missed rounds: resend from the base they hold, once
            again = [self.strategy.catch_up(r, arrays, config) for r in behind]
            for m in again:
                sent[m.metadata.dst_node_id] += downlink_bytes(m)
            replies = [r for r in replies if not wants_catch_up(r)] + collect(grid, again, self.progress)
        return replies, sent, len(messages)

    def screen(self, server_round: int, replies: list[Message], sent: dict[int, int]
               ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Record every reply; keep those that trained on the server's base."""
        server_fp = self.model.fingerprint()
        kept, accepted = [], []
        for reply in replies:
            event = client_event(server_round, reply, sent.get(reply.metadata.src_node_id, 0))
            if event["event"] == "client" and (wants_catch_up(reply) or out_of_sync(event, server_fp)):
                event = {"round": server_round, "event": "rejected", "node_id": event["node_id"],
                         "reason": "base out of sync" if not wants_catch_up(reply)
                         else "base still behind after catch-up"}
                self.totals.rejected += 1
            self.run_dir.append_event(event)
            self.totals.failed += event["event"] == "failed"
            if event["event"] == "client":
                kept.append(reply)
                accepted.append(event)
                self.totals.over_budget += int(event["over_budget"])
        return kept, accepted

    def train_round(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> ArrayRecord:
        """Send, collect, screen, aggregate, merge, evaluate and commit one round."""
        start = time.perf_counter()
        replies, sent, sampled = self.exchange(server_round, arrays, grid)
        kept, accepted = self.screen(server_round, replies, sent)
        new_arrays, agg = self.strategy.aggregate_train(server_round, kept)
        up, down = sum(e["bytes_up"] for e in accepted), sum(sent.values())
        self.totals.bytes_up += up
        self.totals.bytes_down += down
        train_loss = wire.metric(agg, wire.TRAIN_LOSS) if agg is not None else None
        self.run_dir.append_event({
            "round": server_round, "event": "train", "sampled": sampled, "accepted": len(kept),
            "train_loss": train_loss, "bytes_up": up, "bytes_down": down,
            # send to aggregated, without the server's evaluation (that is in the evaluate event)
            "round_seconds": time.perf_counter() - start,
            "client_train_seconds": sum(e["train_seconds"] for e in accepted)})
        if new_arrays is not None:
            if self.strategy.last_delta is not None:
                self.model.merge(self.strategy.last_delta)
            arrays = new_arrays
            self.model.load(wire.from_record(arrays), server_round)
        scores = self.evaluate(server_round)
        self.commit(server_round, kept, replies)
        self.progress.end_round(server_round, len(kept), sampled, train_loss, scores, up, down,
                                time.perf_counter() - start)
        return arrays

    def commit(self, server_round: int, kept: list[Message], replies: list[Message]) -> None:
        """The round's checkpoint: global adapter (peft format), merged base deltas, manifest."""
        def write(folder: Path) -> None:
            self.model.save(folder)
            if self.strategy.history:  # everything merged into the base so far, as one delta
                save_file(to_flat(combine(self.strategy.history)), str(folder / BASE_DELTA_FILE))
            if self.cfg.save_updates:
                for reply in kept:
                    save_file(wire.from_record(wire.arrays_of(reply)),
                              str(folder / f"update-{reply.metadata.src_node_id}.safetensors"))

        accepted = [r.metadata.src_node_id for r in kept]
        self.run_dir.commit_checkpoint(server_round, write, {
            "strategy": self.cfg.strategy, "accepted_nodes": accepted,
            "rejected_nodes": [r.metadata.src_node_id for r in replies
                               if r.metadata.src_node_id not in accepted],
            "weights": {str(r.metadata.src_node_id):
                        wire.metric(wire.metrics_of(r), wire.NUM_EXAMPLES) for r in kept},
            "base_version": self.strategy.version, "base_fingerprint": self.model.fingerprint(),
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
        "rejected_updates": fed.totals.rejected, "over_budget_clients": fed.totals.over_budget,
        "failed_clients": fed.totals.failed,
        "wall_seconds": time.perf_counter() - start,
    }
    run_dir.write_json("summary.json", summary)
    write_report(run_dir)
    return summary
