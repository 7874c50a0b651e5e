"""What a run trains on, derived from its RunConfig: the base model, the held-out split, each share.

Both apps call these with the same configuration, so the server and every client build the same base
model, the same held-out split and disjoint shares without exchanging anything but the configuration.
Results are cached per process: a simulation worker serves many clients and many rounds.
"""

from __future__ import annotations

import functools

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pollinate import models
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, Fields, load_dataset, partition, split_heldout
from pollinate.methods.plan import ModelDims, model_dims


def _fields(cfg: RunConfig) -> Fields:
    f = cfg.data
    return Fields(prompt=f.prompt, response=f.response, text=f.text, label=f.label,
                  category=f.category)


@functools.lru_cache(maxsize=4)
def splits(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    """(training pool, the split the server evaluates on); neither split reaches a client.

    With ``eval-split = "validation"`` the evaluated split is a slice of ``eval-examples`` drawn from
    what would be the training pool, so the held-out split stays unseen while settings are tuned.
    """
    ds = load_dataset(cfg.dataset_name, cfg.task, _fields(cfg))
    train, heldout = split_heldout(ds, cfg.eval_examples, cfg.seed)
    if cfg.eval_split == "validation":
        return split_heldout(train, cfg.eval_examples, cfg.seed + 2)  # its own draw, as the calibration's
    return train, heldout


@functools.lru_cache(maxsize=4)
def pools(cfg: RunConfig, reserved: int = 0) -> tuple[Dataset, Dataset]:
    """(the server's calibration slice of ``reserved`` examples, the rest of the training pool).

    The slice is drawn with the run's seed; no client holds it and it is disjoint from the held-out split.
    """
    train, _ = splits(cfg)
    if reserved >= len(train):
        raise ValueError(f"fedsb.init-examples: {reserved} is not allowed; the training pool has "
                         f"{len(train)} examples and the clients need some: use fewer")
    if reserved == 0:
        return train.select([]), train
    rest, calibration = split_heldout(train, reserved, cfg.seed + 1)  # its own draw, not the held-out one
    return calibration, rest


@functools.lru_cache(maxsize=4)
def shares(cfg: RunConfig, reserved: int = 0) -> list[Dataset]:
    """Every client's share of the training pool (less ``reserved`` calibration examples)."""
    _, pool = pools(cfg, reserved)
    return partition(pool, cfg.partitioner, cfg.num_clients, cfg.seed, cfg.dirichlet_alpha,
                     by=cfg.partition_by)


def num_labels(cfg: RunConfig) -> int:
    """Classes of a classification task (0 for generation)."""
    if cfg.task != CLASSIFICATION:
        return 0
    return len(splits(cfg)[0].features["label"].names)


@functools.lru_cache(maxsize=8)
def dims(cfg: RunConfig, table: str) -> ModelDims:
    """The model's shapes (no weights loaded) with the targets of settings table ``table``."""
    config = models.model_config(cfg.model, cfg.task, max(num_labels(cfg), 2))
    targets = getattr(cfg, table).target_list(str(getattr(config, "model_type", "")))
    return model_dims(config, targets, name=cfg.model, key=f"{table}.targets")


def base_model(cfg: RunConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh copy of the frozen base model and its tokenizer (identical in every process)."""
    return models.load_model(cfg.model, cfg.task, num_labels=max(num_labels(cfg), 2), seed=cfg.seed)


def round_seed(cfg: RunConfig, server_round: int, client: int = -1) -> int:
    """A seed of its own for each (round, client): data order, fresh adapters."""
    return (cfg.seed * 1_000_003 + server_round * 10_007 + client) % 2**31
