"""Aggregation policies of the layer-wise analytic server: how the clients' statistics are summed.

FedACnnL (Gu et al., arXiv 2502.06915) solves each layer from ``(ΣG_k, ΣB_k, Σn_k)``. Floating-point
addition is not associative, so the order of the sum decides the last bits of the model:

* :class:`SortedSum` holds every contribution and sums them in :class:`ClientKey` order (partition id,
  then node id): the same clients give the same model, bit for bit, whatever the arrival order.
* :class:`StreamingSum` adds each contribution on arrival into float64 accumulators and drops it:
  memory ``O(D²)`` for any number of clients, equal to the sorted sum to rounding (relative ``~1e-15``
  per addition).

Both refuse a second contribution for a partition already in the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError, merge

#: Aggregation policies by name.
AGGREGATIONS = ("sorted", "streaming")


@dataclass(frozen=True, order=True)
class ClientKey:
    """A contributor and its place in the sum: by partition id (when known), then by node id."""

    rank: int
    partition: int
    node: int

    @classmethod
    def of(cls, partition: int | None, node: int) -> ClientKey:
        """Key of a reply claiming ``partition`` (``None`` or negative: unknown) from ``node``."""
        if partition is not None and int(partition) >= 0:
            return cls(0, int(partition), int(node))
        return cls(1, int(node), int(node))

    @property
    def known(self) -> bool:
        """Whether the contributor named its partition."""
        return self.rank == 0


class SortedSum:
    """Hold every contribution; sum them in :class:`ClientKey` order when the layer closes.

    A second contribution for a partition already present is a duplicate: after sorting, the one
    with the smaller node id is kept and the others are returned by :meth:`close` as rejected.
    """

    name = "sorted"

    def __init__(self, dim: int, targets: int) -> None:
        self.dim, self.targets = dim, targets
        self.items: list[tuple[ClientKey, LayerStatistics]] = []

    def add(self, key: ClientKey, stats: LayerStatistics) -> None:
        """Keep ``stats`` for the sum."""
        self.items.append((key, stats))

    def close(self) -> list[tuple[ClientKey, str]]:
        """Sort by key and drop duplicate partitions; return the dropped ones with a reason."""
        seen: set[tuple[int, int]] = set()
        kept, dropped = [], []
        for key, stats in sorted(self.items, key=lambda kv: kv[0]):
            if (key.rank, key.partition) in seen:
                dropped.append((key, f"duplicate partition-id {key.partition}"))
                continue
            seen.add((key.rank, key.partition))
            kept.append((key, stats))
        self.items = kept
        return dropped

    @property
    def keys(self) -> list[ClientKey]:
        """The contributors (after :meth:`close`: unique, in summation order)."""
        return [key for key, _ in self.items]

    def members(self) -> list[tuple[ClientKey, LayerStatistics]]:
        """Every contributor's statistics (for group-wise output layers)."""
        return list(self.items)

    def total(self) -> LayerStatistics:
        """``(ΣG_k, ΣB_k, Σn_k)`` in key order."""
        return merge(stats for _, stats in self.items)


class StreamingSum:
    """Add each contribution into float64 accumulators on arrival, then drop it.

    Memory ``O(D²)`` whatever the number of clients; the sum follows arrival order, so it equals
    :class:`SortedSum`'s to float64 rounding (relative ``~1e-15`` per addition), not bit for bit. A
    contribution for a partition already added is rejected at once. With ``keep_members`` the
    statistics are also kept (group-wise output layers need each client's; only for that layer).
    """

    name = "streaming"

    def __init__(self, dim: int, targets: int, keep_members: bool = False) -> None:
        self.dim, self.targets = dim, targets
        self.gram, self.cross, self.count = np.zeros((dim, dim)), np.zeros((dim, targets)), 0
        self.keys: list[ClientKey] = []
        self.keep_members = keep_members
        self.kept: list[tuple[ClientKey, LayerStatistics]] = []

    def add(self, key: ClientKey, stats: LayerStatistics) -> None:
        """Add ``stats`` to the sums; raise ``StatisticsError`` for a duplicate partition."""
        if any((k.rank, k.partition) == (key.rank, key.partition) for k in self.keys):
            raise StatisticsError(f"duplicate partition-id {key.partition}")
        self.gram += stats.gram
        self.cross += stats.cross
        self.count += int(stats.count)
        self.keys.append(key)
        if self.keep_members:
            self.kept.append((key, stats))

    def close(self) -> list[tuple[ClientKey, str]]:
        """Nothing to drop: duplicates were rejected on arrival."""
        return []

    def members(self) -> list[tuple[ClientKey, LayerStatistics]]:
        """The kept contributions (``keep_members``), in arrival order."""
        return list(self.kept)

    def total(self) -> LayerStatistics:
        """``(ΣG_k, ΣB_k, Σn_k)`` in arrival order (checked by the release policy's solve)."""
        return LayerStatistics(self.gram, self.cross, self.count)


LayerSum = SortedSum | StreamingSum


__all__ = ["AGGREGATIONS", "ClientKey", "LayerSum", "SortedSum", "StreamingSum"]
