"""The server's own copy of the model: it holds the global adapter, evaluates it and saves it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from pollinate import models, workload
from pollinate.adapters import State
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, encode_dataset, encode_prompt
from pollinate.training import evaluate, greedy_generate

EVAL_BATCH = 8  # held-out batches; larger ones only raise peak memory on a 2-core machine


class GlobalModel:
    """Base model + the global adapter, and the held-out split it is evaluated on.

    Building it loads the model, the data and the adapter exactly as a client will, so every
    configuration error surfaces here, before any client trains.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        models.check_task(cfg.model, cfg.task)  # cheapest checks first: names, then data
        workload.shares(cfg)  # data before the model: a bad dataset or impossible split fails in seconds
        model, self.tokenizer = workload.base_model(cfg)
        self.adapter = workload.lora_adapter(cfg, model, cfg.lora.rank)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)  # peft draws A from the global RNG: make it the run's seed
            self.model = self.adapter.attach(model)
        _, heldout = workload.splits(cfg)
        self.heldout = heldout
        self.encoded = encode_dataset(heldout, self.tokenizer, cfg.task, cfg.max_seq_len)

    def initial_state(self) -> State:
        """The adapter every client starts round 1 from."""
        return self.adapter.trainable_state(self.model)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Make ``state`` the global adapter."""
        self.adapter.load_state(self.model, state)

    def evaluate(self) -> dict[str, float]:
        """Loss (and accuracy or perplexity) of the global adapter on the held-out split."""
        return evaluate(self.model, self.encoded, batch_size=EVAL_BATCH,
                        pad_id=self.tokenizer.pad_token_id,
                        classification=self.cfg.task == CLASSIFICATION)

    def save(self, folder: Path) -> None:
        """The global adapter in peft format (``PeftModel.from_pretrained(base, folder)``)."""
        self.model.save_pretrained(str(folder))

    def answer(self, prompt: str, *, base: bool, max_new_tokens: int = 32) -> str:
        """Greedy answer to ``prompt`` from the fine-tuned model, or from the base when ``base``."""
        ids = encode_prompt(self.tokenizer, prompt)
        eos = self.tokenizer.eos_token_id
        if base:
            with self.model.disable_adapter():
                new = greedy_generate(self.model, ids, max_new_tokens=max_new_tokens, eos_id=eos)
        else:
            new = greedy_generate(self.model, ids, max_new_tokens=max_new_tokens, eos_id=eos)
        return str(self.tokenizer.decode(new, skip_special_tokens=True)).strip()
