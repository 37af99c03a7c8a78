"""Metering for any strategy: bytes each way, wall time and per-client metrics of every round.

A wrapper (:class:`~flwr_analytic.strategies.wrapper.StrategyWrapper`): it counts the tensor bytes of
the messages the wrapped strategy sends and of the replies it gets (lazily, so a streaming strategy
still sees its replies one at a time), times each half round from ``configure_*`` to the end of
``aggregate_*``, keeps each client's scalar metrics of every evaluation round (by ``partition-id``),
and writes all of it into the round's :class:`~flwr_analytic.strategies.records.RoundRecord`: the
wrapped strategy's own record when it keeps a :class:`~flwr_analytic.strategies.records.RoundLog`
(FedACnnL), else one of its own (Flower's FedAvg, FedProx, the meta strategies).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_analytic.strategies.records import RoundLog, RoundRecord
from flwr_analytic.strategies.utils import message_nbytes
from flwr_analytic.strategies.wrapper import StrategyWrapper


def _sent_nbytes(messages: list[Message]) -> int:
    return int(sum(message_nbytes(m) for m in messages))


def _client_metrics(replies: list[Message]) -> dict[str, list[float]]:
    """Each scalar metric of the replies, one value per client, ordered by ``partition-id``."""
    rows = []
    for msg in replies:
        if not msg.has_error():
            for record in msg.content.metric_records.values():
                rows.append({k: v for k, v in record.items() if isinstance(v, int | float)})
    rows.sort(key=lambda m: float(m.get("partition-id", -1)))
    keys = sorted(set().union(*rows)) if rows else []
    return {k: [float(m[k]) for m in rows] for k in keys if all(k in m for m in rows)}


class Metered(StrategyWrapper):
    """Record bytes, wall time and per-client metrics of every round of ``strategy``.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy.
    client_metrics : bool (default: True)
        Keep each client's scalar evaluation metrics in the round record
        (``details["client-metrics"]``: metric → per-client values by ``partition-id``).

    Notes
    -----
    ``history`` is the :class:`RoundLog`; the training ``MetricRecord`` also gets ``bytes-sent``,
    ``bytes-received`` and ``round-time``.
    """

    def __init__(self, strategy: Strategy, client_metrics: bool = True) -> None:
        super().__init__(strategy)
        inner = getattr(strategy, "history", None)
        self.history: RoundLog = inner if isinstance(inner, RoundLog) else RoundLog()
        self.client_metrics = client_metrics
        self._t0: dict[tuple[int, str], float] = {}

    def _open(self, server_round: int, kind: str, messages: list[Message]) -> None:
        record = self.history.open(server_round, kind)
        record.num_sent = len(messages)
        record.bytes_sent = _sent_nbytes(messages)

    def _counted(self, replies: Iterable[Message], record: RoundRecord) -> Iterator[Message]:
        count = 0
        for msg in replies:
            count += 1
            record.bytes_received += message_nbytes(msg)
            yield msg
        record.num_replies = count

    def _close(self, record: RoundRecord, kind: str) -> None:
        t0 = self._t0.pop((record.round, kind), None)
        if t0 is not None:
            record.seconds = time.perf_counter() - t0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages; their bytes and the start of the round recorded."""
        self._t0[(server_round, "train")] = time.perf_counter()
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._open(server_round, "train", messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count the replies' bytes as the wrapped strategy reads them; time the round."""
        record = self.history.open(server_round, "train")
        record.bytes_received = 0
        stream = self._counted(replies, record)
        if isinstance(replies, list | tuple):  # strategies may read a list more than once
            stream = list(stream)
        arrays, metrics = self.strategy.aggregate_train(server_round, stream)
        self._close(record, "train")
        if metrics is not None:
            metrics["bytes-sent"] = record.bytes_sent
            metrics["bytes-received"] = record.bytes_received
            metrics["round-time"] = record.seconds
            if not isinstance(getattr(self.strategy, "history", None), RoundLog):
                record.metrics = dict(metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages; bytes and start time recorded."""
        self._t0[(server_round, "evaluate")] = time.perf_counter()
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        if messages:
            self._open(server_round, "evaluate", messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate through the wrapped strategy; record time and per-client metrics."""
        replies = list(replies)
        if not replies:
            self._t0.pop((server_round, "evaluate"), None)
            return self.strategy.aggregate_evaluate(server_round, replies)
        record = self.history.open(server_round, "evaluate")
        record.bytes_received = sum(message_nbytes(m) for m in replies)
        record.num_replies = len(replies)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        self._close(record, "evaluate")
        if metrics is not None:
            record.metrics = dict(metrics)
        if self.client_metrics:
            record.details["client-metrics"] = _client_metrics(replies)
        return metrics

    def history_records(self) -> list[dict[str, Any]]:
        """The per-round records as JSON-serializable dicts."""
        return self.history.as_dicts()

    def save_history(self, path: str | Path, **extra: Any) -> Path:
        """Write ``{**extra, "history": [...]}`` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**extra, "history": self.history_records()}, indent=2))
        return path

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The wrapped strategy's checkpoint state plus the history (for ``Checkpointed``)."""
        inner = getattr(self.strategy, "checkpoint_state", None)
        arrays, meta = inner() if inner is not None else ({}, {})
        return arrays, {**meta, "metered-history": self.history.as_dicts()}

    def restore_checkpoint_state(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        inner = getattr(self.strategy, "restore_checkpoint_state", None)
        if inner is not None:
            inner(arrays, meta)
        history = getattr(self.strategy, "history", None)
        self.history = history if isinstance(history, RoundLog) else self.history
        self.history.load(meta["metered-history"])


__all__ = ["Metered"]
