"""Data for pollinate: offline built-in datasets, client partitions and tokenization.

This package imports torch, transformers, datasets and flwr-datasets only, never Flower.
"""

from pollinate.catalog import (
    BUILTIN_DATASETS,
    CLASSIFICATION,
    GENERATION,
    PARTITIONERS,
    TASKS,
    default_dataset,
)
from pollinate.data.datasets import Fields, load_dataset
from pollinate.data.partition import partition, split_heldout
from pollinate.data.tokenize import (
    IGNORE_INDEX,
    collate,
    encode_classification,
    encode_dataset,
    encode_generation,
    encode_prompt,
)

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
