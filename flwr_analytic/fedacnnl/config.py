"""Run configuration of the FedACnnL app and the default per-node data loader.

Every key is kebab-case, as in ``[tool.flwr.app.config]`` of ``apps/fedacnnl/pyproject.toml``; a
node's partition comes from its node config (``partition-id``, ``num-partitions``), which Flower's
simulation sets automatically and a real SuperNode receives via ``--node-config``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from flwr.app import Context

from flwr_analytic.data import ArrayDataset, FederatedSplit, federated_split, load_dataset
from flwr_analytic.models import Architecture, get_architecture

#: Defaults of every run-config key (``flwr run --run-config`` overrides them).
DEFAULT_RUN_CONFIG: dict[str, Any] = {
    # rounds: 0 = one per layer that needs statistics (the only meaningful value)
    "num-server-rounds": 0,
    # data: dataset name (digits | mnist | fashion-mnist | cifar10 | hub:<repo>) and local path
    "dataset": "digits",
    "data-path": "",
    "data-split": "train",
    # partitioner: iid | dirichlet | pathological | precomputed (the split stored in the .npz)
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.1,
    "classes-per-partition": 2,
    "min-partition-size": 0,
    "test-fraction": 0.25,
    # model: linear | mlp | lenet5 | cnn; cnn-channels / cnn-dense as "32,64" (empty: defaults)
    "model": "cnn",
    "cnn-channels": "",
    "cnn-dense": "",
    "mlp-hidden": 0,
    # analytic learning: hidden target scheme, γ (output ridge), hidden ridge, λ (pFedACnnL)
    "scheme": "label-pca",
    "gamma": 1e-6,
    "hidden-gamma": 1e-2,
    "gamma-rule": "relative",
    "lam": 0.1,
    "lam-rule": "relative",
    "personalize-layers": "last",
    "seed": 0,
    "dtype": "float64",
    "batch-size": 256,
    # sampling and timeouts
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-nodes": 2,
    "round-timeout": 3600.0,
    # group-wise output layers: clients clustered by label distribution (0 = one global model)
    "num-groups": 0,
    # server-side evaluation of the global model on the pooled client test sets (evaluate_fn)
    "centralized-eval": False,
    # client: torch threads per ClientApp call (1 under Ray: one core per client)
    "client-threads": 1,
    # where the JSON with per-round and evaluation metrics goes ("" = do not write)
    "results-path": "fedacnnl_results.json",
    # where the final model's state_dict goes (torch.save; "" = do not write)
    "model-path": "",
}

#: ``(C, H, W)`` and number of classes of the named data sets (so the server need not load data).
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


def resolve_run_config(run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overridden by ``run_config``; unknown keys raise ``KeyError``."""
    cfg = dict(DEFAULT_RUN_CONFIG)
    for key, value in dict(run_config or {}).items():
        if key not in DEFAULT_RUN_CONFIG:
            raise KeyError(
                f"unknown run-config key {key!r}; known: {', '.join(DEFAULT_RUN_CONFIG)}"
            )
        cfg[key] = value
    return cfg


def _ints(text: Any) -> tuple[int, ...]:
    return tuple(int(t) for t in str(text).replace(" ", "").split(",") if t)


def architecture_for(cfg: Mapping[str, Any]) -> Architecture:
    """The model of the run config (input shape from :data:`DATASET_SHAPES` or the data itself)."""
    name = str(cfg["dataset"])
    if name in DATASET_SHAPES:
        shape, classes = DATASET_SHAPES[name]
    else:
        data = load_cached_dataset(name, str(cfg["data-path"]), str(cfg["data-split"]))
        shape, classes = data.input_shape, data.num_classes
    kwargs: dict[str, Any] = {}
    if cfg["model"] == "cnn":
        if _ints(cfg["cnn-channels"]):
            kwargs["channels"] = _ints(cfg["cnn-channels"])
        kwargs["dense"] = _ints(cfg["cnn-dense"])
    if cfg["model"] == "mlp" and int(cfg["mlp-hidden"]) > 0:
        kwargs["hidden"] = int(cfg["mlp-hidden"])
    return get_architecture(str(cfg["model"]), shape, classes, **kwargs)


@functools.lru_cache(maxsize=2)
def load_cached_dataset(name: str, path: str, split: str) -> ArrayDataset:
    """:func:`~flwr_analytic.data.load_dataset`, cached per process (two data sets at most)."""
    return load_dataset(name, path or None, split)


@functools.lru_cache(maxsize=4)
def _split(
    name: str,
    path: str,
    split: str,
    num_partitions: int,
    method: str,
    alpha: float,
    classes_per_partition: int,
    min_partition_size: int,
    test_fraction: float,
    seed: int,
) -> FederatedSplit:
    data = load_cached_dataset(name, path, split)
    result = federated_split(
        data,
        num_partitions,
        method,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        min_partition_size=min_partition_size,
        test_fraction=test_fraction,
        seed=seed,
    )
    if result.num_clients != num_partitions:
        raise ValueError(
            f"the {method!r} split of {name} has {result.num_clients} clients but the federation "
            f"has num-partitions={num_partitions}"
        )
    return result


def split_from_config(cfg: Mapping[str, Any], num_partitions: int) -> FederatedSplit:
    """The :class:`FederatedSplit` that the run config describes (cached per process)."""
    cfg = resolve_run_config(cfg)
    return _split(
        str(cfg["dataset"]),
        str(cfg["data-path"]),
        str(cfg["data-split"]) if cfg["partitioner"] != "precomputed" else "all",
        int(num_partitions),
        str(cfg["partitioner"]),
        float(cfg["dirichlet-alpha"]),
        int(cfg["classes-per-partition"]),
        int(cfg["min-partition-size"]),
        float(cfg["test-fraction"]),
        int(cfg["seed"]),
    )


def load_partition_from_config(context: Context) -> tuple[ArrayDataset, ArrayDataset]:
    """Default loader: this node's ``(train, test)`` from the run config and node config.

    Every node loads the data set, partitions it with the seeded partitioner of the run config into
    ``num-partitions`` parts and keeps part ``partition-id`` (``precomputed`` uses the split stored
    with the data, e.g. the 20-client Dirichlet(0.1) split of ``mnist70k.npz``).
    """
    cfg = resolve_run_config(context.run_config)
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise KeyError(
            "node config needs 'partition-id' and 'num-partitions' (set by the simulation, or "
            '`flower-supernode --node-config "partition-id=0 num-partitions=3"`)'
        )
    split = split_from_config(cfg, int(node["num-partitions"]))
    name = str(cfg["dataset"])
    data_split = str(cfg["data-split"]) if cfg["partitioner"] != "precomputed" else "all"
    return split.client(
        load_cached_dataset(name, str(cfg["data-path"]), data_split), int(node["partition-id"])
    )
