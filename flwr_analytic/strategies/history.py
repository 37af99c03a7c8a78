"""Per-round history (metrics, bytes, wall time) for Message-API strategies.

Also the personalized-accuracy metric set used by the ν-step meta app.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid


def arrayrecord_nbytes(arrays: ArrayRecord | None) -> int:
    """Return the serialized size of the tensors in ``arrays`` (bytes)."""
    if arrays is None:
        return 0
    return int(sum(len(a.data) for a in arrays.values()))


def _plain(metrics: MetricRecord | None) -> dict[str, Any]:
    return {} if metrics is None else {k: v for k, v in metrics.items()}


def personalized_metrics_aggregation(
    records: list[RecordDict], weighted_by_key: str
) -> MetricRecord:
    """Aggregate per-client personalization curves into the meta app's metric set.

    Each reply's MetricRecord holds ``correct-curve`` and ``loss-curve`` (one value per fine-tuning
    step ``s = 0..S``) and the test-set size under ``weighted_by_key``. Returned keys (accuracy
    after ``S`` steps unless the name says ``s0``):

    ``acc``
        sample-weighted mean ``sum correct / sum n`` (the PFLlib convention);
    ``acc-client-mean``, ``acc-client-std``, ``acc-client-min``, ``acc-client-p10``
        mean, population std, minimum and 10th percentile of the per-client accuracies;
    ``acc-s0``
        sample-weighted accuracy of the global model (no fine-tuning);
    ``loss``
        sample-weighted test loss; ``acc-curve``, ``loss-curve``: weighted values for every ``s``;
    ``acc-clients``
        the per-client accuracies after ``S`` steps (ordered by ``partition-id`` when the replies
        carry it, listed in ``client-ids``); ``num-clients``, ``num-test``.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    if all("partition-id" in m for m in metrics):
        metrics.sort(key=lambda m: m["partition-id"])
    n = np.array([float(m[weighted_by_key]) for m in metrics])
    correct = np.array([list(m["correct-curve"]) for m in metrics], dtype=float)
    loss = np.array([list(m["loss-curve"]) for m in metrics], dtype=float)
    acc_clients = correct[:, -1] / np.maximum(n, 1.0)
    acc_curve = correct.sum(0) / n.sum()
    loss_curve = (loss * n[:, None]).sum(0) / n.sum()
    return MetricRecord(
        {
            "acc": float(acc_curve[-1]),
            "acc-s0": float(acc_curve[0]),
            "acc-client-mean": float(acc_clients.mean()),
            "acc-client-std": float(acc_clients.std()),
            "acc-client-min": float(acc_clients.min()),
            "acc-client-p10": float(np.percentile(acc_clients, 10)),
            "loss": float(loss_curve[-1]),
            "acc-curve": [float(a) for a in acc_curve],
            "loss-curve": [float(a) for a in loss_curve],
            "acc-clients": [float(a) for a in acc_clients],
            "client-ids": [float(m.get("partition-id", -1)) for m in metrics],
            "num-clients": len(metrics),
            "num-test": int(n.sum()),
        }
    )


class RoundHistoryMixin:
    """Mixin for Message-API strategies recording one dict per round in ``self.history``.

    Each entry holds ``round``, ``train`` and ``evaluate`` (the aggregated MetricRecords as dicts),
    ``bytes-down`` / ``bytes-up`` (model tensors sent to and received from clients in the round, all
    messages counted) and ``round-time`` (seconds from ``configure_train`` to the end of
    ``aggregate_evaluate``). When the attribute ``evaluate_rounds`` (a set of rounds) is set,
    federated evaluation runs only in those rounds. Replies are aggregated in node-id order, which
    makes the floating-point sums independent of the order in which Flower sampled the nodes.
    Place it before the Flower strategy in the bases.
    """

    def _round(self, server_round: int) -> dict[str, Any]:
        if not hasattr(self, "history"):
            self.history: list[dict[str, Any]] = []
        for entry in self.history:
            if entry["round"] == server_round:
                return entry
        entry = {"round": server_round, "bytes-down": 0, "bytes-up": 0, "t0": time.perf_counter()}
        self.history.append(entry)
        return entry

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure training and count the bytes sent."""
        entry = self._round(server_round)
        entry["t0"] = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        entry["bytes-down"] += arrayrecord_nbytes(arrays) * len(messages)
        entry["train-clients"] = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate training replies in node-id order and count the bytes received."""
        replies = sorted(replies, key=lambda m: m.metadata.src_node_id)
        entry = self._round(server_round)
        for msg in replies:
            if not msg.has_error():
                entry["bytes-up"] += sum(
                    arrayrecord_nbytes(a) for a in msg.content.array_records.values()
                )
        arrays, metrics = super().aggregate_train(server_round, replies)
        entry["train"] = _plain(metrics)
        entry["train-time"] = time.perf_counter() - entry["t0"]
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure evaluation (only in ``self.evaluate_rounds`` when set) and count bytes."""
        rounds = getattr(self, "evaluate_rounds", None)
        if rounds is not None and server_round not in rounds:
            return []
        entry = self._round(server_round)
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        entry["bytes-down"] += arrayrecord_nbytes(arrays) * len(messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate evaluation replies and close the round's record."""
        replies = sorted(replies, key=lambda m: m.metadata.src_node_id)
        metrics = super().aggregate_evaluate(server_round, replies)
        entry = self._round(server_round)
        entry["evaluate"] = _plain(metrics)
        entry["round-time"] = time.perf_counter() - entry["t0"]
        return metrics

    def history_records(self) -> list[dict[str, Any]]:
        """Return the per-round history without internal timers (JSON-serializable)."""
        return [
            {k: v for k, v in e.items() if k != "t0"}
            for e in sorted(getattr(self, "history", []), key=lambda e: e["round"])
        ]

    def save_history(self, path: str | Path, **extra: Any) -> Path:
        """Write ``{"history": [...], **extra}`` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**extra, "history": self.history_records()}, indent=2))
        return path
