"""Which node holds which partition: bound on first contact, so a later claim cannot displace it.

In a deployment a partition id is whatever a SuperNode's node config says. Issue 13 showed a sixth
SuperNode started with an honest node's ``partition-id`` displacing the honest data in every layer
(the duplicate with the smaller random node id was kept) while the log blamed the honest node.
:class:`PartitionOwners` records the node that first contributed each partition (and the
``num-partitions`` the run's nodes agree on) and turns every later conflicting claim into a rejection
that names both nodes. A node that restarts keeps its partition when it keeps its node id (Flower's
SuperNode authentication: the id follows the node's key); without authentication a restarted node
gets a new id, and the partition moves to it only once the old node is no longer connected.
Two claims of an unbound partition in the same round are resolved by the aggregation (the smaller
node id when sorted, the first arrival when streaming) and reported as a conflict with both ids.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from flwr_analytic.analytic.aggregation import ClientKey
from flwr_analytic.analytic.statistics import StatisticsError


@dataclass
class PartitionOwners:
    """Partition id → owning node (first contact) and the agreed ``num-partitions``.

    Attributes
    ----------
    owner : dict[int, int]
        Partition id → node id that holds it.
    since : dict[int, int]
        Partition id → layer (0-based) in which it was bound.
    num_partitions : int or None
        ``num-partitions`` of the first accepted claim; nodes that disagree are rejected.
    conflicts : list of dict
        Every conflict: partition, the node kept, the node rejected, the layer and why.

    """

    owner: dict[int, int] = field(default_factory=dict)
    since: dict[int, int] = field(default_factory=dict)
    num_partitions: int | None = None
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    def check(
        self,
        key: ClientKey,
        num_partitions: int | None,
        layer: int,
        connected: Collection[int] | None = None,
    ) -> str | None:
        """Check a claim; return a note when the partition moves to a new node.

        Raises
        ------
        StatisticsError
            ``num-partitions`` disagrees with the run's, or the partition belongs to another node
            that is still connected (``connected`` unknown: any other node).

        """
        if num_partitions is not None:
            if self.num_partitions is None:
                self.num_partitions = int(num_partitions)
            elif int(num_partitions) != self.num_partitions:
                raise StatisticsError(
                    f"num-partitions={num_partitions} disagrees with the run's "
                    f"{self.num_partitions} (the first accepted node's)"
                )
        if not key.known:
            return None
        owner = self.owner.get(key.partition)
        if owner is None or owner == key.node:
            return None
        if connected is not None and owner not in connected:
            self.owner[key.partition], self.since[key.partition] = key.node, layer
            return (
                f"partition-id {key.partition} moves from node {owner} (no longer connected) "
                f"to node {key.node}"
            )
        self.conflicts.append(
            {"partition": key.partition, "kept": owner, "rejected": key.node, "layer": layer,
             "why": f"node {owner} has held it since layer {self.since[key.partition] + 1}"}
        )  # fmt: skip
        raise StatisticsError(
            f"duplicate partition-id {key.partition}: held by node {owner} since layer "
            f"{self.since[key.partition] + 1}; the claim of node {key.node} is rejected (a "
            "conflict: two nodes with one partition)"
        )

    def bind(self, keys: Collection[ClientKey], layer: int) -> None:
        """Bind the unbound partitions of a closed layer's contributors to their nodes."""
        for key in keys:
            if key.known and key.partition not in self.owner:
                self.owner[key.partition], self.since[key.partition] = key.node, layer

    def same_round(self, kept: ClientKey, dropped: ClientKey, layer: int, how: str) -> str:
        """Record two claims of an unbound partition in one round; return the rejection reason."""
        self.conflicts.append(
            {"partition": kept.partition, "kept": kept.node, "rejected": dropped.node,
             "layer": layer, "why": f"no earlier claim; {how}"}
        )  # fmt: skip
        return (
            f"duplicate partition-id {kept.partition}: also claimed by node {kept.node} in the "
            f"same round with no earlier claim; kept node {kept.node} ({how}); bind partitions to "
            "node keys with SuperNode authentication"
        )

    def state(self) -> dict[str, Any]:
        """JSON-able state (checkpoints)."""
        return {
            "owner": {str(p): n for p, n in self.owner.items()},
            "since": {str(p): n for p, n in self.since.items()},
            "num-partitions": self.num_partitions,
            "conflicts": list(self.conflicts),
        }

    @classmethod
    def restore(cls, state: dict[str, Any] | None) -> PartitionOwners:
        """Inverse of :meth:`state` (``None``: a checkpoint from before ownership: empty)."""
        if not state:
            return cls()
        return cls(
            {int(p): int(n) for p, n in state["owner"].items()},
            {int(p): int(n) for p, n in state["since"].items()},
            state.get("num-partitions"),
            list(state.get("conflicts", [])),
        )


__all__ = ["PartitionOwners"]
