"""The server's own trainee: it holds the global state, merges every update, evaluates and saves."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pollinate import models, workload
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, encode_dataset, encode_prompt
from pollinate.training import evaluate, greedy_generate

if TYPE_CHECKING:
    from pollinate.methods.base import Method, Update

EVAL_BATCH = 8  # held-out batches; larger ones only raise peak memory on a 2-core machine


class GlobalModel:
    """The method's server trainee, and the held-out split it is evaluated on.

    Building it loads the model, the data and the method's trainee exactly as a client will, so every
    configuration error surfaces here, before any client trains.
    """

    def __init__(self, cfg: RunConfig, method: Method) -> None:
        self.cfg, self.method = cfg, method
        models.check_task(cfg.model, cfg.task)  # cheapest checks first: names, then data
        workload.shares(cfg, method.calibration_size())  # data before the model: a bad dataset fails fast
        self.trainee = method.server()
        self.model, self.tokenizer = self.trainee.model, self.trainee.tokenizer
        _, heldout = workload.splits(cfg)
        self.heldout = heldout
        self.encoded = encode_dataset(heldout, self.tokenizer, cfg.task, cfg.max_seq_len)

    @property
    def version(self) -> int:
        """Updates merged into the server trainee."""
        return self.trainee.version

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The state every client receives in round 1."""
        return self.method.initial_state(self.trainee)

    def load(self, state: Mapping[str, torch.Tensor], server_round: int) -> None:
        """Make ``state`` the global state, exactly as a client receiving it does."""
        self.trainee.load(state, seed=workload.round_seed(self.cfg, server_round))

    def merge(self, update: Update) -> None:
        """Fold an update into the frozen part (the clients merge the same)."""
        self.trainee.merge(update)

    def fingerprint(self) -> float:
        """The frozen part's fingerprint, to compare with what clients report."""
        return self.trainee.fingerprint()

    def evaluate(self) -> dict[str, float]:
        """Loss (and accuracy or perplexity) of the global model on the held-out split."""
        return evaluate(self.model, self.encoded, batch_size=EVAL_BATCH,
                        pad_id=self.tokenizer.pad_token_id,
                        classification=self.cfg.task == CLASSIFICATION)

    def save(self, folder: Path) -> None:
        """The server trainee's files (LoRA: the global adapter in peft format)."""
        self.trainee.save(folder)

    def answer(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy answer of the current global model (before round 1: the base model) to ``prompt``."""
        ids = encode_prompt(self.tokenizer, prompt)
        eos = self.tokenizer.eos_token_id
        new = greedy_generate(self.model, ids, max_new_tokens=max_new_tokens, eos_id=eos)
        return str(self.tokenizer.decode(new, skip_special_tokens=True)).strip()
