"""The ClientApp: trains the global adapter on this node's share and replies with the adapter only.

The run configuration arrives with every instruction (the server is its single source of truth); the
node's identity comes from ``context.node_config`` (``partition-id``, ``num-partitions``). The base model
is loaded once per process and reused across rounds and across the simulated clients that share a
worker: this module is importable, so the cache survives between rounds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from pollinate import workload
from pollinate.adapters import LoraAdapter
from pollinate.aggregation import apply_delta, fingerprint, from_flat
from pollinate.client.budget import limit_heap_retention
from pollinate.client.memory import peak_bytes, reset_peak
from pollinate.client.planner import Estimate, Plan, enable_checkpointing
from pollinate.client.profile import DeviceProfile, plan_for
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, encode_dataset
from pollinate.strategies import strategy_class, wire
from pollinate.training import evaluate, train_local

app = ClientApp()


@dataclass
class _Adapted:
    """A base model wrapped with one adapter, kept for the life of the process."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    adapter: LoraAdapter
    version: int = 0
    """Rounds of base deltas merged into this model's frozen weights."""


_MODELS: dict[tuple[Any, ...], _Adapted] = {}
_SHARES: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
_LOCK = threading.Lock()
_BASELINE: list[int] = []  # resident bytes of the runtime before any model was loaded


def _adapted(cfg: RunConfig, plan: Plan, run_id: int, budgeted: bool) -> _Adapted:
    """This process's model for ``plan``; on a budgeted node one at a time, so a measured peak is one
    client's own (elsewhere every rank's model stays, so clients of mixed ranks never reload).

    The run is part of the key: a base merged in one run must never serve another. A model loaded
    anew starts at base version 0 and catches up through the server.
    """
    key = (run_id, cfg.model, cfg.task, cfg.seed, cfg.strategy, cfg.lora, plan.rank, plan.checkpointing)
    with _LOCK:
        if key not in _MODELS:
            if not _BASELINE:  # once per process, before any model: the runtime's own footprint
                if budgeted:  # freed tensors leave at once, so a peak is one client's own
                    limit_heap_retention()  # ... at 35-46% more CPU a step: only for budgets
                reset_peak()
                _BASELINE.append(peak_bytes())
            # budgeted: one model at a time; otherwise only this run's models (one per rank) stay
            for stale in [k for k in _MODELS if budgeted or k[:-2] != key[:-2]]:
                del _MODELS[stale]
            model, tokenizer = workload.base_model(cfg)
            adapter = workload.lora_adapter(cfg, model, plan.rank)
            peft_model = workload.attach(cfg, adapter, model)
            strategy_class(cfg.strategy).client_side.prepare(adapter, peft_model)
            if plan.checkpointing:
                enable_checkpointing(peft_model)
            _MODELS[key] = _Adapted(peft_model, tokenizer, adapter)
        return _MODELS[key]


def _share(cfg: RunConfig, partition_id: int, tokenizer: PreTrainedTokenizerBase,
           seq_len: int, budgeted: bool) -> list[dict]:
    """This client's tokenized share, encoded once per process and run (on a budgeted node only the
    current client's is kept: the others would count in its peak)."""
    key = (cfg, partition_id, seq_len)
    with _LOCK:
        if key not in _SHARES:
            for stale in [k for k in _SHARES if budgeted or k[0] != cfg]:
                del _SHARES[stale]
            share = workload.shares(cfg)[partition_id]
            _SHARES[key] = encode_dataset(share, tokenizer, cfg.task, seq_len)
        return _SHARES[key]


def _sync_base(node: _Adapted, msg: Message) -> bool:
    """Merge the base deltas this process lacks; False when it holds a base older than they start from."""
    config = wire.config_of(msg)
    start, end = int(config.get(wire.BASE_FROM, 0)), int(config.get(wire.BASE_TO, 0))  # type: ignore[arg-type]
    if node.version >= end:  # another client of this process merged them already
        return True
    if node.version != start:  # a combined delta cannot be applied in part
        return False
    apply_delta(node.adapter.base_weights(node.model), from_flat(wire.from_record(wire.base_of(msg))))
    node.version = end
    return True


