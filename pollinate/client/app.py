"""The ClientApp: trains this node's share with the run's method and replies with what travels only.

The run configuration arrives with every instruction (the server is its single source of truth); the
node's identity and budget come from ``context.node_config``. The app talks to the method only through
the protocols of ``pollinate.methods.base``: it plans within the budget, builds (or reuses) the
trainee, merges the updates it lacks, trains, and replies. Trainees and encoded shares live in one
per-process :class:`ProcessState`, so they survive between rounds and across the simulated clients
that share a worker (this module is importable).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pollinate import protocol, workload
from pollinate.client.budget import limit_heap_retention
from pollinate.client.memory import peak_bytes, reset_peak
from pollinate.client.profile import DeviceProfile, plan_for
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, encode_dataset
from pollinate.methods.base import Example
from pollinate.methods.plan import Estimate, Plan
from pollinate.privacy.mechanism import privacy_for
from pollinate.strategies import method_for
from pollinate.training import evaluate

if TYPE_CHECKING:
    from torch import Tensor

    from pollinate.methods.base import Method, Trainee

app = ClientApp()


@dataclass(frozen=True)
class TraineeKey:
    """A trainee serves one run, one configuration and one plan: a base merged in one run must never
    serve another."""

    run: int
    cfg: RunConfig
    plan: Plan


@dataclass(frozen=True)
class ShareKey:
    """A client's encoded share: per configuration, partition (or data file), sequence cap and
    calibration slice."""

    cfg: RunConfig
    partition: int
    seq_len: int
    reserved: int
    data_path: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    held_out: bool = False
    """The slice the node evaluates on (``workload.client_split``), not the one it trains on."""


V = TypeVar("V")


@dataclass
class ProcessState:
    """What this process keeps between messages. On a budgeted node only one trainee and one share
    stay, so a measured peak is one client's own; elsewhere this run's stay (no reload per rank)."""

    trainees: dict[TraineeKey, Any] = field(default_factory=dict)
    shares: dict[ShareKey, list[Example]] = field(default_factory=dict)
    baseline: int | None = None
    """Resident bytes of the runtime before any model was loaded."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def runtime_baseline(self, budgeted: bool) -> int:
        """Measured once per process, before the first model."""
        if self.baseline is None:
            if budgeted:  # freed tensors leave at once, so a peak is one client's own
                limit_heap_retention()  # ... at 35-46% more CPU a step: only for budgets
            reset_peak()
            self.baseline = peak_bytes()
        return self.baseline

    def trainee(self, key: TraineeKey, build: Callable[[], Trainee], budgeted: bool) -> Trainee:
        """The trainee for ``key``, built on first use (a new one starts at version 0)."""
        with self.lock:
            self.runtime_baseline(budgeted)
            return _cached(self.trainees, key, build, lambda k: budgeted or k.run != key.run
                           or k.cfg != key.cfg)

    def forget(self, trainee: Trainee) -> None:
        """Drop ``trainee``: the next instruction builds a new one (at version 0: it catches up)."""
        with self.lock:
            self.trainees = {k: t for k, t in self.trainees.items() if t is not trainee}

    def share(self, key: ShareKey, build: Callable[[], list[Example]], budgeted: bool) -> list[Example]:
        """The encoded share for ``key``, encoded once per process and run."""
        with self.lock:
            return _cached(self.shares, key, build, lambda k: budgeted or k.cfg != key.cfg)


def _cached(cache: dict[Any, V], key: Any, build: Callable[[], V], stale: Callable[[Any], bool]) -> V:
    if key not in cache:
        for old in [k for k in cache if stale(k)]:
            del cache[old]
        cache[key] = build()
    return cache[key]


STATE = ProcessState()


def sync_updates(trainee: Trainee, method: Method, msg: Message) -> bool:
    """Merge the updates this process lacks; False when it holds an older version than they start from."""
    config = protocol.config_of(msg)
    start, end = int(config.get(protocol.BASE_FROM, 0)), int(config.get(protocol.BASE_TO, 0))  # type: ignore[arg-type]
    if trainee.version >= end:  # another client of this process merged them already
        return True
    if trainee.version != start:  # a combined update cannot be applied in part
        return False
    flat = protocol.from_record(protocol.base_of(msg))
    trainee.merge(method.update_type.from_flat(flat, span=end - start))
    return True


