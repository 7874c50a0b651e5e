"""Data for pollinate: offline built-in datasets, client partitions and tokenization.

This package imports torch, transformers, datasets and flwr-datasets only, never Flower. The names in
`pollinate.data.catalog` are imported eagerly; the loaders, partitioners and tokenizers on first use, so
that reading a configuration does not pay for datasets and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from pollinate.data.catalog import (
    BUILTIN_DATASETS,
    CLASSIFICATION,
    GENERATION,
    PARTITIONERS,
    TASKS,
    default_dataset,
)

_LAZY = {
    "Fields": "datasets",
    "load_dataset": "datasets",
    "partition": "partition",
    "split_heldout": "partition",
    "IGNORE_INDEX": "tokenize",
    "collate": "tokenize",
    "encode_classification": "tokenize",
    "encode_dataset": "tokenize",
    "encode_generation": "tokenize",
    "encode_prompt": "tokenize",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BUILTIN_DATASETS",
    "CLASSIFICATION",
    "GENERATION",
    "IGNORE_INDEX",
    "PARTITIONERS",
    "TASKS",
    "Fields",
    "collate",
    "default_dataset",
    "encode_classification",
    "encode_dataset",
    "encode_generation",
    "encode_prompt",
    "load_dataset",
    "partition",
    "split_heldout",
]