@dataclass(frozen=True)
class _Ready:
    """A handler's inputs once the node holds the server's base and the received adapter."""

    cfg: RunConfig
    seed: int
    profile: DeviceProfile
    plan: Plan
    estimate: Estimate
    node: _Adapted
    examples: list[dict[str, Any]]


def _prepare(msg: Message, context: Context) -> _Ready | Message:
    """Plan within the budget, merge missing base deltas, load the received adapter; or the reply
    that ends the instruction early (a refusal, or a request to catch up)."""
    record = wire.config_of(msg)
    cfg = RunConfig.from_run_config(wire.run_config_of(record))
    profile = DeviceProfile.of(context.node_config, cfg)
    try:
        plan, estimate = plan_for(cfg, profile)
    except ValueError as err:
        return _refuse(msg, str(err))
    node = _adapted(cfg, plan, context.run_id, budgeted=profile.budget is not None)
    if not _sync_base(node, msg):
        return _reply(msg, {wire.CATCH_UP: 1, wire.BASE_VERSION: node.version})
    seed = workload.round_seed(cfg, int(record[wire.ROUND]), profile.partition_id)  # type: ignore[arg-type]
    strategy_class(cfg.strategy).client_side.receive(
        node.adapter, node.model, wire.from_record(wire.arrays_of(msg)), seed=seed)
    examples = _share(cfg, profile.partition_id, node.tokenizer, plan.seq_len, profile.budget is not None)
    return _Ready(cfg, seed, profile, plan, estimate, node, examples)


def _refuse(msg: Message, reason: str) -> Message:
    """An error reply: the node stays up and the server records the reason."""
    return Message(Error(code=wire.REFUSED, reason=reason), reply_to=msg)


def _reply(msg: Message, metrics: dict[str, int | float], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({wire.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    if arrays is not None:
        content[wire.ARRAYS] = arrays
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter for ``local-steps`` within the budget; reply with its new state."""
    ready = _prepare(msg, context)
    if isinstance(ready, Message):
        return ready
    cfg, plan, node = ready.cfg, ready.plan, ready.node
    reset_peak()
    result = train_local(node.model, ready.examples, steps=cfg.local_steps, batch_size=cfg.batch_size,
                         lr=cfg.lr, pad_id=node.tokenizer.pad_token_id, seed=ready.seed,
                         micro_batch=plan.micro_batch)
    process_peak = peak_bytes()
    return _reply(msg, {
        wire.NUM_EXAMPLES: len(ready.examples),
        wire.RANK: plan.rank,
        wire.MICRO_BATCH: plan.micro_batch,
        wire.GRAD_ACCUM: plan.grad_accum,
        wire.SEQ_LEN: plan.seq_len,
        wire.CHECKPOINTING: int(plan.checkpointing),
        wire.BUDGET: ready.profile.budget or 0,
        wire.ESTIMATE: ready.estimate.total,
        wire.EXAMPLES_SEEN: result.examples,
        wire.TOKENS_SEEN: result.tokens,
        wire.TRAIN_LOSS: result.loss,
        wire.TRAIN_SECONDS: result.seconds,
        wire.BYTES_DOWN: wire.wire_bytes(wire.arrays_of(msg)) + wire.wire_bytes(wire.base_of(msg)),
        wire.PEAK_MEM: max(process_peak - _BASELINE[0], 0),
        wire.PROCESS_PEAK: process_peak,
        wire.RUNTIME_BASELINE: _BASELINE[0],
        wire.BASE_VERSION: node.version,
        wire.BASE_FINGERPRINT: fingerprint(node.adapter.base_weights(node.model)),
    }, wire.to_record(node.adapter.trainable_state(node.model)))


@app.evaluate()
def evaluate_share(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this node's share (federated evaluation)."""
    ready = _prepare(msg, context)
    if isinstance(ready, Message):
        return ready
    scores = evaluate(ready.node.model, ready.examples, batch_size=ready.plan.micro_batch,
                      pad_id=ready.node.tokenizer.pad_token_id,
                      classification=ready.cfg.task == CLASSIFICATION)
    return _reply(msg, {wire.NUM_EXAMPLES: len(ready.examples), wire.EVAL_LOSS: scores["loss"],
                        **({wire.ACCURACY: scores["accuracy"]} if "accuracy" in scores else {})})