@dataclass(frozen=True)
class _Ready:
    """A handler's inputs once the node holds the server's version and the received state."""

    cfg: RunConfig
    seed: int
    profile: DeviceProfile
    method: Method
    plan: Plan
    estimate: Estimate
    trainee: Trainee
    examples: list[Example]
    received: dict[str, Tensor]
    """The global state the instruction carried (empty when it carried none)."""


def _prepare(msg: Message, context: Context, held_out: bool = False) -> _Ready | Message:
    """Plan within the budget, merge missing updates, load the received state; or the reply that ends
    the instruction early (a refusal, or a request to catch up). ``held_out``: the examples are the
    node's evaluation slice rather than its training data."""
    record = protocol.config_of(msg)
    cfg = RunConfig.from_run_config(protocol.run_config_of(record))
    method = method_for(cfg)
    try:
        profile = DeviceProfile.of(context.node_config, cfg)
        plan, estimate = plan_for(method, profile)
    except ValueError as err:
        return _refuse(msg, str(err))
    budgeted = profile.budget is not None
    trainee_key = TraineeKey(context.run_id, cfg, plan)
    trainee = STATE.trainee(trainee_key, lambda: method.client(plan), budgeted)
    if not sync_updates(trainee, method, msg):
        if int(record.get(protocol.BASE_FROM, 0)) != 0:  # type: ignore[arg-type]
            return _reply(msg, {protocol.CATCH_UP: 1, protocol.BASE_VERSION: trainee.version})
        STATE.forget(trainee)  # it holds part of what the record combines: start again from the base
        trainee = STATE.trainee(trainee_key, lambda: method.client(plan), budgeted)
        sync_updates(trainee, method, msg)
    _introduce(trainee, profile)
    seed = workload.round_seed(cfg, int(record[protocol.ROUND]), profile.client(context.node_id))  # type: ignore[arg-type]
    has_state = protocol.ARRAYS in msg.content.array_records
    received = protocol.from_record(protocol.arrays_of(msg)) if has_state else {}
    if has_state:
        trainee.load(received, seed=seed)
    try:
        examples = _examples(cfg, profile, method, plan, trainee, budgeted, held_out)
    except ValueError as err:  # the device's file is missing, lacks a field, or has a foreign label
        return _refuse(msg, str(err))
    return _Ready(cfg, seed, profile, method, plan, estimate, trainee, examples, received)


def _introduce(trainee: Trainee, profile: DeviceProfile) -> None:
    """Give a trainee that dials a service of the server besides Flower (SFPrompt's body service) this
    device's own certificate (``pollinate agent``): a path in the run configuration names the server's
    folder, never the device's. A simulated node has none and keeps what the server sent."""
    use = getattr(trainee, "use_device_tls", None)
    if use is not None and profile.tls is not None:
        use(profile.tls)


def _examples(cfg: RunConfig, profile: DeviceProfile, method: Method, plan: Plan, trainee: Trainee,
              budgeted: bool, held_out: bool = False) -> list[Example]:
    """This node's encoded examples, from its share of the run's dataset or its own file (never both):
    the part it trains on, or (``held_out``) the part it evaluates on."""
    reserved = 0 if profile.data_path is not None else method.calibration_size()
    key = ShareKey(cfg, profile.partition_id if profile.data_path is None else -1, plan.seq_len, reserved,
                   profile.data_path, tuple(sorted(profile.fields.items())), held_out)

    def build() -> list[Example]:
        if profile.data_path is not None:
            whole = workload.device_share(cfg, profile.data_path, profile.fields)
        else:
            whole = workload.shares(cfg, reserved)[profile.partition_id]
        part = workload.client_split(cfg, whole)[int(held_out)]
        return encode_dataset(part, trainee.tokenizer, cfg.task, plan.seq_len)

    return STATE.share(key, build, budgeted)


