"""Aggregation of the clients' evaluation replies: weighted means and per-client distributions.

Two metric sets: FedACnnL's global and pFedACnnL-personalized accuracy/loss (Gu et al., arXiv
2502.06915) and the meta app's accuracy after ``s = 0..S`` fine-tuning steps. Both summarize a
per-client quantity ``v_k`` with test-set sizes ``n_k`` the same way (:func:`client_summary`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict

from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.report import client_summary


def _rows(records: list[RecordDict]) -> list[Any]:
    rows = [next(iter(r.metric_records.values())) for r in records]
    return sorted(rows, key=lambda m: float(m.get(P.PARTITION_ID, -1)))


def aggregate_personalized_evaluation(
    records: list[RecordDict], weighted_by_key: str = P.NUM_EXAMPLES
) -> MetricRecord:
    """Aggregate the clients' global and pFedACnnL metrics.

    For ``m`` in ``global-accuracy``, ``global-loss``, ``personal-accuracy``, ``personal-loss`` (and
    the ``group-*``, ``second-stage-accuracy`` and ``product-accuracy`` metrics when every client
    has them): :func:`client_summary` and ``m-clients``
    (per-client values ordered by ``partition-id``, listed in ``client-ids``). Also
    ``num-clients``, ``num-examples`` and ``num-stats-reused``; with per-client λ (run config
    ``personal-lambda = "auto"``) the chosen ρ's distribution (:func:`lambda_distribution`).
    Clients with an empty test set are left out.
    """
    rows = [m for m in _rows(records) if float(m[weighted_by_key]) > 0]
    if not rows:
        return MetricRecord({"num-clients": 0, "num-examples": 0})
    n = np.array([float(m[weighted_by_key]) for m in rows])
    out: dict[str, Any] = {"num-clients": len(rows), "num-examples": int(n.sum())}
    keys = ["global-accuracy", "global-loss", "personal-accuracy", "personal-loss"]
    group_keys = ["group-accuracy", "group-loss", "group-personal-accuracy", "group-personal-loss"]
    stage_keys = ["second-stage-accuracy", "product-accuracy"]  # strategies.SecondStage
    keys += [k for k in group_keys + stage_keys if all(k in m for m in rows)]
    for key in keys:
        values = np.array([float(m[key]) for m in rows])
        out.update(client_summary(values, n, key))
        out[f"{key}-clients"] = [float(v) for v in values]
    for key in (P.PERSONAL_LAMBDA, f"group-{P.PERSONAL_LAMBDA}"):
        if all(key in m for m in rows):
            out.update(lambda_distribution([float(m[key]) for m in rows], key))
    out["client-ids"] = [int(m.get(P.PARTITION_ID, -1)) for m in rows]
    out["num-stats-reused"] = int(sum(int(m.get("stats-reused", 0)) for m in rows))
    return MetricRecord(out)


def lambda_distribution(values: list[float], key: str = P.PERSONAL_LAMBDA) -> dict[str, Any]:
    """How many clients chose each pFedACnnL ``ρ`` (``∞``: the global output layer kept).

    Returns
    -------
    dict
        ``key-clients`` (each client's ρ, ``inf`` for the global layer; JSON writes it as ``null``),
        ``key-values`` (the distinct finite ρ chosen, ascending), ``key-counts`` (clients per
        value) and ``key-global`` (clients that kept the global layer).

    """
    chosen = np.asarray(values, dtype=float)
    finite, counts = np.unique(chosen[np.isfinite(chosen)], return_counts=True)
    return {
        f"{key}-clients": [float(v) for v in chosen],
        f"{key}-values": [float(v) for v in finite],
        f"{key}-counts": [int(c) for c in counts],
        f"{key}-global": int(np.sum(np.isinf(chosen))),
    }


def personalized_metrics_aggregation(
    records: list[RecordDict], weighted_by_key: str
) -> MetricRecord:
    """Aggregate per-client fine-tuning curves into the meta app's metric set.

    Each reply holds ``correct-curve`` and ``loss-curve`` (one value per fine-tuning step
    ``s = 0..S``) and its test-set size under ``weighted_by_key``. ``acc`` is the sample-weighted
    accuracy after ``S`` steps (``Σ correct / Σ n``, the PFLlib convention) with
    :func:`client_summary`'s ``acc-client-*``; ``acc-s0`` the global model's; ``loss`` the
    weighted loss; ``acc-curve``, ``loss-curve`` for every ``s``; ``acc-clients`` per client
    (ordered by ``partition-id``, in ``client-ids``); ``num-clients``, ``num-test``.
    """
    metrics = _rows(records)
    n = np.array([float(m[weighted_by_key]) for m in metrics])
    correct = np.array([list(m["correct-curve"]) for m in metrics], dtype=float)
    loss = np.array([list(m["loss-curve"]) for m in metrics], dtype=float)
    acc_clients = correct[:, -1] / np.maximum(n, 1.0)
    acc_curve = correct.sum(0) / n.sum()
    loss_curve = (loss * n[:, None]).sum(0) / n.sum()
    summary = client_summary(acc_clients, n, "acc")
    del summary["acc"]  # the weighted accuracy is Σ correct / Σ n (the curve's last point)
    return MetricRecord(
        {
            "acc": float(acc_curve[-1]),
            "acc-s0": float(acc_curve[0]),
            **summary,
            "loss": float(loss_curve[-1]),
            "acc-curve": [float(a) for a in acc_curve],
            "loss-curve": [float(a) for a in loss_curve],
            "acc-clients": [float(a) for a in acc_clients],
            "client-ids": [int(m.get(P.PARTITION_ID, -1)) for m in metrics],
            "num-clients": len(metrics),
            "num-test": int(n.sum()),
        }
    )


__all__ = [
    "aggregate_personalized_evaluation",
    "client_summary",
    "lambda_distribution",
    "personalized_metrics_aggregation",
]
