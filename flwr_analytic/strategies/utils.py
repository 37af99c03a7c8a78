"""Helpers shared by the package's Flower strategies and wrappers (as Flower's ``strategy_utils``).

Byte counts of ``ArrayRecord``s, SHA-256 digests of models, JSON-able conversion of round records and
metrics, and node sampling in a reproducible order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flwr_analytic.config_checks import RunConfig


def arrays_nbytes(record: ArrayRecord | None) -> int:
    """Bytes of the tensors in ``record`` (serialized ``Array.data``; framing not counted)."""
    return 0 if record is None else int(sum(len(a.data) for a in record.values()))


def message_nbytes(msg: Message) -> int:
    """Bytes of the tensors in every ``ArrayRecord`` of ``msg`` (0 for an error reply)."""
    if msg.has_error():
        return 0
    return int(sum(arrays_nbytes(r) for r in msg.content.array_records.values()))


def arrays_digest(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named tensors in key order (names and bytes), to compare runs bit for bit."""
    h = hashlib.sha256()
    for key in sorted(arrays.keys()):
        value = arrays[key]
        h.update(key.encode())
        h.update(
            np.ascontiguousarray(
                value if isinstance(value, np.ndarray) else value.numpy()
            ).tobytes()
        )
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, tuples, sets and paths as JSON types; NaN/inf as None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, set):
        return [jsonable(v) for v in sorted(value)]
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def sampling_options(cfg: RunConfig) -> dict[str, Any]:
    """Flower's sampling keywords (``fraction_*``, ``min_*_nodes``) of an app's run config.

    ``fraction-train`` and ``fraction-evaluate`` as they are; ``min-nodes`` for every minimum.
    """
    minimums = ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes")
    return cfg.kwargs("fraction-train", "fraction-evaluate", **dict.fromkeys(minimums, "min-nodes"))


def sample_sorted(grid: Grid, fraction: float, minimum: int, min_available: int) -> list[int]:
    """Flower's ``sample_nodes`` of ``max(fraction · connected, minimum)`` nodes, sorted by id."""
    num_nodes = int(len(list(grid.get_node_ids())) * fraction)
    node_ids, _ = sample_nodes(grid, min_available, max(num_nodes, minimum))
    return sorted(node_ids)


def retry_sample(grid: Grid, answered: set[int], fraction: float, minimum: int) -> list[int]:
    """Nodes of a retry: connected nodes not in ``answered``, topped up to the usual sample size.

    Unlike :func:`sample_sorted` it does not wait for nodes to (re)connect: with every remaining
    node gone it returns nothing, so a retry fails at once instead of blocking.
    """
    connected = list(grid.get_node_ids())
    wanted = max(int(len(connected) * fraction), minimum)
    pool = [n for n in connected if n not in answered]
    return sorted(random.sample(pool, min(len(pool), max(0, wanted - len(answered)))))


__all__ = [
    "arrays_digest",
    "arrays_nbytes",
    "jsonable",
    "message_nbytes",
    "retry_sample",
    "sample_sorted",
    "sampling_options",
]