def _refuse(msg: Message, reason: str) -> Message:
    """An error reply: the node stays up and the server records the reason."""
    return Message(Error(code=protocol.REFUSED, reason=reason), reply_to=msg)


def _reply(msg: Message, metrics: dict[str, int | float], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({protocol.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    if arrays is not None:
        content[protocol.ARRAYS] = arrays
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received state for ``local-steps`` within the budget; reply with what travels."""
    ready = _prepare(msg, context)
    if isinstance(ready, Message):
        return ready
    plan, trainee = ready.plan, ready.trainee
    spec = ready.method.spec(plan)
    reset_peak()
    try:
        result = trainee.train(ready.examples, spec, seed=ready.seed)
    except Exception as error:  # noqa: BLE001 - the node answers, stays up and starts clean next time
        STATE.forget(trainee)  # it may hold a half-trained or half-restored frozen part
        reason = f"training failed: {type(error).__name__}: {error}"[:500]
        return Message(Error(code=protocol.TRAIN_FAILED, reason=reason), reply_to=msg)
    process_peak, baseline = peak_bytes(), STATE.runtime_baseline(ready.profile.budget is not None)
    return _reply(msg, {
        protocol.NUM_EXAMPLES: len(ready.examples),
        **protocol.plan_metrics(plan.fields()),
        **protocol.method_metrics(result.figures),
        protocol.BUDGET: ready.profile.budget or 0,
        protocol.ESTIMATE: ready.estimate.total,
        protocol.EXAMPLES_SEEN: result.examples,
        protocol.TOKENS_SEEN: result.tokens,
        protocol.TRAIN_LOSS: result.loss,
        protocol.TRAIN_SECONDS: result.seconds,
        protocol.BYTES_DOWN: protocol.downlink_bytes(msg),
        protocol.PEAK_MEM: max(process_peak - baseline, 0),
        protocol.PROCESS_PEAK: process_peak,
        protocol.RUNTIME_BASELINE: baseline,
        protocol.BASE_VERSION: trainee.version,
        protocol.BASE_FINGERPRINT: trainee.fingerprint(),
    }, protocol.to_record(privacy_for(ready.cfg.dp).protect(trainee.upload(), ready.received,
                                                             ready.method)))


@app.evaluate()
def evaluate_share(msg: Message, context: Context) -> Message:
    """Evaluate the received global state on this node's held-out slice (federated evaluation)."""
    ready = _prepare(msg, context, held_out=True)
    if isinstance(ready, Message):
        return ready
    scores = evaluate(ready.trainee.model, ready.examples, batch_size=ready.plan.micro_batch,
                      pad_id=ready.trainee.tokenizer.pad_token_id,
                      classification=ready.cfg.task == CLASSIFICATION)
    return _reply(msg, {protocol.NUM_EXAMPLES: len(ready.examples), protocol.EVAL_LOSS: scores["loss"],
                        **({protocol.ACCURACY: scores["accuracy"]} if "accuracy" in scores else {}),
                        protocol.BASE_VERSION: ready.trainee.version})


@app.query()
def setup(msg: Message, context: Context) -> Message:
    """A setup exchange before round 1: the method answers from this node's share (Fed-SB's
    federated initialisation returns the gradient sum of the share once); or the roll call that names
    this node by its share, answered without loading anything."""
    if protocol.config_of(msg).get(protocol.SETUP) == protocol.IDENTIFY:
        return _reply(msg, {protocol.PARTITION_ID: int(context.node_config.get("partition-id", -1))})
    ready = _prepare(msg, context)
    if isinstance(ready, Message):
        return ready
    answer = getattr(ready.method, "setup_reply", None)
    if answer is None:
        return _refuse(msg, f"strategy {ready.cfg.strategy!r} has no setup exchange")
    request = str(protocol.config_of(msg).get(protocol.SETUP, ""))
    tensors = answer(ready.trainee, ready.examples, request)
    return _reply(msg, {protocol.NUM_EXAMPLES: len(ready.examples),
                        protocol.BASE_VERSION: ready.trainee.version}, protocol.to_record(tensors))
