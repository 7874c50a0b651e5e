"""Split a dataset into a held-out set and one training partition per client.

The partitioners are flwr-datasets' (`IidPartitioner`, `DirichletPartitioner`,
`NaturalIdPartitioner`), run on a local `datasets.Dataset` (no hub). Every draw is seeded, so
the same seed always gives the same partitions; partitions are disjoint and their union is
the input.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from typing import Any

import torch
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner
from flwr_datasets.partitioner.partitioner import Partitioner

from pollinate.catalog import PARTITIONERS

# Dirichlet tries this many examples per client first, then 1, then repairs empty clients.
_DIRICHLET_MIN_SIZE = 10
# Columns of the small tables handed to flwr-datasets (never added to the real dataset).
_ROW_COLUMN = "row"
_ORDER_COLUMN = "order"
_CLIENT_COLUMN = "client"


def split_heldout(ds: Dataset, eval_examples: int, seed: int) -> tuple[Dataset, Dataset]:
    """Carve a seeded random held-out set from ``ds``.

    Parameters
    ----------
    ds : Dataset
        The full dataset.
    eval_examples : int
        Size of the held-out set, ``1 <= eval_examples < len(ds)``.
    seed : int
        Seed of the random choice (a CPU `torch.Generator`).

    Returns
    -------
    tuple[Dataset, Dataset]
        ``(train, heldout)``, disjoint, together all of ``ds``; each keeps ``ds``'s row order.
    """
    if not _is_int(eval_examples) or not 1 <= eval_examples < len(ds):
        raise ValueError(
            f"eval-examples: {eval_examples!r} does not fit a dataset of {len(ds)} examples; "
            f"allowed: 1..{len(ds) - 1}"
        )
    order = _permutation(len(ds), seed)
    heldout = sorted(order[:eval_examples])
    train = sorted(order[eval_examples:])
    return ds.select(train), ds.select(heldout)


def partition(
    ds: Dataset,
    partitioner: str,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    by: str = "category",
) -> list[Dataset]:
    """Split ``ds`` into ``num_partitions`` client datasets.

    Parameters
    ----------
    ds : Dataset
        The training data.
    partitioner : str
        ``"iid"`` (seeded shuffle, equal sizes within one), ``"dirichlet"`` (per-value shares
        of column ``by`` drawn from Dirichlet(``alpha``)) or ``"natural"`` (each value of
        ``by`` wholly on one client; values dealt to clients when there are more values
        than clients).
    num_partitions : int
        Number of clients, ``1..len(ds)``.
    seed : int
        Seed of every random draw.
    alpha : float
        Dirichlet concentration (> 0); smaller is more skewed. Only for ``"dirichlet"``.
    by : str
        Column for ``"dirichlet"`` and ``"natural"``: ``"category"`` or ``"label"``.

    Returns
    -------
    list[Dataset]
        One non-empty dataset per client, disjoint, together all of ``ds``.
    """
    if partitioner not in PARTITIONERS:
        raise ValueError(
            f"partitioner: {partitioner!r} is not a partitioner; allowed: {', '.join(PARTITIONERS)}"
        )
    _check_num_partitions(ds, num_partitions)
    if partitioner != "iid" and by not in ds.column_names:
        raise ValueError(
            f"by: {by!r} is not a column of the dataset; columns: {', '.join(ds.column_names)}"
        )
    if partitioner == "iid":
        groups = _iid(ds, num_partitions, seed)
    elif partitioner == "dirichlet":
        groups = _dirichlet(ds, num_partitions, seed, alpha, by)
    else:
        groups = _natural(ds, num_partitions, by)
    return [ds.select(rows) for rows in groups]


def _check_num_partitions(ds: Dataset, num_partitions: int) -> None:
    if not _is_int(num_partitions) or num_partitions < 1:
        raise ValueError(
            f"num-clients: {num_partitions!r} is not a positive integer; allowed: 1..{len(ds)}"
        )
    if num_partitions > len(ds):
        raise ValueError(
            f"num-clients: {num_partitions} is more than the {len(ds)} training examples; "
            f"allowed: 1..{len(ds)}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _permutation(n: int, seed: int) -> list[int]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


def _row_groups(
    partitioner: Partitioner, columns: dict[str, list[Any]], num_partitions: int
) -> list[list[int]]:
    """Run ``partitioner`` on a small table of ``columns`` plus row numbers; rows per client.

    Partitioning a table of just the needed columns keeps the real dataset untouched (no
    index flattening) and tells us exactly which rows each client got.
    """
    num_rows = len(next(iter(columns.values())))
    partitioner.dataset = Dataset.from_dict({**columns, _ROW_COLUMN: list(range(num_rows))})
    # NaturalIdPartitioner draws a tqdm bar on stderr for every call: hide it.
    with contextlib.redirect_stderr(io.StringIO()):
        parts = [partitioner.load_partition(i) for i in range(num_partitions)]
    return [list(part[_ROW_COLUMN]) for part in parts]


def _iid(ds: Dataset, num_partitions: int, seed: int) -> list[list[int]]:
    """Seeded shuffle, then contiguous shards (IidPartitioner itself does not shuffle)."""
    columns = {_ORDER_COLUMN: _permutation(len(ds), seed)}
    groups = _row_groups(IidPartitioner(num_partitions), columns, num_partitions)
    return [[columns[_ORDER_COLUMN][row] for row in rows] for rows in groups]


def _dirichlet(
    ds: Dataset, num_partitions: int, seed: int, alpha: float, by: str
) -> list[list[int]]:
    """Dirichlet(alpha) shares of each value of ``by``, via flwr-datasets.

    flwr-datasets redraws until every client holds ``min_partition_size`` examples and gives
    up after 11 draws. We ask first for ``min(10, len(ds) // num_partitions)`` examples per
    client, then for 1; if even that fails (tiny alpha, many clients), we accept empty
    clients and move one example to each from the largest partition, so no client is empty.
    """
    if isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"dirichlet-alpha: {alpha!r} is not positive; allowed: a number > 0")
    columns = {by: list(ds[by])}
    first = max(1, min(_DIRICHLET_MIN_SIZE, len(ds) // num_partitions))
    for min_size in dict.fromkeys((first, 1, 0)):  # distinct sizes, in this order
        flwr_partitioner = DirichletPartitioner(
            num_partitions, by, float(alpha), min_partition_size=min_size, seed=seed
        )
        try:
            with warnings.catch_warnings():  # flwr-datasets warns on every redraw
                warnings.simplefilter("ignore")
                groups = _row_groups(flwr_partitioner, columns, num_partitions)
        except ValueError:  # "The max number of attempts (10) was reached."
            continue
        return _fill_empty(groups)
    raise AssertionError("min_partition_size=0 always succeeds")


def _fill_empty(groups: list[list[int]]) -> list[list[int]]:
    """Give every empty group the last row of the currently largest one."""
    for empty in [i for i, rows in enumerate(groups) if not rows]:
        largest = max(range(len(groups)), key=lambda i: (len(groups[i]), -i))
        groups[empty].append(groups[largest].pop())
    return groups


def _natural(ds: Dataset, num_partitions: int, by: str) -> list[list[int]]:
    """Each value of ``by`` wholly on one client, via NaturalIdPartitioner.

    With more values than clients, values are dealt largest first (ties by value) to the
    client with the fewest examples so far (ties to the lowest client id).
    """
    values = list(ds[by])
    counts = Counter(values)
    if num_partitions > len(counts):
        raise ValueError(
            f"partitioner: 'natural' needs at least as many values of {by!r} as clients, "
            f"but there are {len(counts)} values of {by!r} and {num_partitions} clients; "
            "allowed: fewer clients, or partitioner iid or dirichlet"
        )
    client_of = _deal(counts, num_partitions)
    columns = {_CLIENT_COLUMN: [client_of[v] for v in values]}
    return _row_groups(NaturalIdPartitioner(_CLIENT_COLUMN), columns, num_partitions)


def _deal(counts: Counter[Any], num_clients: int) -> dict[Any, int]:
    """Client id of each value: largest value first, to the least-loaded client."""
    load = [0] * num_clients
    client_of: dict[Any, int] = {}
    for value, count in sorted(counts.items(), key=lambda item: (-item[1], str(item[0]))):
        client = min(range(num_clients), key=lambda c: (load[c], c))
        client_of[value] = client
        load[client] += count
    return client_of
