"""Data, model and seeding shared by the meta clients, server and benchmarks (no Flower imports)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flwr_analytic.data import ArrayDataset, FederatedSplit, federated_split, load_dataset
from flwr_analytic.models import build_module, get_architecture

#: ``(input_shape, num_classes)`` of the named data sets, known without loading them: the one table
#: of both apps (the FedACnnL server builds its model from it; ``hub:`` data sets are loaded).
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}
#: The old name of :data:`DATASET_SHAPES` (the same object).
DATASET_INFO = DATASET_SHAPES


@lru_cache(maxsize=4)
def load_federation(
    dataset: str,
    partitioner: str,
    num_partitions: int,
    dirichlet_alpha: float = 0.1,
    min_partition_size: int = 0,
    test_fraction: float = 0.25,
    seed: int = 0,
    data_split: str = "train",
) -> tuple[ArrayDataset, FederatedSplit]:
    """Load ``dataset`` and split it among ``num_partitions`` clients (cached per process).

    ``data_split`` is the split of the data set that is partitioned (``"all"`` for data with no
    official split, e.g. ``cifar10_20k.npz``). ``partitioner="precomputed"`` loads all rows
    (``split="all"``) and uses the split stored with the data (20 clients, Dirichlet(0.1) for
    ``mnist70k.npz``).
    """
    split = "all" if partitioner == "precomputed" else data_split
    ds = load_dataset(dataset, split=split)
    fed = federated_split(
        ds,
        num_partitions,
        partitioner,
        alpha=dirichlet_alpha,
        min_partition_size=min_partition_size,
        test_fraction=test_fraction,
        seed=seed,
        strict=True,
    )
    return ds, fed


def client_tensors(
    cfg: Mapping[str, Any], partition_id: int, num_partitions: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of client ``partition_id`` as torch tensors.

    ``cfg`` is a resolved run config (:func:`flwr_analytic.meta.config.resolve_run_config`).
    """
    ds, fed = load_federation(
        str(cfg["dataset"]),
        str(cfg["partitioner"]),
        int(num_partitions),
        float(cfg["dirichlet-alpha"]),
        int(cfg["min-partition-size"]),
        float(cfg["test-fraction"]),
        int(cfg["seed"]),
        str(cfg.get("data-split", "train")),
    )
    train, test = fed.client(ds, int(partition_id))
    return (
        torch.from_numpy(train.x),
        torch.from_numpy(train.y),
        torch.from_numpy(test.x),
        torch.from_numpy(test.y),
    )


def build_model(cfg: Mapping[str, Any], seed: int | None = None) -> nn.Module:
    """Build the run's model ``cfg["model"]`` for ``cfg["dataset"]`` (seeded if ``seed`` is set)."""
    shape, classes = DATASET_SHAPES[str(cfg["dataset"])]
    if seed is not None:
        torch.manual_seed(seed)
    return build_module(get_architecture(str(cfg["model"]), shape, classes))


def round_rng(seed: int, partition_id: int, server_round: int, stream: int) -> np.random.Generator:
    """Return the generator of one client in one round (``stream`` 0: training, 1: evaluation)."""
    return np.random.default_rng([int(seed), int(partition_id), int(server_round), int(stream)])
