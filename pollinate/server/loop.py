"""The federation's round loop, driving a Flower strategy and recording every round.

Flower's ``Strategy.start`` runs rounds but keeps no run folder, no per-client record and no checkpoint;
this loop calls the same strategy methods (``configure_train``, ``aggregate_train``) and adds those.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from safetensors.torch import save_file

from pollinate import protocol, workload
from pollinate.config import RunConfig
from pollinate.files import UPDATES_FILE
from pollinate.protocol import ClientReport
from pollinate.server.global_model import GlobalModel
from pollinate.server.progress import RoundProgress
from pollinate.server.report import write_report
from pollinate.server.rundir import RunDir
from pollinate.server.validate import CHECKS, Rejection, RoundChecks
from pollinate.strategies import PollinateStrategy, build_strategy
from pollinate.strategies.base import NotCommitted

PULL_INTERVAL = 0.1  # seconds between polls for replies


@dataclass
class Totals:
    """Running totals for summary.json."""

    bytes_up: int = 0
    bytes_down: int = 0
    rounds: int = 0
    rejected: int = 0
    rejected_by_check: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECKS, 0))
    uncommitted: int = 0
    """Rounds below quorum, or whose aggregate was not finite."""
    failed: int = 0
    over_budget: int = 0
    train_seconds: float = 0.0
    """Clients' own training time, summed (the s/step a user compares between machines)."""
    train_steps: int = 0
    evals: dict[int, dict[str, float]] = field(default_factory=dict)


def wants_catch_up(reply: Message) -> bool:
    """A reply asking for the updates from an older version (its process missed rounds)."""
    return not reply.has_error() and protocol.metric(protocol.metrics_of(reply), protocol.CATCH_UP) == 1


