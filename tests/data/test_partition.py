"""Tests for pollinate.data.partition: determinism, disjointness, completeness, errors."""

from __future__ import annotations

from collections import Counter

import pytest
from datasets import ClassLabel, Dataset, Features, Value

from pollinate.data import PARTITIONERS, partition, split_heldout

NUM_ROWS = 120
CATEGORIES = ["a", "b", "c", "d", "e", "f", "g"]


def _dataset(num_rows: int = NUM_ROWS) -> Dataset:
    """Rows with a unique id, a skewed category (a is the biggest) and a binary label."""
    categories = [CATEGORIES[min(i % 10, len(CATEGORIES) - 1)] for i in range(num_rows)]
    features = Features(
        {"id": Value("int64"), "category": Value("string"), "label": ClassLabel(names=["n", "p"])}
    )
    data = {
        "id": list(range(num_rows)),
        "category": categories,
        "label": [i % 2 for i in range(num_rows)],
    }
    return Dataset.from_dict(data, features=features)


def _ids(parts: list[Dataset]) -> list[list[int]]:
    return [list(part["id"]) for part in parts]


def _by(partitioner: str) -> str:
    return "label" if partitioner == "dirichlet" else "category"


# --------------------------------------------------------------------------- held-out split


def test_heldout_is_disjoint_complete_and_seeded() -> None:
    ds = _dataset()
    train, heldout = split_heldout(ds, 20, seed=0)
    assert len(heldout) == 20 and len(train) == NUM_ROWS - 20
    assert sorted([*train["id"], *heldout["id"]]) == list(range(NUM_ROWS))
    assert train.features == ds.features
    again = split_heldout(ds, 20, seed=0)
    assert list(again[1]["id"]) == list(heldout["id"])
    assert list(split_heldout(ds, 20, seed=1)[1]["id"]) != list(heldout["id"])


@pytest.mark.parametrize("eval_examples", [0, -3, NUM_ROWS, NUM_ROWS + 1, 2.5])
def test_heldout_size_out_of_range(eval_examples: int) -> None:
    with pytest.raises(ValueError, match=rf"^eval-examples: {eval_examples} .*1\.\.{NUM_ROWS - 1}"):
        split_heldout(_dataset(), eval_examples, seed=0)


# --------------------------------------------------------------------------- every partitioner


@pytest.mark.parametrize("partitioner", PARTITIONERS)
@pytest.mark.parametrize("num_partitions", [1, 3, 7])
def test_disjoint_complete_nonempty(partitioner: str, num_partitions: int) -> None:
    ds = _dataset()
    parts = partition(ds, partitioner, num_partitions, seed=0, by=_by(partitioner))
    ids = _ids(parts)
    assert len(parts) == num_partitions
    assert all(ids)
    assert sorted(i for rows in ids for i in rows) == list(range(NUM_ROWS))
    assert all(part.features == ds.features for part in parts)


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_same_seed_same_partitions(partitioner: str) -> None:
    ds = _dataset()
    first = _ids(partition(ds, partitioner, 4, seed=7, by=_by(partitioner)))
    assert _ids(partition(ds, partitioner, 4, seed=7, by=_by(partitioner))) == first


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_different_seed_different_partitions(partitioner: str) -> None:
    ds = _dataset()
    first = _ids(partition(ds, partitioner, 4, seed=7, by=_by(partitioner)))
    assert _ids(partition(ds, partitioner, 4, seed=8, by=_by(partitioner))) != first


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(part) for part in partition(_dataset(), "iid", 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------- natural


@pytest.mark.parametrize("num_partitions", [2, 3, 7])
def test_natural_keeps_each_category_on_one_client(num_partitions: int) -> None:
    parts = partition(_dataset(), "natural", num_partitions, seed=0)
    owners = Counter(c for part in parts for c in set(part["category"]))
    assert set(owners) == set(CATEGORIES)
    assert set(owners.values()) == {1}


def test_natural_deals_largest_category_first() -> None:
    # Category g holds 48 rows (i % 10 in 6..9); the other six 12 rows each.
    parts = partition(_dataset(), "natural", 3, seed=0)
    assert [sorted(set(part["category"])) for part in parts] == [
        ["g"],
        ["a", "c", "e"],
        ["b", "d", "f"],
    ]
    assert [len(part) for part in parts] == [48, 36, 36]


def test_natural_more_clients_than_categories() -> None:
    with pytest.raises(ValueError, match=r"^partitioner: 'natural' .*7 values .* 8 clients"):
        partition(_dataset(), "natural", 8, seed=0)


def test_natural_on_labels() -> None:
    parts = partition(_dataset(), "natural", 2, seed=0, by="label")
    assert [set(part["label"]) for part in parts] == [{0}, {1}]


# --------------------------------------------------------------------------- dirichlet


def test_dirichlet_small_alpha_is_skewed() -> None:
    ds = _dataset(1000)
    parts = partition(ds, "dirichlet", 4, seed=0, alpha=0.05, by="label")
    shares = [Counter(part["label"])[0] / len(part) for part in parts]
    assert max(shares) - min(shares) > 0.5


def test_dirichlet_never_leaves_a_client_empty() -> None:
    # As many clients as rows and a tiny alpha: flwr-datasets cannot meet min size 1.
    ds = _dataset(12)
    parts = partition(ds, "dirichlet", 12, seed=3, alpha=0.01, by="category")
    assert [len(part) for part in parts] == [1] * 12
    assert sorted(i for rows in _ids(parts) for i in rows) == list(range(12))


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_alpha_must_be_positive(alpha: float) -> None:
    with pytest.raises(ValueError, match=rf"^dirichlet-alpha: {alpha} .*> 0"):
        partition(_dataset(), "dirichlet", 3, seed=0, alpha=alpha, by="label")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("num_partitions", [0, -1, 2.5, True])
def test_num_clients_not_positive(num_partitions: int) -> None:
    with pytest.raises(ValueError, match=rf"^num-clients: {num_partitions} .*1\.\.{NUM_ROWS}"):
        partition(_dataset(), "iid", num_partitions, seed=0)


def test_num_clients_more_than_examples() -> None:
    message = r"^num-clients: 50 is more than the 40 training examples; allowed: 1\.\.40$"
    with pytest.raises(ValueError, match=message):
        partition(_dataset(40), "iid", 50, seed=0)


def test_unknown_partitioner() -> None:
    with pytest.raises(ValueError, match=r"^partitioner: 'shards' .*iid, dirichlet, natural"):
        partition(_dataset(), "shards", 3, seed=0)


def test_unknown_column() -> None:
    with pytest.raises(ValueError, match=r"^by: 'topic' .*columns: id, category, label"):
        partition(_dataset(), "natural", 3, seed=0, by="topic")
