"""One typed record per round, the same schema for every strategy of the package.

A :class:`RoundRecord` is written by two hands: the strategy fills what it knows (``details``: for
FedACnnL the layer, the valid/rejected/absent clients and the partitions summed) and the
:class:`~flwr_analytic.strategies.metering.Metered` wrapper fills what any strategy can be measured by
(tensor bytes each way, wall time, per-client metric distributions). :class:`RoundLog` finds the
record of a ``(round, kind)`` so both hands write into the same one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flwr_analytic.strategies.utils import jsonable

#: Record kinds: a training round, an evaluation round, a change of the client set.
KINDS = ("train", "evaluate", "add-clients", "remove-clients")


@dataclass
class RoundRecord:
    """What happened in one round of one kind.

    Attributes
    ----------
    round : int
        Server round.
    kind : {"train", "evaluate", "add-clients", "remove-clients"}
        Which half of the round.
    num_sent, num_replies : int
        Messages sent and replies received (error replies included).
    bytes_sent, bytes_received : int
        Tensor bytes of ``ArrayRecord``s sent to and received from all clients.
    seconds : float
        Wall time from ``configure_*`` to the end of ``aggregate_*``.
    metrics : dict
        The aggregated ``MetricRecord`` of the round.
    details : dict
        Strategy-specific facts (kebab-case keys), e.g. FedACnnL's ``layer``, ``num-valid``,
        ``rejected``, ``partitions``, ``missing-partitions``.

    """

    round: int
    kind: str
    num_sent: int = 0
    num_replies: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The flat JSON form of the record.

        Keys: ``round``, ``kind``, ``num-sent``, ``num-replies``, ``bytes-sent``,
        ``bytes-received``, ``round-time``, the details and (when any) ``metrics``.
        """
        out: dict[str, Any] = {
            "round": self.round,
            "kind": self.kind,
            "num-sent": self.num_sent,
            "num-replies": self.num_replies,
            "bytes-sent": self.bytes_sent,
            "bytes-received": self.bytes_received,
            "round-time": self.seconds,
            **self.details,
        }
        if self.metrics:
            out["metrics"] = dict(self.metrics)
        return jsonable(out)

    def reject(self, node: int, reason: str) -> None:
        """Record a rejected reply (``details["rejected"]``: node id and reason)."""
        self.details.setdefault("rejected", []).append({"node-id": int(node), "reason": reason})

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.as_dict()

    def get(self, key: str, default: Any = None) -> Any:
        """``as_dict().get(key, default)``."""
        return self.as_dict().get(key, default)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        """Inverse of :meth:`as_dict` (for checkpoints)."""
        data = dict(data)
        fixed = {
            "round": data.pop("round"),
            "kind": data.pop("kind"),
            "num_sent": data.pop("num-sent", 0),
            "num_replies": data.pop("num-replies", 0),
            "bytes_sent": data.pop("bytes-sent", 0),
            "bytes_received": data.pop("bytes-received", 0),
            "seconds": data.pop("round-time", 0.0),
            "metrics": data.pop("metrics", {}),
        }
        return cls(**fixed, details=data)


class RoundLog:
    """The records of a run in order; :meth:`open` returns the record of a ``(round, kind)``."""

    def __init__(self) -> None:
        self.records: list[RoundRecord] = []

    def open(self, server_round: int, kind: str, **details: Any) -> RoundRecord:
        """The record of ``(server_round, kind)``, created (appended) if there is none yet.

        ``details`` (e.g. ``layer=0, stage=2``) are added to the record's ``details``.
        """
        for record in reversed(self.records):
            if record.round == server_round and record.kind == kind:
                record.details.update(details)
                return record
        record = RoundRecord(int(server_round), kind, details=dict(details))
        self.records.append(record)
        return record

    def __iter__(self) -> Iterator[RoundRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> RoundRecord:
        return self.records[index]

    def as_dicts(self) -> list[dict[str, Any]]:
        """Every record in its JSON form."""
        return [r.as_dict() for r in self.records]

    def load(self, dicts: list[dict[str, Any]]) -> None:
        """Replace the records by those of :meth:`as_dicts` (for checkpoints)."""
        self.records = [RoundRecord.from_dict(d) for d in dicts]


__all__ = ["KINDS", "RoundLog", "RoundRecord"]
