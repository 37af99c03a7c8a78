"""Data and model of a FedACnnL run config: the model to build and each node's partition.

The default per-node data loader of the client app (:func:`load_partition_from_config`) and the
server's model (:func:`architecture_for`). The run config's keys are
:data:`flwr_analytic.fedacnnl.config.RUN_CONFIG`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr_analytic.analytic.targets import TargetScheme
from flwr_analytic.config_checks import ConfigError, RunConfig, check_number, int_list
from flwr_analytic.data import ArrayDataset, FederatedSplit, federated_split, load_dataset
from flwr_analytic.fedacnnl.config import DATASET_SHAPES, resolve_run_config
from flwr_analytic.models import Architecture, get_architecture

if TYPE_CHECKING:
    from flwr.app import Context


def architecture_for(cfg: Mapping[str, Any]) -> Architecture:
    """The model of a resolved run config (input shape from ``DATASET_SHAPES`` or the data)."""
    name = str(cfg["dataset"])
    if name in DATASET_SHAPES:
        shape, classes = DATASET_SHAPES[name]
    else:
        data = load_cached_dataset(name, str(cfg["data-path"]), str(cfg["data-split"]))
        shape, classes = data.input_shape, data.num_classes
    kwargs: dict[str, Any] = {}
    if cfg["model"] == "cnn":
        if int_list(cfg["cnn-channels"]):
            kwargs["channels"] = int_list(cfg["cnn-channels"])
        kwargs["dense"] = int_list(cfg["cnn-dense"])
    if cfg["model"] == "mlp" and int(cfg["mlp-hidden"]) > 0:
        kwargs["hidden"] = int(cfg["mlp-hidden"])
    if cfg["model"] == "coates":
        kwargs["grid"] = int(cfg["coates-grid"])
        if int(cfg["coates-filters"]) > 0:
            kwargs["filters"] = int(cfg["coates-filters"])
    try:
        return get_architecture(str(cfg["model"]), shape, classes, **kwargs)
    except ValueError as exc:
        if cfg["model"] != "coates":
            raise
        raise ConfigError(f"coates-grid: {cfg['coates-grid']} on {name!r}: {exc}") from exc


def scheme_for(cfg: Mapping[str, Any]) -> str | TargetScheme:
    """The hidden-layer target scheme of a resolved run config (``zca-*`` with its encoder keys)."""
    name, polarity = str(cfg["scheme"]), bool(cfg["zca-polarity"])
    if not name.startswith("zca-") and not polarity:
        return name
    try:
        return TargetScheme(name, threshold=float(cfg["zca-threshold"]), polarity=polarity)
    except ValueError as exc:
        raise ConfigError(f"zca-polarity: {exc}") from exc


@functools.lru_cache(maxsize=2)
def load_cached_dataset(name: str, path: str, split: str) -> ArrayDataset:
    """:func:`~flwr_analytic.data.load_dataset`, cached per process (two data sets at most)."""
    return load_dataset(name, path or None, split)


def _data_split(cfg: RunConfig) -> str:
    """The split of the data set that is partitioned (``all`` for a precomputed split)."""
    return "all" if cfg["partitioner"] == "precomputed" else str(cfg["data-split"])


@functools.lru_cache(maxsize=4)
def _split(
    name: str, path: str, split: str, num_partitions: int, method: str, **options: Any
) -> FederatedSplit:
    """The strict :func:`federated_split` of data set ``name`` (cached on these primitives)."""
    data = load_cached_dataset(name, path, split)
    return federated_split(data, num_partitions, method, strict=True, **options)


def _federation(cfg: RunConfig, num_partitions: int) -> FederatedSplit:
    """:func:`split_from_config` of a resolved run config."""
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
        _data_split(cfg),
        int(num_partitions),
        str(cfg["partitioner"]),
        **cfg.kwargs("classes-per-partition", "min-partition-size", "test-fraction", "seed"),
        alpha=float(cfg["dirichlet-alpha"]),
    )


def split_from_config(cfg: Mapping[str, Any], num_partitions: int) -> FederatedSplit:
    """The :class:`FederatedSplit` that the run config describes (cached per process).

    ``cfg`` may be a plain run config (it is resolved here) or a resolved one (used as is).
    Raises :class:`~flwr_analytic.config_checks.ConfigError` naming ``num-partitions`` when the
    federation has more clients than the data set has samples.
    """
    return _federation(resolve_run_config(cfg), num_partitions)


def load_partition_from_config(context: Context) -> tuple[ArrayDataset, ArrayDataset]:
    """Default loader: this node's ``(train, test)`` from the run config and node config.

    Every node loads the data set, partitions it with the seeded partitioner of the run config into
    ``num-partitions`` parts and keeps part ``partition-id`` (``precomputed`` uses the split stored
    with the data, e.g. the 20-client Dirichlet(0.1) split of ``mnist70k.npz``). The client app
    hands over a context whose run config it already resolved (used as is); a plain one is
    resolved here.
    """
    cfg = resolve_run_config(context.run_config)
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise KeyError(
            "node config needs 'partition-id' and 'num-partitions' (set by the simulation, or "
            '`flower-supernode --node-config "partition-id=0 num-partitions=3"`)'
        )
    split = _federation(cfg, int(node["num-partitions"]))
    data = load_cached_dataset(str(cfg["dataset"]), str(cfg["data-path"]), _data_split(cfg))
    return split.client(data, int(node["partition-id"]))


#: Run-config keys that decide which samples each partition holds; with the identity of
#: ``data-path`` they are part of a checkpoint's fingerprint (the strategy adds model and solver keys).
DATA_KEYS = (
    "dataset",
    "data-split",
    "partitioner",
    "dirichlet-alpha",
    "classes-per-partition",
    "min-partition-size",
    "test-fraction",
    "seed",
)


def path_identity(path: str, chunk: int = 1 << 20) -> str:
    """A digest of what ``path`` holds: names, sizes and the first and last MiB of every file.

    ``""`` for no path (the data set is searched or embedded). Cheap on large files, and it
    changes when the file at the path is replaced by other data.
    """
    if not path:
        return ""
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for file in files:
        if not file.exists():
            h.update(f"{file.name}:missing".encode())
            continue
        size = file.stat().st_size
        h.update(f"{file.relative_to(root) if root.is_dir() else file.name}:{size}".encode())
        with file.open("rb") as f:
            h.update(f.read(chunk))
            if size > chunk:
                f.seek(max(chunk, size - chunk))
                h.update(f.read(chunk))
    return h.hexdigest()[:16]


def data_fingerprint(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The data keys of a run config (:data:`DATA_KEYS`) and the identity of ``data-path``."""
    cfg = resolve_run_config(cfg)
    return {**{k: cfg[k] for k in DATA_KEYS}, "data-path": path_identity(str(cfg["data-path"]))}


__all__ = [
    "DATA_KEYS",
    "architecture_for",
    "data_fingerprint",
    "load_cached_dataset",
    "load_partition_from_config",
    "scheme_for",
    "split_from_config",
]
