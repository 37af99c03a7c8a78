"""Data loaders and federated partitioning (no Flower imports)."""

from flwr_analytic.data.batches import IMAGE_KEYS, LABEL_KEYS, LoaderData, iter_batches
from flwr_analytic.data.dataset import ArrayDataset
from flwr_analytic.data.loaders import (
    DATASETS,
    DatasetNotFoundError,
    from_hf_dataset,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_hub,
    load_mnist,
)
from flwr_analytic.data.partition import (
    PARTITIONERS,
    FederatedSplit,
    federated_split,
    partition_indices,
    precomputed_split,
    train_test_indices,
)

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "ArrayDataset",
    "LoaderData",
    "iter_batches",
    "DATASETS",
    "DatasetNotFoundError",
    "FederatedSplit",
    "PARTITIONERS",
    "federated_split",
    "from_hf_dataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_hub",
    "load_mnist",
    "partition_indices",
    "precomputed_split",
    "train_test_indices",
]
