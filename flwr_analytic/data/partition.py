"""Federated partitioning on in-memory data with flwr-datasets partitioners.

A partition is a list of index arrays into an :class:`ArrayDataset`, one per client, and a
:class:`FederatedSplit` adds each client's train/test split (75/25 by default, the PFLlib convention).
All randomness is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict, Unpack

import numpy as np

from flwr_analytic.data.dataset import ArrayDataset

PARTITIONERS = ("iid", "dirichlet", "pathological", "precomputed")


@dataclass(frozen=True)
class FederatedSplit:
    """Per-client train and test indices into one :class:`ArrayDataset`.

    Attributes
    ----------
    train, test : list[numpy.ndarray]
        ``train[k]`` / ``test[k]``: sorted ``int64`` indices of client ``k``'s training / test rows.

    """

    train: list[np.ndarray]
    test: list[np.ndarray]

    @property
    def num_clients(self) -> int:
        """Number of clients ``K``."""
        return len(self.train)

    def client(self, dataset: ArrayDataset, k: int) -> tuple[ArrayDataset, ArrayDataset]:
        """Client ``k``'s ``(train, test)`` data sets."""
        if not 0 <= k < self.num_clients:
            raise IndexError(f"client {k} out of range 0..{self.num_clients - 1}")
        return dataset.subset(self.train[k]), dataset.subset(self.test[k])


class PartitionOptions(TypedDict, total=False):
    """Partitioner settings of :func:`partition_indices` passed on by :func:`federated_split`.

    Attributes
    ----------
    alpha : float
        Dirichlet concentration (default 0.1).
    classes_per_partition : int
        Classes per client of the pathological partitioner (default 2).
    min_partition_size : int
        Dirichlet only: the smallest client (default 0).

    """

    alpha: float
    classes_per_partition: int
    min_partition_size: int


def _labels_dataset(labels: np.ndarray, order: np.ndarray | None = None):  # noqa: ANN202
    from datasets import Dataset

    index = np.arange(len(labels)) if order is None else order
    return Dataset.from_dict({"label": labels[index].tolist(), "index": index.tolist()})


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    method: str = "iid",
    *,
    alpha: float = 0.1,
    classes_per_partition: int = 2,
    min_partition_size: int = 0,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split row indices among ``num_partitions`` clients with a flwr-datasets partitioner.

    Parameters
    ----------
    labels : numpy.ndarray
        Class label of every row.
    num_partitions : int
        Number of clients ``K``.
    method : {"iid", "dirichlet", "pathological"}
        ``iid``: :class:`~flwr_datasets.partitioner.IidPartitioner` on a seeded shuffle;
        ``dirichlet``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` (class proportions per
        client ~ Dir(``alpha``)); ``pathological``:
        :class:`~flwr_datasets.partitioner.PathologicalPartitioner` (``classes_per_partition``
        classes per client).
    alpha : float
        Dirichlet concentration; smaller is more heterogeneous.
    classes_per_partition : int
        Classes per client for ``pathological``.
    min_partition_size : int
        Dirichlet only: resample until every client has at least this many rows.
    seed : int
        Seed of every random choice.

    Returns
    -------
    list[numpy.ndarray]
        Sorted ``int64`` row indices of each client; together a partition of ``range(len(labels))``.

    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    labels = np.asarray(labels)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ValueError(f"num_partitions={num_partitions} exceeds the {len(labels)} rows of data")
    if method == "iid":
        order = np.random.default_rng(seed).permutation(len(labels))
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = _labels_dataset(labels, order)
    elif method == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = _labels_dataset(labels)
    elif method == "pathological":
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="random",
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = _labels_dataset(labels)
    else:
        raise ValueError(f"unknown partitioner {method!r}; allowed: iid, dirichlet, pathological")
    try:
        return [
            np.sort(np.asarray(partitioner.load_partition(k)["index"], dtype=np.int64))
            for k in range(num_partitions)
        ]
    except ValueError as exc:
        if method != "dirichlet" or "attempts" not in str(exc):
            raise
        raise ValueError(
            f"Dirichlet(alpha={alpha}) could not give each of the {num_partitions} partitions at "
            f"least min-partition-size={min_partition_size} of the {len(labels)} rows "
            f"(flwr-datasets: {exc}); lower min-partition-size, raise dirichlet-alpha or use "
            "fewer partitions"
        ) from exc


def train_test_indices(
    index: np.ndarray, test_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of one client's rows: ``ceil(test_fraction * n)`` test rows, the rest train."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    index = np.asarray(index, dtype=np.int64)
    n_test = int(np.ceil(test_fraction * len(index)))
    perm = np.random.default_rng(seed).permutation(len(index))
    return np.sort(index[perm[n_test:]]), np.sort(index[perm[:n_test]])


def federated_split(
    dataset: ArrayDataset,
    num_clients: int,
    method: str = "dirichlet",
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    strict: bool = False,
    **options: Unpack[PartitionOptions],
) -> FederatedSplit:
    """Partition ``dataset`` among clients and split each client 75/25 (by default) into train/test.

    ``method="precomputed"`` uses the split stored with the data (``extras["client"]`` and
    ``extras["is_test"]``, as in ``mnist70k.npz``: 20 clients, Dirichlet(0.1), PFLlib) and ignores
    the other parameters.

    Parameters
    ----------
    dataset : ArrayDataset
        The data to split.
    num_clients : int
        Number of clients ``K``.
    method : {"dirichlet", "iid", "pathological", "precomputed"}
        The partitioner (see :func:`partition_indices`).
    test_fraction : float
        Share of every client's rows held out for testing.
    seed : int
        Seed of the partition; client ``k``'s train/test split uses ``seed + k``.
    strict : bool (default: False)
        Raise ``ValueError`` unless there are exactly ``num_clients`` clients, as a federation of
        ``num_clients`` nodes needs (a ``precomputed`` split has its own number).
    **options : PartitionOptions
        ``alpha``, ``classes_per_partition``, ``min_partition_size``: as in
        :func:`partition_indices`.

    Returns
    -------
    FederatedSplit
        Every client's train and test indices.

    """
    if method == "precomputed":
        split = precomputed_split(dataset)
    else:
        parts = partition_indices(dataset.y, num_clients, method, seed=seed, **options)
        pairs = [train_test_indices(p, test_fraction, seed + k) for k, p in enumerate(parts)]
        split = FederatedSplit(train=[a for a, _ in pairs], test=[b for _, b in pairs])
    if strict and split.num_clients != num_clients:
        raise ValueError(
            f"the {method!r} split of {dataset.name} has {split.num_clients} clients but the "
            f"federation has num-partitions={num_clients}"
        )
    return split


def precomputed_split(dataset: ArrayDataset) -> FederatedSplit:
    """The client split shipped with the data (``extras["client"]``, ``extras["is_test"]``)."""
    missing = {"client", "is_test"} - set(dataset.extras)
    if missing:
        raise ValueError(
            f"{dataset.name} has no precomputed split (missing {sorted(missing)}); load the .npz "
            "with split='all' or use another partitioner"
        )
    client = dataset.extras["client"].astype(np.int64)
    is_test = dataset.extras["is_test"].astype(bool)
    ids = np.unique(client)
    train = [np.flatnonzero((client == k) & ~is_test) for k in ids]
    test = [np.flatnonzero((client == k) & is_test) for k in ids]
    return FederatedSplit(train=train, test=test)
