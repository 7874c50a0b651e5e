"""The server's own copy of the model: it holds the global adapter, evaluates it and saves it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from pollinate import models, workload
from pollinate.adapters import State
from pollinate.aggregation import BaseDelta, LoraFactors, apply_delta, fingerprint
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, encode_dataset, encode_prompt
from pollinate.strategies import global_rank, strategy_class
from pollinate.training import evaluate, greedy_generate

EVAL_BATCH = 8  # held-out batches; larger ones only raise peak memory on a 2-core machine


class GlobalModel:
    """Base model + the global adapter, and the held-out split it is evaluated on.

    Building it loads the model, the data and the adapter exactly as a client will, so every
    configuration error surfaces here, before any client trains.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.side = strategy_class(cfg.strategy).client_side
        models.check_task(cfg.model, cfg.task)  # cheapest checks first: names, then data
        workload.shares(cfg)  # data before the model: a bad dataset or impossible split fails in seconds
        model, self.tokenizer = workload.base_model(cfg)
        self.adapter = workload.lora_adapter(cfg, model, global_rank(cfg))
        self.model = workload.attach(cfg, self.adapter, model)
        self.side.prepare(self.adapter, self.model)
        _, heldout = workload.splits(cfg)
        self.heldout = heldout
        self.encoded = encode_dataset(heldout, self.tokenizer, cfg.task, cfg.max_seq_len)

    def initial_state(self) -> State:
        """The adapter state every client receives in round 1."""
        state = self.adapter.trainable_state(self.model)
        if self.side.fresh_adapter:  # clients start from their own fresh factors: send the head only
            return LoraFactors.from_state(state, self.cfg.lora.alpha).extra
        return state

    def load(self, state: Mapping[str, torch.Tensor], server_round: int) -> None:
        """Make ``state`` the global adapter, exactly as a client receiving it does."""
        self.side.receive(self.adapter, self.model, state, seed=workload.round_seed(self.cfg, server_round))

    def merge(self, delta: BaseDelta) -> None:
        """Fold a round's base delta into the frozen weights (the clients merge the same)."""
        apply_delta(self.adapter.base_weights(self.model), delta)

    def fingerprint(self) -> float:
        """The base weights' fingerprint, to compare with what clients report."""
        return fingerprint(self.adapter.base_weights(self.model))

    def evaluate(self) -> dict[str, float]:
        """Loss (and accuracy or perplexity) of the global adapter on the held-out split."""
        return evaluate(self.model, self.encoded, batch_size=EVAL_BATCH,
                        pad_id=self.tokenizer.pad_token_id,
                        classification=self.cfg.task == CLASSIFICATION)

    def save(self, folder: Path) -> None:
        """The global adapter in peft format (``PeftModel.from_pretrained(base, folder)``)."""
        self.model.save_pretrained(str(folder))

    def answer(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy answer of the current global model (before round 1: the base model) to ``prompt``."""
        ids = encode_prompt(self.tokenizer, prompt)
        eos = self.tokenizer.eos_token_id
        new = greedy_generate(self.model, ids, max_new_tokens=max_new_tokens, eos_id=eos)
        return str(self.tokenizer.decode(new, skip_special_tokens=True)).strip()
