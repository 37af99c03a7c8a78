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

from flwr_analytic.config_checks import ConfigError, check_choice, check_keys, check_number
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
    # client: keep the personalized layers' statistics in context.state for the evaluation round
    # (false: recompute them there; a kept D=1601 head is 10 MB per node, held by the simulation)
    "keep-statistics": True,
    # server: "sorted" (hold every reply, sum in partition-id order: bit-reproducible) or
    # "streaming" (add each reply as it arrives: memory O(D^2) for any number of clients)
    "aggregation": "sorted",
    # streaming only: push at most this many messages at a time (0 = all at once); bounds the
    # replies waiting at the SuperLink (1000 clients: 5.3 GiB peak with 64, 11.6 GiB with all)
    "max-in-flight": 64,
    # differential privacy of each client's statistics (0 = off): Gaussian noise σ = z·Δ per layer,
    # design rows [a, 1] clipped to norm dp-clip-norm (> 1), target rows to dp-target-bound;
    # dp-seed -1 = OS entropy (a fixed seed reproduces the noise and must be kept from the server)
    "dp-noise-multiplier": 0.0,
    "dp-clip-norm": 0.0,
    "dp-target-bound": 1.0,
    "dp-seed": -1,
    # where the JSON with per-round and evaluation metrics goes ("" = do not write)
    "results-path": "fedacnnl_results.json",
    # where the final model's state_dict goes (torch.save; "" = do not write)
    "model-path": "",
    # server checkpoint (.npz) written after every solved layer: solved layers, their summed
    # statistics (used to add/remove clients later), history; a restarted run with the same
    # configuration resumes at the next layer ("" = no checkpoint)
    "checkpoint-path": "",
}

#: ``(C, H, W)`` and number of classes of the named data sets (so the server need not load data).
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


def resolve_run_config(run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overridden by ``run_config``, checked by :func:`check_run_config`.

    Raises
    ------
    flwr_analytic.config_checks.UnknownKeyError
        (a ``KeyError``) for a key not in :data:`DEFAULT_RUN_CONFIG`, naming the closest known key
        (a likely typo: ``gama`` -> ``gamma``).
    flwr_analytic.config_checks.ConfigError
        (a ``ValueError``) for a value that is not allowed, naming the key and the allowed values.

    """
    given = dict(run_config or {})
    check_keys(given, DEFAULT_RUN_CONFIG, "run-config")
    cfg = {**DEFAULT_RUN_CONFIG, **given}
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: Mapping[str, Any]) -> None:
    """Fail at start on a value that cannot work, naming the key and the allowed values.

    Ridges ``gamma``, ``hidden-gamma`` >= 0 and λ ``lam`` > 0 (Gu et al., arXiv 2502.06915: ``W =
    (ΣG + γI)⁻¹ΣB``, ``W_k = (G_k + λI)⁻¹(B_k + λW)``), their rules, the dataset, partitioner, model,
    scheme, dtype, fractions, sizes and counts. (Whether there are more clients than samples is
    known once the data is loaded: :func:`split_from_config`.)
    """
    from flwr_analytic.analytic.solvers import RULES
    from flwr_analytic.analytic.targets import SCHEMES
    from flwr_analytic.data import DATASETS, PARTITIONERS
    from flwr_analytic.data.loaders import SPLITS
    from flwr_analytic.models.architectures import ARCHITECTURES

    name = cfg["dataset"]
    if not (isinstance(name, str) and name.startswith("hub:") and len(name) > 4):
        check_choice("dataset", name, [*DATASETS, "hub:<repo id>"])
    check_choice("data-split", cfg["data-split"], SPLITS)
    check_choice("partitioner", cfg["partitioner"], PARTITIONERS)
    check_choice("model", cfg["model"], ARCHITECTURES)
    check_choice("scheme", cfg["scheme"], SCHEMES)
    check_choice("gamma-rule", cfg["gamma-rule"], RULES)
    check_choice("lam-rule", cfg["lam-rule"], RULES)
    check_choice("personalize-layers", cfg["personalize-layers"], ("last", "all"))
    check_choice("dtype", cfg["dtype"], ("float64", "float32"))
    check_number("gamma", cfg["gamma"], low=0.0)
    check_number("hidden-gamma", cfg["hidden-gamma"], low=0.0)
    check_number("lam", cfg["lam"], low=0.0, low_open=True)
    check_number("dirichlet-alpha", cfg["dirichlet-alpha"], low=0.0, low_open=True)
    check_number("test-fraction", cfg["test-fraction"], low=0.0, high=1.0, high_open=True)
    check_number("fraction-train", cfg["fraction-train"], low=0.0, high=1.0, low_open=True)
    check_number("fraction-evaluate", cfg["fraction-evaluate"], low=0.0, high=1.0)
    check_number("round-timeout", cfg["round-timeout"], low=0.0, low_open=True)
    for key, low in (
        ("num-server-rounds", 0),
        ("classes-per-partition", 1),
        ("min-partition-size", 0),
        ("mlp-hidden", 0),
        ("seed", 0),
        ("batch-size", 1),
        ("min-nodes", 1),
        ("num-groups", 0),
        ("client-threads", 0),
    ):
        check_number(key, cfg[key], low=low, integer=True)
    for key in ("cnn-channels", "cnn-dense"):
        try:
            widths = _ints(cfg[key])
        except ValueError:
            widths = (0,)
        if any(w < 1 for w in widths):
            raise ConfigError(
                f"{key}: {cfg[key]!r} is not allowed; must be comma-separated positive integers "
                'like "32,64" (or "" for the default)'
            )


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
    """The :class:`FederatedSplit` that the run config describes (cached per process).

    Raises :class:`~flwr_analytic.config_checks.ConfigError` naming ``num-partitions`` when the
    federation has more clients than the data set has samples.
    """
    cfg = resolve_run_config(cfg)
    check_number("num-partitions", num_partitions, low=1, integer=True)
    if cfg["partitioner"] != "precomputed":
        data = load_cached_dataset(
            str(cfg["dataset"]), str(cfg["data-path"]), str(cfg["data-split"])
        )
        if int(num_partitions) > len(data):
            raise ConfigError(
                f"num-partitions: {num_partitions} clients is not allowed for {cfg['dataset']!r} "
                f"({cfg['data-split']}) with {len(data)} samples; allowed: 1..{len(data)}"
            )
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
