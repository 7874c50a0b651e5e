"""What a run trains on, derived from its RunConfig: the base model, the held-out split, each share.

Both apps call these with the same configuration, so the server and every client build the same base
model, the same held-out split and disjoint shares without exchanging anything but the configuration.
Results are cached per process: a simulation worker serves many clients and many rounds.
"""

from __future__ import annotations

import functools

import torch
from datasets import Dataset
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pollinate import models
from pollinate.adapters import LoraAdapter, LoraAdapterConfig
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, Fields, load_dataset, partition, split_heldout


def _fields(cfg: RunConfig) -> Fields:
    f = cfg.data
    return Fields(prompt=f.prompt, response=f.response, text=f.text, label=f.label,
                  category=f.category)


@functools.lru_cache(maxsize=4)
def splits(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    """(training pool, held-out split); the held-out examples never reach a client."""
    ds = load_dataset(cfg.dataset_name, cfg.task, _fields(cfg))
    return split_heldout(ds, cfg.eval_examples, cfg.seed)


@functools.lru_cache(maxsize=4)
def shares(cfg: RunConfig) -> list[Dataset]:
    """Every client's share of the training pool, by the configured partitioner."""
    train, _ = splits(cfg)
    return partition(train, cfg.partitioner, cfg.num_clients, cfg.seed, cfg.dirichlet_alpha,
                     by=cfg.partition_by)


def num_labels(cfg: RunConfig) -> int:
    """Classes of a classification task (0 for generation)."""
    if cfg.task != CLASSIFICATION:
        return 0
    return len(splits(cfg)[0].features["label"].names)


def base_model(cfg: RunConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh copy of the frozen base model and its tokenizer (identical in every process)."""
    return models.load_model(cfg.model, cfg.task, num_labels=max(num_labels(cfg), 2), seed=cfg.seed)


def lora_adapter(cfg: RunConfig, model: nn.Module, rank: int) -> LoraAdapter:
    """The LoRA method for ``model`` at ``rank``, targets resolved for the model's family."""
    family = getattr(getattr(model, "config", None), "model_type", "")
    return LoraAdapter(LoraAdapterConfig(
        rank=rank, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.target_list(family)),
        task=cfg.task, dropout=cfg.lora.dropout))


def attach(cfg: RunConfig, adapter: LoraAdapter, model: nn.Module) -> PeftModel:
    """``adapter`` on ``model`` with A drawn from the run's seed, identical on every node."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # peft draws A from the global RNG
        return adapter.attach(model)


def round_seed(cfg: RunConfig, server_round: int, client: int = -1) -> int:
    """A seed of its own for each (round, client): data order, fresh adapters."""
    return (cfg.seed * 1_000_003 + server_round * 10_007 + client) % 2**31
