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

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from pollinate import workload
from pollinate.adapters import LoraAdapter
from pollinate.aggregation import apply_delta, fingerprint, from_flat
from pollinate.client.memory import peak_bytes, reset_peak
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


def _adapted(cfg: RunConfig, rank: int, run_id: int) -> _Adapted:
    # The run is part of the key: a base merged in one run must never serve another.
    key = (run_id, cfg.model, cfg.task, cfg.seed, cfg.strategy, cfg.lora, rank)
    with _LOCK:
        if key not in _MODELS:
            model, tokenizer = workload.base_model(cfg)
            adapter = workload.lora_adapter(cfg, model, rank)
            peft_model = workload.attach(cfg, adapter, model)
            strategy_class(cfg.strategy).client_side.prepare(adapter, peft_model)
            _MODELS[key] = _Adapted(peft_model, tokenizer, adapter)
        return _MODELS[key]


def _share(cfg: RunConfig, partition_id: int, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    key = (cfg, partition_id)
    with _LOCK:
        if key not in _SHARES:
            share = workload.shares(cfg)[partition_id]
            _SHARES[key] = encode_dataset(share, tokenizer, cfg.task, cfg.max_seq_len)
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


def _setup(msg: Message, context: Context) -> tuple[RunConfig, int, int, _Adapted]:
    """Configuration, round, partition and this process's model for the node's rank."""
    record = wire.config_of(msg)
    cfg = RunConfig.from_run_config(wire.run_config_of(record))
    partition_id = int(context.node_config["partition-id"])
    node = _adapted(cfg, cfg.lora.rank_for(partition_id), context.run_id)
    return cfg, int(record[wire.ROUND]), partition_id, node  # type: ignore[arg-type]


def _reply(msg: Message, metrics: dict[str, int | float], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({wire.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    if arrays is not None:
        content[wire.ARRAYS] = arrays
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Merge missing base deltas, load the global adapter, train ``local-steps``, reply the adapter."""
    cfg, server_round, partition_id, node = _setup(msg, context)
    if not _sync_base(node, msg):
        return _reply(msg, {wire.CATCH_UP: 1, wire.BASE_VERSION: node.version})
    seed = workload.round_seed(cfg, server_round, partition_id)
    side = strategy_class(cfg.strategy).client_side
    side.receive(node.adapter, node.model, wire.from_record(wire.arrays_of(msg)), seed=seed)
    examples = _share(cfg, partition_id, node.tokenizer)
    reset_peak()
    result = train_local(node.model, examples, steps=cfg.local_steps, batch_size=cfg.batch_size,
                         lr=cfg.lr, pad_id=node.tokenizer.pad_token_id, seed=seed)
    peak = peak_bytes()
    return _reply(msg, {
        wire.NUM_EXAMPLES: len(examples),
        wire.RANK: node.adapter.config.rank,
        wire.EXAMPLES_SEEN: result.examples,
        wire.TOKENS_SEEN: result.tokens,
        wire.TRAIN_LOSS: result.loss,
        wire.TRAIN_SECONDS: result.seconds,
        wire.BYTES_DOWN: wire.wire_bytes(wire.arrays_of(msg)) + wire.wire_bytes(wire.base_of(msg)),
        wire.PEAK_MEM: peak,
        wire.BASE_VERSION: node.version,
        wire.BASE_FINGERPRINT: fingerprint(node.adapter.base_weights(node.model)),
    }, wire.to_record(node.adapter.trainable_state(node.model)))


@app.evaluate()
def evaluate_share(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this node's share (federated evaluation)."""
    cfg, server_round, partition_id, node = _setup(msg, context)
    if not _sync_base(node, msg):
        return _reply(msg, {wire.CATCH_UP: 1, wire.BASE_VERSION: node.version})
    strategy_class(cfg.strategy).client_side.receive(
        node.adapter, node.model, wire.from_record(wire.arrays_of(msg)),
        seed=workload.round_seed(cfg, server_round, partition_id))
    examples = _share(cfg, partition_id, node.tokenizer)
    scores = evaluate(node.model, examples, batch_size=cfg.batch_size,
                      pad_id=node.tokenizer.pad_token_id, classification=cfg.task == CLASSIFICATION)
    return _reply(msg, {wire.NUM_EXAMPLES: len(examples), wire.EVAL_LOSS: scores["loss"],
                        **({wire.ACCURACY: scores["accuracy"]} if "accuracy" in scores else {})})
