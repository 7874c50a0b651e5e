"""What a run trains on, derived from its RunConfig: the base model, the held-out split, each share.

Both apps call these with the same configuration, so the server and every client build the same base
model, the same held-out split and disjoint shares without exchanging anything but the configuration.
Results are cached per process: a simulation worker serves many clients and many rounds.
"""

from __future__ import annotations

import dataclasses
import functools

from datasets import ClassLabel, Dataset
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

    The evaluated split is ``eval-examples`` drawn from the dataset, or every row of ``eval-dataset``
    (the server's own file, its labels mapped onto the dataset's).

    With ``eval-split = "validation"`` the evaluated split is a slice of ``eval-examples`` drawn from
    what would be the training pool, so the held-out split stays unseen while settings are tuned.
    """
    ds = load_dataset(cfg.dataset_name, cfg.task, _fields(cfg))
    if cfg.eval_dataset:  # the server's own held-out file: the whole dataset is the training pool
        train = ds
        try:
            heldout = load_dataset(cfg.eval_dataset, cfg.task, _fields(cfg))
        except ValueError as error:
            raise ValueError(f"eval-dataset: {str(error).partition(': ')[2]}") from None
        if cfg.task == CLASSIFICATION:
            heldout = with_labels(heldout, ds.features["label"].names, "eval-dataset", cfg.eval_dataset)
    else:
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


def client_split(cfg: RunConfig, share: Dataset) -> tuple[Dataset, Dataset]:
    """(what a node trains on, what it evaluates on) of its share or its own file.

    With ``eval-split = "clients"`` the node holds back ``eval-fraction`` of its data (at least one
    example, drawn with the run's seed) and never trains on it; otherwise it trains on all of it and
    evaluates on all of it (federated evaluation is then only a diagnostic of the training data).
    """
    if cfg.eval_split != "clients":
        return share, share
    if len(share) < 2:
        raise ValueError(f"eval-split: 'clients' needs at least 2 examples on every node (one to train on, "
                         f"one to evaluate on); this node has {len(share)}")
    held = min(max(1, round(cfg.eval_fraction * len(share))), len(share) - 1)
    return split_heldout(share, held, cfg.seed + 3)  # its own draw, as the validation slice's


def device_share(cfg: RunConfig, path: str, fields: dict[str, str]) -> Dataset:
    """A device's own data file, read with the run's field names (``fields`` overriding some), as a
    share. For classification its labels become the run's: each must be one of the run's label names,
    or an index into them (ValueError naming the first that is neither)."""
    try:
        read = load_dataset(path, cfg.task, dataclasses.replace(_fields(cfg), **fields))
    except ValueError as error:  # name the node-config keys a device sets, not the run's
        key, _, rest = str(error).partition(": ")
        node_key = "data-path" if key == "dataset" else key.removeprefix("data.")
        raise ValueError(f"{node_key}: {rest}") from None
    if cfg.task != CLASSIFICATION:
        return read
    return with_labels(read, splits(cfg)[0].features["label"].names, "data-path", path)


def with_labels(read: Dataset, names: list[str], key: str, path: str) -> Dataset:
    """A classification file's rows with the run's labels: each of its labels must be one of ``names``
    or an index into them (ValueError naming ``key`` and the first that is neither)."""
    index = {n: i for i, n in enumerate(names)}
    mapped = []
    for name in read.features["label"].names:
        if name in index:
            mapped.append(index[name])
        elif name.lstrip("+-").isdigit() and 0 <= int(name) < len(names):
            mapped.append(int(name))
        else:
            raise ValueError(f"{key}: {path!r} has the label {name!r}, which is not one of the run's "
                             f"labels ({', '.join(names)}) nor an index 0..{len(names) - 1} into them")
    labels = [mapped[i] for i in read["label"]]
    return read.remove_columns("label").add_column("label", labels).cast_column(
        "label", ClassLabel(names=list(names)))


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