def collect(grid: Grid, messages: Iterable[Message], progress: RoundProgress, timeout: float,
            late: set[str] | None = None) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` passed.

    ``late`` holds the ids of earlier instructions still unanswered: their replies are pulled too (and
    fail the envelope check as stale), and the ids of this call's unanswered instructions join it.
    """
    pending = set(grid.push_messages(messages))
    ours = set(pending)
    late = late if late is not None else set()
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending | late):
            pending.discard(reply.metadata.reply_to_message_id)
            late.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if reply.metadata.reply_to_message_id in ours and not wants_catch_up(reply):
                progress.client_done()
        if pending:
            time.sleep(PULL_INTERVAL)
    late |= pending
    return replies


def client_event(server_round: int, report: ClientReport, method: str, bytes_down: int) -> dict[str, Any]:
    """The metrics.jsonl line of one client's reply."""
    return {
        "round": server_round, "event": "client", "node_id": report.node, "method": method,
        **({"rank": report.plan["rank"]} if "rank" in report.plan else {}),
        "num_examples": report.examples, "examples_seen": report.examples_seen,
        "tokens_seen": report.tokens_seen, "train_loss": report.loss, "train_seconds": report.seconds,
        "peak_mem_bytes": report.peak, "process_peak_bytes": report.process_peak,
        "runtime_baseline_bytes": report.baseline, "budget_bytes": report.budget,
        "estimate_bytes": report.estimate, "over_budget": report.over_budget,
        "plan": {k: bool(v) if k == "checkpointing" else v for k, v in report.plan.items()},
        **({"method_figures": report.method_figures} if report.method_figures else {}),
        "bytes_up": report.bytes_up, "bytes_down": bytes_down,
        "base_version": report.version, "base_fingerprint": report.fingerprint,
    }


def failed_event(server_round: int, reply: Message) -> dict[str, Any]:
    """The metrics.jsonl line of an error reply (a refusal, a crash)."""
    return {"round": server_round, "event": "failed", "node_id": reply.metadata.src_node_id,
            "reason": reply.error.reason}


class Federation:
    """One run: the strategy, the global model, the run folder and the totals."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, global_model: GlobalModel,
                 progress: RoundProgress) -> None:
        self.cfg, self.run_dir, self.model, self.progress = cfg, run_dir, global_model, progress
        self.strategy: PollinateStrategy = build_strategy(cfg)
        self.totals = Totals()
        self.late: set[str] = set()
        """Instructions of earlier rounds still unanswered at their deadline."""
        self.max_examples = cfg.max_examples or max(
            len(share) for share in workload.shares(cfg, self.strategy.method.calibration_size()))
        """The most examples a reply may claim: ``max-examples``, or the largest share of the run."""

    @property
    def method(self) -> str:
        """The name of the method the strategy trains (``metrics.jsonl``, ``summary.json``)."""
        return self.strategy.method.name

    def evaluate(self, server_round: int) -> dict[str, float]:
        """Central evaluation of the current global model, recorded."""
        start = time.perf_counter()
        scores = self.model.evaluate()
        self.totals.evals[server_round] = scores
        self.run_dir.append_event({"round": server_round, "event": "evaluate", **scores,
                                   "eval_seconds": time.perf_counter() - start})
        return scores

    def catch_up_server(self) -> None:
        """Merge into the server's trainee the updates the strategy committed that it lacks."""
        if self.model.version < self.strategy.version:
            updates = self.strategy.history[self.model.version:]
            self.model.merge(self.strategy.method.update_type.combine(updates))

    def setup(self, grid: Grid) -> None:
        """The strategy's setup exchange before round 1; its updates reach the server's trainee."""
        config = protocol.config_record(self.cfg.to_run_config(), 0)

        def exchange(messages: list[Message]) -> list[Message]:  # its bytes count in the totals
            replies = collect(grid, messages, self.progress, self.cfg.round_timeout)
            self.totals.bytes_down += sum(protocol.downlink_bytes(m) for m in messages)
            self.totals.bytes_up += sum(protocol.wire_bytes(protocol.arrays_of(r)) for r in replies
                                        if not r.has_error())
            return replies

        self.strategy.setup(self.model.trainee, exchange, grid, config)
        self.catch_up_server()

    def exchange(self, server_round: int, arrays: ArrayRecord, grid: Grid
                 ) -> tuple[list[Message], dict[int, int], dict[str, int]]:
        """Send the round's instructions (and catch-ups) and collect replies.

        Returns the replies, bytes sent to each node, and every instruction sent (message id -> node;
        the first ones are the sampled nodes').
        """
        config = protocol.config_record(self.cfg.to_run_config(), server_round)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.progress.start_round(server_round, len(messages))
        sent = {m.metadata.dst_node_id: protocol.downlink_bytes(m) for m in messages}
        replies = collect(grid, messages, self.progress, self.cfg.round_timeout, self.late)
        behind = [r for r in replies if wants_catch_up(r) and r.metadata.src_node_id in sent]
        asked = {id(r) for r in behind}
        if behind:  # processes that missed rounds: resend from the version they hold, once
            again = [self.strategy.catch_up(r, arrays, config) for r in behind]
            for m in again:
                sent[m.metadata.dst_node_id] += protocol.downlink_bytes(m)
            replies = [r for r in replies if id(r) not in asked] + collect(
                grid, again, self.progress, self.cfg.round_timeout, self.late)
            messages += again
        return replies, sent, {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

    def screen(self, server_round: int, replies: list[Message], sent: dict[int, int],
               addressed: dict[str, int]) -> tuple[list[ClientReport], list[dict[str, Any]], list[Rejection]]:
        """Record every reply; keep the reports that pass every check (``pollinate.server.validate``)."""
        checks = RoundChecks(self.strategy.method, self.model.trainee, addressed, self.max_examples,
                             self.model.fingerprint(), self.strategy.method.sync_tolerance)
        passed: list[ClientReport] = []
        rejected: list[Rejection] = []
        for reply in replies:
            if reply.has_error():
                self.run_dir.append_event(failed_event(server_round, reply))
                self.totals.failed += 1
                continue
            outcome = checks.check(reply)
            if isinstance(outcome, Rejection):
                rejected.append(outcome)
            else:
                passed.append(outcome)
        if self.cfg.robust == "clip":
            passed, factors = checks.clipped(passed, self.cfg.update_bound)
            for node, factor in factors.items():
                self.run_dir.append_event({"round": server_round, "event": "clipped", "node_id": node,
                                           "factor": factor})
            outliers: list[Rejection] = []
        else:
            outliers = checks.outliers(passed, self.cfg.update_bound)
        rejected += outliers
        for rejection in rejected:
            self.run_dir.append_event(rejection.event(server_round))
            self.totals.rejected += 1
            self.totals.rejected_by_check[rejection.check] += 1
        kept, accepted, dropped = [], [], {r.node for r in outliers}
        for report in passed:
            if report.node in dropped:
                continue
            event = client_event(server_round, report, self.method, sent.get(report.node, 0))
            self.run_dir.append_event(event)
            kept.append(report)
            accepted.append(event)
            self.totals.over_budget += int(report.over_budget)
            self.totals.train_seconds += report.seconds
            self.totals.train_steps += -(-report.examples_seen // self.cfg.batch_size)  # steps, any method
        return kept, accepted, rejected

    def train_round(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> ArrayRecord:
        """Send, collect, screen, aggregate, merge, evaluate and commit one round."""
        start = time.perf_counter()
        replies, sent, addressed = self.exchange(server_round, arrays, grid)
        sampled = len(sent)
        kept, accepted, rejected = self.screen(server_round, replies, sent, addressed)
        refusal = None if len(kept) >= self.cfg.quorum else (
            f"quorum not reached: {len(kept)} accepted, {self.cfg.quorum} needed")
        try:
            done = self.strategy.aggregate(kept) if refusal is None else None
        except NotCommitted as error:
            done, refusal = None, str(error)
        up, down = sum(e["bytes_up"] for e in accepted), sum(sent.values())
        self.totals.bytes_up += up
        self.totals.bytes_down += down
        train_loss = protocol.metric(done[1], protocol.TRAIN_LOSS) if done is not None else None
        self.run_dir.append_event({
            "round": server_round, "event": "train", "sampled": sampled, "accepted": len(kept),
            "train_loss": train_loss, "bytes_up": up, "bytes_down": down,
            # send to aggregated, without the server's evaluation (that is in the evaluate event)
            "round_seconds": time.perf_counter() - start,
            "client_train_seconds": sum(e["train_seconds"] for e in accepted),
            "committed": refusal is None, **({"not_committed": refusal} if refusal else {})})
        if refusal is not None:  # nothing changes: no merge, no evaluation, no checkpoint
            self.progress.print(f"round {server_round}: not committed: {refusal}")
            self.totals.uncommitted += 1
            return arrays
        if done is not None:
            self.catch_up_server()
            arrays = protocol.to_record(done[0].state)
            self.model.load(done[0].state, server_round)
        scores = self.evaluate(server_round)
        self.commit(server_round, kept, replies, rejected)
        self.progress.end_round(server_round, len(kept), sampled, train_loss, scores, up, down,
                                time.perf_counter() - start)
        return arrays

    def commit(self, server_round: int, kept: list[ClientReport], replies: list[Message],
               rejected: list[Rejection]) -> None:
        """The round's checkpoint: the server trainee's files, the merged updates, the manifest."""
        def write(folder: Path) -> None:
            self.model.save(folder)
            merged = self.strategy.merged_updates()
            if merged is not None:  # everything merged so far, as one update
                save_file(merged, str(folder / UPDATES_FILE))
            if self.cfg.save_updates:
                for report in kept:
                    save_file(report.upload, str(folder / f"update-{report.node}.safetensors"))

        accepted = [r.node for r in kept]
        self.run_dir.commit_checkpoint(server_round, write, {
            "strategy": self.cfg.strategy, "method": self.method, "accepted_nodes": accepted,
            "export": dataclasses.asdict(self.strategy.method.export_view()),
            "rejected_nodes": [r.metadata.src_node_id for r in replies
                               if r.metadata.src_node_id not in accepted],
            "rejections": [{"node_id": r.node, "check": r.check, "reason": r.reason} for r in rejected],
            "weights": {str(r.node): r.examples for r in kept},
            "base_version": self.strategy.version, "base_fingerprint": self.model.fingerprint(),
        })
        self.totals.rounds = server_round


def run_federation(grid: Grid, cfg: RunConfig, run_dir: RunDir, global_model: GlobalModel,
                   progress: RoundProgress) -> dict[str, Any]:
    """Run the setup and every round, then write summary.json and report.html; returns the summary."""
    start = time.perf_counter()
    run_dir.write_json("config.json", cfg.to_run_config())
    fed = Federation(cfg, run_dir, global_model, progress)
    initial = fed.evaluate(0)
    progress.print(f"initial eval loss {initial['loss']:.3f}")
    try:
        fed.setup(grid)
        arrays = protocol.to_record(global_model.initial_state())
        for server_round in range(1, cfg.rounds + 1):
            arrays = fed.train_round(server_round, arrays, grid)
    finally:
        fed.strategy.teardown()
    summary = {
        "strategy": cfg.strategy, "method": fed.method, "model": cfg.model, "task": cfg.task,
        "num_clients": cfg.num_clients, "rounds_completed": fed.totals.rounds,
        "initial_eval": fed.totals.evals[0], "final_eval": fed.totals.evals[fed.totals.rounds],
        "bytes_up_total": fed.totals.bytes_up, "bytes_down_total": fed.totals.bytes_down,
        "rejected_updates": fed.totals.rejected,
        "rejected_by_check": {k: v for k, v in fed.totals.rejected_by_check.items() if v},
        "uncommitted_rounds": fed.totals.uncommitted,
        "over_budget_clients": fed.totals.over_budget,
        "failed_clients": fed.totals.failed,
        "seconds_per_step": fed.totals.train_seconds / max(fed.totals.train_steps, 1),
        "wall_seconds": time.perf_counter() - start,
    }
    run_dir.write_json("summary.json", summary)
    write_report(run_dir)
    return summary
