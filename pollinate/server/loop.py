"""The federation's round loop, driving a Flower strategy and recording every round.

Flower's ``Strategy.start`` runs rounds but keeps no run folder, no per-client record and no checkpoint;
this loop calls the same strategy methods (``configure_train``, ``aggregate_train``) and adds those.
A round's checkpoint holds all a resumed run needs (:meth:`Federation.restore`): the global state as
sent, every update merged since the previous checkpoint (``history-VVVV.safetensors``, one per version),
the strategy's own state and torch's RNG state, and in the manifest the nodes' versions and the totals.
The server draws nothing else at random: sampling and every re-initialisation are seeded by the run's
seed and the round, so a resumed round draws what the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import load_file, save_file

from pollinate import protocol, workload
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION
from pollinate.files import UPDATES_FILE
from pollinate.privacy.accountant import Accountant
from pollinate.protocol import ClientReport
from pollinate.server.global_model import GlobalModel
from pollinate.server.progress import RoundProgress
from pollinate.server.rundir import CheckpointError, Recovery, RunDir, unverified
from pollinate.server.validate import BOUND_POLICIES, CHECKS, Rejection, RoundChecks
from pollinate.strategies import PollinateStrategy, build_strategy
from pollinate.strategies.base import NotCommitted

PULL_INTERVAL = 0.1  # seconds between polls for replies
STATE_FILE = "state.safetensors"  # a checkpoint's global state, exactly as sent to the next round's nodes
RESUME_FILE = "resume.safetensors"  # the strategy's own state (strategy.*) and torch's RNG state
HISTORY_FILE = "history-{:04d}.safetensors"  # update v of the strategy's history
UNCHANGED_ON_RESUME = frozenset(["rounds", "resume", "run-dir", "tracking", "tracking-uri"])
"""Run-config keys a resumed run may give otherwise than the run did (``rounds``: to go on further;
tracking changes no result, and a run folder older than the tracking keys has none)."""


@dataclass
class Totals:
    """Running totals for summary.json."""

    bytes_up: int = 0
    bytes_down: int = 0
    split_up: int = 0
    split_down: int = 0
    """Bytes beside Flower (a split method's body channel), of accepted clients; not in bytes_up/down."""
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
    dp_rounds: int = 0
    """Rounds whose updates differential privacy clipped and noised (the accountant's state)."""
    evals: dict[int, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, saved: dict[str, Any]) -> Totals:
        """The totals a manifest kept (JSON: its round keys are strings)."""
        return cls(**{**saved, "evals": {int(k): v for k, v in saved["evals"].items()}})


def wants_catch_up(reply: Message) -> bool:
    """A reply asking for the updates from an older version (its process missed rounds)."""
    return not reply.has_error() and protocol.metric(protocol.metrics_of(reply), protocol.CATCH_UP) == 1


def collect(grid: Grid, messages: Iterable[Message], progress: RoundProgress | None, timeout: float,
            late: set[str] | None = None) -> list[Message]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` passed (each reply
    advances ``progress``'s bar, if given).

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
            if progress is not None and reply.metadata.reply_to_message_id in ours \
                    and not wants_catch_up(reply):
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


_WRAPPED = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)", re.DOTALL)


def failure_reason(reason: str) -> str:
    """An error reply's reason in one line. Flower passes a simulated client's crash on as the raw text
    of a Ray exception, ``<class 'ray.exceptions.ActorDiedError'>:<'The actor died ...\n\t...'>``:
    that becomes ``ActorDiedError: The actor died ...``."""
    if found := _WRAPPED.match(reason):
        reason = f"{found.group(1)}: {found.group(2)}"
    lines = reason.strip().splitlines()
    return (lines[0] if lines else "no reason given").strip(" '>")[:300]


def eval_failure(reply: Message, max_examples: int) -> str | None:
    """Why a federated evaluation's reply is left out of the mean (an error, a loss that is not finite, a
    count that is not 1..``max_examples``, an accuracy outside [0, 1]), or None."""
    if reply.has_error():
        return failure_reason(reply.error.reason or "")
    if protocol.METRICS not in reply.content.metric_records:
        return "the reply carries no metrics"
    record = protocol.metrics_of(reply)
    loss, count = protocol.metric(record, protocol.EVAL_LOSS, math.nan), protocol.metric(
        record, protocol.NUM_EXAMPLES)
    if not (math.isfinite(loss) and loss >= 0):
        return f"eval loss {loss!r} is not a finite number >= 0"
    if not (count.is_integer() and 1 <= count <= max_examples):
        return f"num-examples {count:.10g} is not a whole number from 1 to {max_examples}"
    accuracy = protocol.metric(record, protocol.ACCURACY, 0.0)
    if not 0 <= accuracy <= 1:
        return f"accuracy {accuracy!r} is outside [0, 1]"
    return None


def failed_event(server_round: int, reply: Message) -> dict[str, Any]:
    """The metrics.jsonl line of an error reply (a refusal, a crash)."""
    return {"round": server_round, "event": "failed", "node_id": reply.metadata.src_node_id,
            "code": reply.error.code, "reason": failure_reason(reply.error.reason or "")}


class Federation:
    """One run: the strategy, the global model, the run folder and the totals."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, global_model: GlobalModel,
                 progress: RoundProgress) -> None:
        self.cfg, self.run_dir, self.model, self.progress = cfg, run_dir, global_model, progress
        self.strategy: PollinateStrategy = build_strategy(cfg)
        self.totals = Totals()
        self.late: set[str] = set()
        """Instructions of earlier rounds still unanswered (their replies are pulled, and rejected)."""
        self.eval_late: set[str] = set()
        """Federated evaluations still unanswered (their replies are pulled and left out)."""
        self.missed: set[str] = set()
        """Every instruction that was still unanswered at its round's deadline."""
        self.saved_version = 0
        """The strategy's version the last checkpoint holds (its later updates go into the next one)."""
        self.max_examples = cfg.max_examples or max(
            len(share) for share in workload.shares(cfg, self.strategy.method.calibration_size()))
        """The most examples a reply may claim: ``max-examples``, or the largest share of the run."""
        self.accountant = Accountant(cfg.dp, cfg.num_clients, cfg.per_round) if cfg.dp.on else None

    @property
    def epsilon(self) -> float | None:
        """ε spent so far (None without differential privacy)."""
        return self.accountant.epsilon(self.totals.dp_rounds) if self.accountant is not None else None

    def budget_spent(self) -> str | None:
        """Why the next round must not run (it would take ε above ``dp.target-epsilon``), or None."""
        target = self.cfg.dp.target_epsilon
        if self.accountant is None or not target:
            return None
        after = self.accountant.epsilon(self.totals.dp_rounds + 1)
        if after <= target:
            return None
        return (f"dp.target-epsilon {target:g} reached: one more round would spend ε = {after:.3f} "
                f"(δ = {self.accountant.delta:.3g}); ε so far {self.epsilon:.3f}")

    @property
    def method(self) -> str:
        """The name of the method the strategy trains (``metrics.jsonl``, ``summary.json``)."""
        return self.strategy.method.name

    def evaluate(self, server_round: int, arrays: ArrayRecord | None, grid: Grid) -> dict[str, float]:
        """Evaluate the global model (``arrays``, as the next round sends it; None before round 1),
        recorded: on the server's held-out split, or (``eval-split = "clients"``) on every node's
        held-out slice."""
        start = time.perf_counter()
        extra: dict[str, Any] = {}
        if self.cfg.eval_split == "clients":
            scores, extra = self.evaluate_on_nodes(server_round, arrays, grid)
        else:
            scores = self.model.evaluate()
        self.totals.evals[server_round] = scores
        self.run_dir.append_event({"round": server_round, "event": "evaluate", **scores, **extra,
                                   "eval_seconds": time.perf_counter() - start})
        return scores

    def evaluate_on_nodes(self, server_round: int, arrays: ArrayRecord | None, grid: Grid
                          ) -> tuple[dict[str, float], dict[str, Any]]:
        """Federated evaluation: every node evaluates ``arrays`` on its held-out slice; the scores are
        the means weighted by examples (loss NaN when no node answered). Refusals and replies without a
        finite loss are recorded (``eval_failed``) and left out. Returns the scores and the event's
        other fields (nodes, examples, bytes sent)."""
        config = protocol.config_record(self.cfg.to_run_config(), server_round)
        strategy = self.strategy
        messages = [strategy.node_message(node, arrays, config, strategy.node_versions.get(node, 0),
                                          "evaluate") for node in strategy.nodes(server_round, grid)]
        replies = collect(grid, messages, None, self.cfg.round_timeout, self.eval_late)
        if behind := [r for r in replies if wants_catch_up(r)]:
            again = [strategy.catch_up(r, arrays, config, "evaluate") for r in behind]
            replies = [r for r in replies if not wants_catch_up(r)] + collect(
                grid, again, None, self.cfg.round_timeout, self.eval_late)
            messages += again
        down = sum(protocol.downlink_bytes(m) for m in messages)
        self.totals.bytes_down += down
        addressed = {m.metadata.message_id for m in messages}
        weighted: dict[str, float] = {}
        examples, counted = 0, 0
        for reply in replies:
            if reply.metadata.reply_to_message_id not in addressed:
                continue  # a reply to an earlier evaluation: its model is gone
            node = reply.metadata.src_node_id
            if (reason := eval_failure(reply, self.max_examples)) is not None:
                self.run_dir.append_event({"round": server_round, "event": "eval_failed", "node_id": node,
                                           "reason": reason})
                continue
            record = protocol.metrics_of(reply)
            count = int(protocol.metric(record, protocol.NUM_EXAMPLES))
            examples, counted = examples + count, counted + 1
            for name, key in (("loss", protocol.EVAL_LOSS), ("accuracy", protocol.ACCURACY)):
                if key in record:
                    weighted[name] = weighted.get(name, 0.0) + count * protocol.metric(record, key)
            strategy.node_versions[node] = int(protocol.metric(record, protocol.BASE_VERSION))
        scores = {k: v / examples for k, v in weighted.items()} if examples else {"loss": math.nan}
        if self.cfg.task != CLASSIFICATION and examples:
            scores["perplexity"] = math.exp(min(scores["loss"], 50.0))
        return scores, {"eval_on": "clients", "nodes": len({m.metadata.dst_node_id for m in messages}),
                        "evaluated": counted, "examples": examples, "bytes_down": down}

    def catch_up_server(self) -> None:
        """Merge into the server's trainee the updates the strategy committed that it lacks."""
        if self.model.version < self.strategy.version:
            updates = self.strategy.history[self.model.version:]
            self.model.merge(self.strategy.method.update_type.combine(updates))

    def identify(self, grid: Grid) -> None:
        """The roll call: each node names its share, so that sampling orders nodes by what stays the same
        when the federation restarts (a simulation gives its nodes new ids). Only when nodes are sampled."""
        if self.cfg.per_round >= self.cfg.num_clients:
            return
        config = ConfigRecord({protocol.SETUP: protocol.IDENTIFY})
        messages = [Message(RecordDict({protocol.CONFIG: config}), message_type="query", dst_node_id=node)
                    for node in self.strategy.nodes(0, grid)]
        for reply in collect(grid, messages, self.progress, self.cfg.round_timeout):
            if not reply.has_error():
                partition = protocol.metric(protocol.metrics_of(reply), protocol.PARTITION_ID)
                self.strategy.partitions[reply.metadata.src_node_id] = int(partition)

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
        for node, reason in self.strategy.setup_rejections:
            self.run_dir.append_event(Rejection(node, "setup", reason).event(0))
            self.totals.rejected += 1
            self.totals.rejected_by_check["setup"] += 1
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
        self.missed |= self.late
        return replies, sent, {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

    def screen(self, server_round: int, replies: list[Message], sent: dict[int, int],
               addressed: dict[str, int]) -> tuple[list[ClientReport], list[dict[str, Any]], list[Rejection]]:
        """Record every reply; keep the reports that pass every check (``pollinate.server.validate``)."""
        checks = RoundChecks(self.strategy.method, self.model.trainee, addressed, self.max_examples,
                             self.model.fingerprint(), self.strategy.method.sync_tolerance, self.missed)
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
        bounded = BOUND_POLICIES[self.cfg.robust].apply(checks, passed, self.cfg.update_bound)
        for node, factor in bounded.clipped.items():
            self.run_dir.append_event({"round": server_round, "event": "clipped", "node_id": node,
                                       "factor": factor})
        rejected += bounded.rejected
        for rejection in rejected:
            self.run_dir.append_event(rejection.event(server_round))
            self.totals.rejected += 1
            self.totals.rejected_by_check[rejection.check] += 1
        kept, accepted = [], []
        for report in bounded.kept:
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
        partitions = sorted(self.strategy.partitions[n] for n in sent if n in self.strategy.partitions)
        kept, accepted, rejected = self.screen(server_round, replies, sent, addressed)
        if self.accountant is not None:  # the clients' uploads (local) or their noised sum (central)
            self.totals.dp_rounds += 1
        refusal = None if len(kept) >= self.cfg.quorum else (
            f"quorum not reached: {len(kept)} accepted, {self.cfg.quorum} needed")
        try:
            done = self.strategy.aggregate(kept) if refusal is None else None
        except NotCommitted as error:
            done, refusal = None, str(error)
        up, down = sum(e["bytes_up"] for e in accepted), sum(sent.values())
        self.totals.bytes_up += up
        self.totals.bytes_down += down
        split = sum(r.split_bytes[0] for r in kept), sum(r.split_bytes[1] for r in kept)
        self.totals.split_up += split[0]
        self.totals.split_down += split[1]
        train_loss = protocol.metric(done[1], protocol.TRAIN_LOSS) if done is not None else None
        self.run_dir.append_event({
            "round": server_round, "event": "train", "sampled": sampled, "accepted": len(kept),
            "train_loss": train_loss, "bytes_up": up, "bytes_down": down,
            **({"split_bytes_up": split[0], "split_bytes_down": split[1]} if any(split) else {}),
            # send to aggregated, without the server's evaluation (that is in the evaluate event)
            "round_seconds": time.perf_counter() - start,
            "client_train_seconds": sum(e["train_seconds"] for e in accepted),
            "committed": refusal is None, **({"not_committed": refusal} if refusal else {}),
            **({"sampled_partitions": partitions} if partitions else {}),
            **self.privacy_fields()})
        if refusal is not None:  # nothing changes: no merge, no evaluation, no checkpoint
            self.progress.print(f"round {server_round}: not committed: {refusal}")
            self.totals.uncommitted += 1
            return arrays
        state = dict(done[0].state) if done is not None else protocol.from_record(arrays)
        if done is not None:
            self.catch_up_server()
            arrays = protocol.to_record(state)
            self.model.load(state, server_round)
        scores = self.evaluate(server_round, arrays, grid)
        self.commit(server_round, state, kept, replies, rejected)
        self.progress.end_round(server_round, len(kept), sampled, train_loss, scores, up, down,
                                time.perf_counter() - start, self.epsilon)
        return arrays

    def privacy_fields(self) -> dict[str, Any]:
        """The train event's ``epsilon`` (null when infinite: no noise) and ``dp_clipped`` (central), under
        differential privacy."""
        epsilon = self.epsilon
        if epsilon is None:
            return {}
        clipped = {"dp_clipped": self.strategy.privacy.clipped} if self.cfg.dp.mode == "central" else {}
        return {"epsilon": epsilon if epsilon < float("inf") else None, **clipped}

    def commit(self, server_round: int, state: dict[str, torch.Tensor], kept: list[ClientReport],
               replies: list[Message], rejected: list[Rejection]) -> None:
        """The round's checkpoint: the server trainee's files, the merged updates, what a resumed run
        needs (the module's text), the manifest."""
        def write(folder: Path) -> None:
            self.model.save(folder)
            merged = self.strategy.merged_updates()
            if merged is not None:  # everything merged so far, as one update
                save_tensors(merged, folder / UPDATES_FILE)
            if self.cfg.save_updates:
                for report in kept:
                    save_tensors(report.upload, folder / f"update-{report.node}.safetensors")
            save_tensors(state, folder / STATE_FILE)
            for version in range(self.saved_version + 1, self.strategy.version + 1):
                update = self.strategy.history[version - 1]
                save_tensors(update.to_flat(), folder / HISTORY_FILE.format(version))
            save_tensors({"rng.torch": torch.get_rng_state(),
                          **{f"strategy.{k}": v for k, v in self.strategy.state().items()}},
                         folder / RESUME_FILE)

        accepted = [r.node for r in kept]
        self.run_dir.commit_checkpoint(server_round, write, {
            "strategy": self.cfg.strategy, "method": self.method, "accepted_nodes": accepted,
            "export": dataclasses.asdict(self.strategy.method.export_view()),
            "rejected_nodes": [r.metadata.src_node_id for r in replies
                               if r.metadata.src_node_id not in accepted],
            "rejections": [{"node_id": r.node, "check": r.check, "reason": r.reason} for r in rejected],
            "weights": {str(r.node): r.examples for r in kept},
            "base_version": self.strategy.version, "base_fingerprint": self.model.fingerprint(),
            "resume": {
                "node_versions": {str(n): v for n, v in self.strategy.node_versions.items()},
                "partitions": {str(n): p for n, p in self.strategy.partitions.items()},
                "totals": dataclasses.asdict(dataclasses.replace(self.totals, rounds=server_round)),
            },
        })
        self.totals.rounds = server_round
        self.saved_version = self.strategy.version

    def restore(self, recovery: Recovery) -> ArrayRecord:
        """Continue after ``recovery``'s checkpoint: the strategy's history, versions and state, the
        totals, torch's RNG state and the global model; returns the state the next round sends.

        Raises CheckpointError when an update of the history is missing or an older checkpoint holding
        one does not verify (the run cannot go on exactly), or when the rebuilt frozen part is not the
        one the checkpoint recorded.
        """
        folder = recovery.checkpoint
        assert folder is not None
        manifest = json.loads((folder / "manifest.json").read_text())
        saved = manifest["resume"]
        files = {int(p.stem.split("-")[1]): p for f in self.run_dir.round_folders()
                 for p in f.glob(HISTORY_FILE.replace("{:04d}", "*"))}
        versions = range(1, int(manifest["base_version"]) + 1)
        if missing := [v for v in versions if v not in files]:
            raise CheckpointError(f"cannot resume from {folder}: update {missing[0]} of the history is in "
                                  "no checkpoint")
        for holder in sorted({files[v].parent for v in versions} - {folder}):  # recover() verified folder
            if (reason := unverified(holder)) is not None:
                raise CheckpointError(f"cannot resume from {folder}: {reason}")
        history = [self.strategy.method.update_type.from_flat(load_file(files[v])) for v in versions]
        extra = load_file(folder / RESUME_FILE)
        self.strategy.restore(history, {int(n): int(v) for n, v in saved["node_versions"].items()},
                              {k.removeprefix("strategy."): v for k, v in extra.items()
                               if k.startswith("strategy.")})
        self.strategy.partitions.update({int(n): int(p) for n, p in saved["partitions"].items()})
        self.saved_version = self.strategy.version
        self.totals = Totals.of(saved["totals"])
        torch.set_rng_state(extra["rng.torch"])
        self.catch_up_server()
        state_now = load_file(folder / STATE_FILE)
        self.model.load(state_now, recovery.round)
        expected, held = float(manifest["base_fingerprint"]), self.model.fingerprint()
        if abs(held - expected) > self.strategy.method.sync_tolerance * max(abs(expected), 1.0):
            raise CheckpointError(f"cannot resume from {folder}: the frozen part rebuilt from the history "
                                  f"has fingerprint {held!r}, the checkpoint recorded {expected!r}")
        return protocol.to_record(state_now)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Tensors as safetensors (contiguous copies where a tensor is a view)."""
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def same_run(run_path: Path, cfg: RunConfig) -> None:
    """Raise a one-line ValueError when ``cfg`` is not the configuration the run in ``run_path`` had
    (nothing to compare in a folder without a checkpoint: that run starts afresh)."""
    path = run_path / "config.json"
    if not (run_path / "LATEST").exists() or not path.exists():
        return
    was, now = json.loads(path.read_text()), cfg.to_run_config()
    changed = sorted(k for k in set(was) | set(now)
                     if k not in UNCHANGED_ON_RESUME and was.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        raise ValueError(f"resume: the run in {run_path} had another configuration ({shown}); only "
                         f"{', '.join(sorted(UNCHANGED_ON_RESUME))} may change")


def run_federation(grid: Grid, cfg: RunConfig, run_dir: RunDir, global_model: GlobalModel,
                   progress: RoundProgress) -> dict[str, Any]:
    """Run the setup and every round, then write summary.json; returns the summary (the caller adds the
    sample answers and writes report.html)."""
    start = time.perf_counter()
    recovery = run_dir.recover() if cfg.resume else Recovery(None)
    if recovery.checkpoint is not None:
        same_run(run_dir.path, cfg)
    run_dir.write_json("config.json", cfg.to_run_config())
    fed = Federation(cfg, run_dir, global_model, progress)
    stop = None
    try:
        fed.identify(grid)
        if recovery.checkpoint is not None:
            arrays = fed.restore(recovery)
            run_dir.append_event({"round": recovery.round, "event": "resumed",
                                  "checkpoint": recovery.checkpoint.name, "skipped": recovery.skipped,
                                  "discarded": recovery.discarded})
            progress.print(f"resumed after round {recovery.round} from {recovery.checkpoint}"
                           + "".join(f"\n  passed over {reason}" for reason in recovery.skipped))
        else:
            initial = fed.evaluate(0, None, grid)  # the nodes evaluate the model they build: the start
            progress.print(f"initial eval loss {initial['loss']:.3f}")
            fed.setup(grid)
            arrays = protocol.to_record(global_model.initial_state())
        for server_round in range(recovery.round + 1, cfg.rounds + 1):
            if (stop := fed.budget_spent()) is not None:
                run_dir.append_event({"round": server_round, "event": "stopped", "reason": stop})
                progress.print(f"stopped before round {server_round}: {stop}")
                break
            arrays = fed.train_round(server_round, arrays, grid)
    finally:
        fed.strategy.teardown()
    summary = {
        "strategy": cfg.strategy, "method": fed.method, "model": cfg.model, "task": cfg.task,
        "num_clients": cfg.num_clients, "rounds_completed": fed.totals.rounds,
        "initial_eval": fed.totals.evals[0], "final_eval": fed.totals.evals[fed.totals.rounds],
        "bytes_up_total": fed.totals.bytes_up + fed.totals.split_up,
        "bytes_down_total": fed.totals.bytes_down + fed.totals.split_down,
        **({"split_bytes_up_total": fed.totals.split_up, "split_bytes_down_total": fed.totals.split_down}
           if fed.totals.split_up or fed.totals.split_down else {}),
        "rejected_updates": fed.totals.rejected,
        "rejected_by_check": {k: v for k, v in fed.totals.rejected_by_check.items() if v},
        "uncommitted_rounds": fed.totals.uncommitted,
        "over_budget_clients": fed.totals.over_budget,
        "failed_clients": fed.totals.failed,
        "seconds_per_step": fed.totals.train_seconds / max(fed.totals.train_steps, 1),
        "wall_seconds": time.perf_counter() - start,
        **({} if fed.accountant is None else {
            "dp_mode": cfg.dp.mode, "epsilon": fed.privacy_fields()["epsilon"], "delta": fed.accountant.delta,
            "dp_rounds": fed.totals.dp_rounds}),
        **({"stopped": stop} if stop is not None else {}),
    }
    run_dir.write_json("summary.json", summary)
    return summary
