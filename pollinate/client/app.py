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
from pollinate.client.memory import peak_bytes, reset_peak
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, encode_dataset
from pollinate.strategies import wire
from pollinate.training import evaluate, train_local

app = ClientApp()


@dataclass
class _Adapted:
    """A base model wrapped with one adapter, kept for the life of the process."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    adapter: LoraAdapter


_MODELS: dict[tuple[Any, ...], _Adapted] = {}
_SHARES: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
_LOCK = threading.Lock()


def _adapted(cfg: RunConfig, rank: int) -> _Adapted:
    key = (cfg.model, cfg.task, cfg.seed, cfg.lora, rank)
    with _LOCK:
        if key not in _MODELS:
            model, tokenizer = workload.base_model(cfg)
            adapter = workload.lora_adapter(cfg, model, rank)
            _MODELS[key] = _Adapted(adapter.attach(model), tokenizer, adapter)
        return _MODELS[key]


def _share(cfg: RunConfig, partition_id: int, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    key = (cfg, partition_id)
    with _LOCK:
        if key not in _SHARES:
            share = workload.shares(cfg)[partition_id]
            _SHARES[key] = encode_dataset(share, tokenizer, cfg.task, cfg.max_seq_len)
        return _SHARES[key]


def _setup(msg: Message, context: Context) -> tuple[RunConfig, int, int, _Adapted]:
    """Configuration, round, partition and the model holding the received global adapter."""
    record = wire.config_of(msg)
    cfg = RunConfig.from_run_config(wire.run_config_of(record))
    partition_id = int(context.node_config["partition-id"])
    node = _adapted(cfg, cfg.lora.rank_for(partition_id))
    node.adapter.load_state(node.model, wire.from_record(wire.arrays_of(msg)))
    return cfg, int(record[wire.ROUND]), partition_id, node  # type: ignore[arg-type]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter for ``local-steps`` and reply with its new state."""
    cfg, server_round, partition_id, node = _setup(msg, context)
    examples = _share(cfg, partition_id, node.tokenizer)
    reset_peak()
    result = train_local(
        node.model, examples, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        pad_id=node.tokenizer.pad_token_id,
        seed=hash((cfg.seed, server_round, partition_id)) % 2**31,  # a fresh order per round
    )
    metrics = MetricRecord({
        wire.NUM_EXAMPLES: len(examples),
        wire.EXAMPLES_SEEN: result.examples,
        wire.TOKENS_SEEN: result.tokens,
        wire.TRAIN_LOSS: result.loss,
        wire.TRAIN_SECONDS: result.seconds,
        wire.BYTES_DOWN: wire.wire_bytes(wire.arrays_of(msg)),
        wire.PEAK_MEM: peak_bytes(),
    })
    arrays: ArrayRecord = wire.to_record(node.adapter.trainable_state(node.model))
    return Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate_share(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this node's share (federated evaluation)."""
    cfg, _, partition_id, node = _setup(msg, context)
    examples = _share(cfg, partition_id, node.tokenizer)
    scores = evaluate(node.model, examples, batch_size=cfg.batch_size,
                      pad_id=node.tokenizer.pad_token_id,
                      classification=cfg.task == CLASSIFICATION)
    metrics = MetricRecord({wire.NUM_EXAMPLES: len(examples), wire.EVAL_LOSS: scores["loss"],
                            **({wire.ACCURACY: scores["accuracy"]} if "accuracy" in scores else {})})
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)
